#!/usr/bin/env bash
# The test command: set up if needed, lint (ruff, configured in pyproject.toml), then run the suite (tiny
# synthetic data; real data/weights optional). A lint finding fails it like a failing test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
