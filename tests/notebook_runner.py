"""Executes a notebook of colabs/ as a reader would, top to bottom, and says what went wrong.

Shared by tests/test_colabs.py (the CPU notebooks) and tests/tpu_compile/ (pod planning, in the
jax[tpu] environment). The kernel is a fresh `python3` process that gets `env`: one CPU device
(not the 8 the test process forces), matplotlib's inline backend so that figures become image
outputs, the hub offline, and the variables that shrink each notebook's work.
"""
import os
import time

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, "colabs")
REPO_URL = "https://github.com/vitjax/vitjax"   # pyproject.toml's [project.urls] Repository


def kernel_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(MPLBACKEND="module://matplotlib_inline.backend_inline", HF_HUB_OFFLINE="1",
             VITJAX_COLAB_STEPS="10", VITJAX_COLAB_SMALL="1",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def execute(path: str, env: dict, timeout: int = 600):
  """(executed notebook, seconds). Raises nbclient's CellExecutionError on a failing cell."""
  nb = nbformat.read(path, as_version=4)
  saved = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)   # the kernel process inherits this environment
  try:
    t = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    return nb, time.perf_counter() - t
  finally:
    os.environ.clear()
    os.environ.update(saved)


def problems(nb) -> list:
  """Error outputs, tracebacks on stderr, and cells that show a figure but produced no image
  (nbclient already stops at the first cell that raises)."""
  found = []
  for i, cell in enumerate(nb.cells):
    if cell.cell_type != "code":
      continue
    outputs = cell.get("outputs", [])
    for o in outputs:
      if o.get("output_type") == "error":
        found.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
      elif o.get("name") == "stderr" and "Traceback" in o.get("text", ""):
        # a logged exception (warnings are allowed: libtpu's on a CPU host, tqdm's)
        found.append(f"cell {i}: stderr: {o['text'][-500:]}")
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    if "plt.show()" in cell.source and images == 0:
      found.append(f"cell {i} shows a figure but produced no image output")
  return found


def image_count(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", []))
