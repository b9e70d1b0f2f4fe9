"""The PyTorch + timm interpreter that parity tests run reference models in (a subprocess).

`VITJAX_TORCH_PYTHON=/path/to/venv/bin/python` (`.ci/torch_env.sh` builds one); without it
`reference(...)` skips the test. Scripts start with `PREAMBLE`: timm imported (with stand-ins
for the CUDA build of torchvision's ops) and `perturb(model)`, random weights where every
parameter matters (norm gains near 1, layer-scale gammas near 0.5, the rest small).
"""
import json
import os
import subprocess
import textwrap

import pytest

TORCH_PYTHON = os.environ.get("VITJAX_TORCH_PYTHON")

PREAMBLE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import torch
    try:
        import timm
    except RuntimeError:  # torchvision's CUDA build: stand-in ops so that timm imports on CPU
        for m in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[m]
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import timm
    from safetensors.torch import save_file

    def perturb(model):
        with torch.no_grad():  # random weights where every parameter matters
            for pname, p in model.named_parameters():
                if p.ndim == 1 and pname.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif pname.endswith("gamma"):
                    p.copy_(0.5 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.05 * torch.randn_like(p))
""")


def has_timm(python=TORCH_PYTHON) -> bool:
  if not python:
    return False
  code = ("import importlib.util as u, sys; "
          "sys.exit(0 if u.find_spec('timm') and u.find_spec('safetensors') else 1)")
  probe = subprocess.run([python, "-c", code], capture_output=True, check=False)
  return probe.returncode == 0


def reference(script: str, cases, out: str) -> str:
  """Runs PREAMBLE + `script` with argv [json cases, out]; returns `out` (skips without timm)."""
  if not has_timm():
    pytest.skip("set VITJAX_TORCH_PYTHON to a python with torch + timm (.ci/torch_env.sh)")
  res = subprocess.run([TORCH_PYTHON, "-c", PREAMBLE + textwrap.dedent(script),
                        json.dumps(cases), str(out)],
                       capture_output=True, text=True, check=False, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  return str(out)
