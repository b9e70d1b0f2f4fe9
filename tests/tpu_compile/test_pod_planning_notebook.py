"""colabs/pod_planning.ipynb runs top to bottom where jax[tpu] is installed, and draws its chart.

`.ci/tpu_compile.sh` installs the notebook executor (nbclient, ipykernel, matplotlib) in the
jax[tpu] environment and runs this directory.
"""
import os
import sys

import pytest

pytest.importorskip("libtpu", reason="the pod planning notebook compiles for TPUs: needs jax[tpu]")
pytest.importorskip("nbclient", reason="the notebook executor: pip install nbclient ipykernel")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import notebook_runner as runner  # noqa: E402


def test_pod_planning_notebook_executes_and_draws():
  path = os.path.join(runner.COLABS, "pod_planning.ipynb")
  nb, seconds = runner.execute(path, runner.kernel_env())
  print(f"pod_planning.ipynb: {seconds:.1f} s, {runner.image_count(nb)} images")
  assert runner.problems(nb) == []
  assert runner.image_count(nb) > 0
