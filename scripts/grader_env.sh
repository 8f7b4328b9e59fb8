#!/usr/bin/env bash
# Run the grader-equivalent check under the grader's own package versions (GRADER.md):
#   bash scripts/grader_env.sh DATA_DIR [--submission submission/]
# Builds .venv-grader once (Python 3.12 where available) with torch 2.4.1, torchvision 0.19.1, timm 1.0.9,
# lightning 2.4.0, scikit-learn 1.5.1, numpy 2.1.1, pillow 10.4.0; the check's child process runs the single file
# there. (timm is installed with --no-deps beside its own requirements, so it cannot move torch off 2.4.1.)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# The first Python 3.12 that really runs (a pyenv shim for a version that is not active exits 127), else python3.
PY=${GRADER_PYTHON:-}
for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3; do
    [ -n "$PY" ] && break
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "" 2>/dev/null; then PY=$candidate; fi
done
if [ ! -x .venv-grader/bin/python ]; then
    "$PY" -m venv .venv-grader
    .venv-grader/bin/python -m pip install -q torch==2.4.1 torchvision==0.19.1 lightning==2.4.0 \
        pytorch-lightning==2.4.0 scikit-learn==1.5.1 numpy==2.1.1 pillow==10.4.0
fi
if ! .venv-grader/bin/python -c "import timm" 2>/dev/null; then  # also for a .venv-grader made before timm was
    .venv-grader/bin/python -m pip install -q --no-deps timm==1.0.9
    .venv-grader/bin/python -m pip install -q huggingface_hub safetensors pyyaml
fi
.venv-grader/bin/python -c "import sys, torch, torchvision, timm, lightning, sklearn, numpy, PIL; print('grader env: Python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, 'scikit-learn', sklearn.__version__, 'numpy', numpy.__version__, 'pillow', PIL.__version__)"
exec .venv/bin/python tools/grader_check.py "$@" --python .venv-grader/bin/python
