"""Every notebook in colabs/ runs top to bottom on CPU without an error and draws its figures.

VITJAX_COLAB_STEPS and VITJAX_COLAB_SMALL shrink the work (a few steps, small models, fewer
images); pod_planning.ipynb needs jax[tpu] and runs in tests/tpu_compile/. The notebooks are
committed without outputs, install vitjax from the repository named in pyproject.toml, and the
README links each one.
"""
import glob
import json
import os
import re

import jax
import pytest

import notebook_runner as runner
from vitjax import checkpoints, models

NOTEBOOKS = sorted(glob.glob(os.path.join(runner.COLABS, "*.ipynb")))
TPU_ONLY = {"pod_planning.ipynb"}
CPU_NOTEBOOKS = [p for p in NOTEBOOKS if os.path.basename(p) not in TPU_ONLY]
EXPECTED = {"quickstart", "attention_zoo", "token_reduction", "pretrained", "kernels",
            "pod_planning"}


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory):
  """A timm-layout .safetensors file of a small 224 px ViT: the token-reduction notebook's
  'local file' path (the hub is offline in the tests)."""
  model = models.build(dict(variant="Ti/16", depth=3),  # width 192: 3 heads, as the file reads
                       num_classes=10, image_size=224)
  params = jax.jit(model.init)(jax.random.key(0), jax.numpy.zeros((1, 224, 224, 3)))["params"]
  path = str(tmp_path_factory.mktemp("weights") / "small_vit.safetensors")
  checkpoints.save(path, jax.device_get(params), model)
  return path


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU_NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes_and_draws(path, data_dir, local_weights):
  extra = dict(TFDS_DATA_DIR=data_dir)
  if os.path.basename(path) == "token_reduction.ipynb":
    extra["VITJAX_COLAB_WEIGHTS"] = local_weights
  nb, seconds = runner.execute(path, runner.kernel_env(**extra))
  print(f"{os.path.basename(path)}: {seconds:.1f} s, {runner.image_count(nb)} images")
  assert runner.problems(nb) == []
  assert runner.image_count(nb) > 0


def test_the_set_of_notebooks():
  assert {os.path.basename(p)[:-6] for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_without_outputs_and_installs_from_the_repository(path):
  nb = json.load(open(path))
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [] and cell.get("execution_count") is None, path
  first = "".join(nb["cells"][1]["source"])
  assert f'REPO_URL = "{runner.REPO_URL}"' in first and "pip" in first


def test_repository_url_and_readme_links():
  pyproject = open(os.path.join(runner.ROOT, "pyproject.toml")).read()
  assert f'Repository = "{runner.REPO_URL}"' in pyproject
  readme = open(os.path.join(runner.ROOT, "README.md")).read()
  slug = runner.REPO_URL.split("github.com/")[1]
  for path in NOTEBOOKS:
    name = os.path.basename(path)
    link = f"https://colab.research.google.com/github/{slug}/blob/main/colabs/{name}"
    assert re.search(rf"`colabs/{name}`.*\({re.escape(link)}\)", readme), name
