"""Running timm in its own PyTorch interpreter for parity tests (`VITJAX_TORCH_PYTHON`).

Tests pass a script (`PREAMBLE` + their code) and arguments to `run`; `available()` says whether
the interpreter has torch, timm and safetensors, so that tests skip cleanly without them.
`random_params` gives the vitjax side its random weights.
"""
import os
import subprocess
import textwrap

import jax
import numpy as np

from vitjax.checkpoints import common

TORCH_PYTHON = os.environ.get("VITJAX_TORCH_PYTHON")
SKIP_REASON = "set VITJAX_TORCH_PYTHON to a python with torch + timm (.ci/torch_env.sh)"

# Imports timm on a CPU-only torch next to torchvision's CUDA build, and defines `perturb`.
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
    from safetensors.torch import load_file, save_file

    def perturb(model):
        # random weights where every parameter matters: norm gains near 1, the rest small
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.ndim == 1 and pname.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif pname.endswith("gamma"):
                    p.copy_(0.5 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.05 * torch.randn_like(p))
""")


def available(python=TORCH_PYTHON) -> bool:
  if not python:
    return False
  code = ("import importlib.util as u, sys; "
          "sys.exit(0 if u.find_spec('timm') and u.find_spec('safetensors') else 1)")
  probe = subprocess.run([python, "-c", code], capture_output=True, check=False)
  return probe.returncode == 0


def run(script: str, *args: str, timeout: int = 600) -> str:
  """Runs PREAMBLE + script with `args` (sys.argv[1:]); returns its stdout, fails on an error."""
  res = subprocess.run([TORCH_PYTHON, "-c", PREAMBLE + textwrap.dedent(script), *args],
                       capture_output=True, text=True, check=False, timeout=timeout)
  assert res.returncode == 0, res.stderr[-3000:]
  return res.stdout


def random_params(model, seed=0, offsets=(("scale", 1.0),)):
  """Random values in the model's shapes (no init compiled): N(0, 0.05) plus an offset by
  parameter name (norm gains near 1; NAT's layer scales `gamma` near 0.5), so that every
  parameter, zero-initialised heads, biases and position tables included, matters."""
  rng = np.random.default_rng(seed)
  offsets = dict(offsets)
  def draw(path, leaf):
    noise = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    return noise + offsets.get(getattr(path[-1], "key", ""), 0.0)
  return jax.tree_util.tree_map_with_path(draw, common.abstract_params(model))
