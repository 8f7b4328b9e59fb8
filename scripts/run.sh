#!/usr/bin/env bash
# The main job: set up if needed, then run both stages (probe, then fine-tune) on DATA_DIR, or on a small
# generated bird-free set when no DATA_DIR is given. Extra arguments go to `python -m finetune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m finetune "$@"
