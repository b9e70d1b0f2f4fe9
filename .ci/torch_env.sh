#!/usr/bin/env bash
# Builds the PyTorch + timm venv that the timm parity tests (tests/test_checkpoints.py) run in
# (einops for the official CvT code, tests/test_cvt.py).
# Usage: .ci/torch_env.sh [VENV_DIR]   (default /tmp/venv-torch; reused when already built)
# Then:  VITJAX_TORCH_PYTHON=VENV_DIR/bin/python python -m pytest tests/test_checkpoints.py
# A separate venv: torch is never a run-time dependency of vitjax (safetensors import needs none).
# torch 2.13.0 is the CPU wheel; a bare `pip install timm` would pull a CUDA torch.
set -euo pipefail
VENV="${1:-/tmp/venv-torch}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
start=$(date +%s)
# torchvision 0.28.0 is a CUDA build: `import timm` fails on its missing torchvision::nms op unless
# the caller defines stand-ins first (the parity test's subprocess does, see tests/test_checkpoints.py).
CHECK='import sys, torch, safetensors, numpy, einops
try:
    import timm
except RuntimeError:
    for m in [m for m in sys.modules if m.startswith("torchvision")]:
        del sys.modules[m]
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import timm
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("torch", torch.__version__, "timm", timm.__version__)'
if "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "== reusing $VENV"
else
  echo "== building $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.13.0 torchvision==0.28.0 timm safetensors numpy \
    einops
  "$VENV/bin/python" -c "$CHECK"
fi
echo "== ready in $(( $(date +%s) - start )) s: export VITJAX_TORCH_PYTHON=$VENV/bin/python"
