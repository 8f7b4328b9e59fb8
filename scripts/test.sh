#!/usr/bin/env bash
# The test command: set up if needed, lint (ruff) and type-check the library (mypy), both configured in
# pyproject.toml, then run the suite (tiny synthetic data; real data/weights optional). A lint or type finding
# fails it like a failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
