"""`vitjax.load`: a training workdir gives the model the trainer evaluated (running statistics and
EMA included), a timm / big_vision file its model and weights, bad input one line; and the
README's "Using a model" snippet runs as written (at tiny sizes)."""
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vitjax
from configs import default as default_config
from vitjax import checkpoints, evaluate, loading, models
from vitjax.checkpoints import common
from vitjax.train import mesh as mesh_lib
from vitjax.train import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """Two training steps of the smoke model with dgqa (running statistics in batch_stats) and an
  EMA, saved at both steps: (config, workdir, the trainer's summary)."""
  config = default_config.get_config("smoke=True,attention=dgqa")
  config.data.data_dir = data_dir
  config.update(total_steps=2, warmup_steps=1, log_every_steps=2, eval_every_steps=2,
                checkpoint_every_steps=1, async_checkpoints=False)
  config.ema = dict(decay=0.5)
  workdir = str(tmp_path_factory.mktemp("run"))
  return config, workdir, trainer.train_and_evaluate(config, workdir)


def trainer_eval(config, model, variables) -> dict:
  """The trainer's own evaluation (its eval step and loop) of `variables`."""
  mesh = mesh_lib.make_mesh(config.mesh)
  return trainer.evaluate(jax.jit(trainer.make_eval_step(model)), variables["params"], config,
                          mesh_lib.batch_sharding(mesh), variables.get("batch_stats"))


@pytest.mark.slow
def test_workdir_gives_what_the_trainer_evaluated(run):
  config, workdir, summary = run
  model, variables, loaded_config = vitjax.load(workdir, config=config)
  assert loaded_config is config and model.num_classes == 10
  assert set(variables) == {"params", "batch_stats"}  # dgqa's running key norms
  scores = trainer_eval(config, model, variables)
  np.testing.assert_allclose(scores["eval/loss"], summary["eval_loss"], rtol=1e-6)
  assert float(scores["eval/top1"]) == pytest.approx(summary["eval_top1"], abs=1e-9)

  _, ema_variables, _ = vitjax.load(workdir, config=config, ema=True)
  scores = trainer_eval(config, model, ema_variables)
  np.testing.assert_allclose(scores["eval/loss"], summary["eval_ema_loss"], rtol=1e-6)

  _, first, _ = vitjax.load(os.path.join(workdir, "checkpoints"), config=config, step=1)
  _, same, _ = vitjax.load(os.path.join(workdir, "checkpoints", "1"), config=config)
  kernel = lambda v: v["params"]["head"]["kernel"]
  np.testing.assert_array_equal(kernel(first), kernel(same))
  assert not np.array_equal(kernel(first), kernel(variables))


@pytest.mark.slow
def test_workdir_with_config_json_and_overrides(run, tmp_path):
  config, workdir, _ = run
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  model, variables, loaded_config = vitjax.load(copy)  # no config=: the trainer's config.json
  ref_model, ref_variables, _ = vitjax.load(workdir, config=config)
  assert model == ref_model and loaded_config.model.width == config.model.width
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                ref_variables["params"]["head"]["kernel"])
  model, _, loaded_config = vitjax.load(copy, drop_path=0.2)
  assert model.drop_path == loaded_config.model.drop_path == 0.2
  assert config.model.drop_path == 0.0  # the caller's config is left alone


@pytest.mark.slow
def test_evaluate_restores_through_load(run, tmp_path):
  config, workdir, summary = run
  rows = evaluate.run(config, workdir, runs=1, throughput_batch=8)
  assert rows[0]["model"] == f"{os.path.basename(workdir)}@2"
  assert rows[0]["top1"] == pytest.approx(100 * summary["eval_top1"], abs=1e-6)
  cli = subprocess.run(
      [sys.executable, "-m", "vitjax.evaluate", "--config=configs/default.py:smoke=True",
       f"--config.data.data_dir={config.data.data_dir}", f"--checkpoint={workdir}", "--step=7"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=300)
  assert cli.returncode == 1, cli.stderr
  assert cli.stderr.strip().splitlines()[-1] == (
      f"error: {workdir}/checkpoints has no step 7; its steps: 1, 2")


def tiny(**cfg):
  cfg = {"variant": "Ti/4", "depth": 2, "width": 128, "num_heads": 2, "mlp_dim": 256, **cfg}
  return models.build(cfg, num_classes=10, image_size=16)


FILE_CASES = {".safetensors": dict(distill_token=True),  # DeiT distilled, as timm has it
              ".npz": dict(posemb_prefix=False, gelu_approximate=True)}  # big_vision's ViT


@pytest.mark.parametrize("suffix", sorted(FILE_CASES))
def test_file_gives_its_model_and_weights(suffix, tmp_path):
  model = tiny(**FILE_CASES[suffix])
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # zero-initialised heads matter
  path = str(tmp_path / f"model{suffix}")
  checkpoints.save(path, params, model)
  loaded, variables, config = vitjax.load(path)
  assert config is None and set(variables) == {"params"}
  assert loaded.width == 128 and loaded.num_classes == 10
  assert all(getattr(loaded, k) == v for k, v in FILE_CASES[suffix].items())
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  np.testing.assert_allclose(loaded.apply(variables, x, train=False)[0],
                             model.apply({"params": params}, x, train=False)[0], atol=1e-5)
  again, params_again = checkpoints.load_model(path, num_classes=10)
  assert again == loaded
  np.testing.assert_array_equal(params_again["head"]["kernel"],
                                variables["params"]["head"]["kernel"])
  assert vitjax.load(path, tokens=dict(name="topk", keep_rate=0.5, locations=(1,)))[0].tokens


def bad_inputs(tmp_path):
  (tmp_path / "weights.ckpt").write_text("")
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  (tmp_path / "plain").mkdir()
  return [
      (str(tmp_path / "missing.safetensors"), {}, "does not exist; pass a training workdir"),
      (str(tmp_path / "weights.ckpt"), {}, "has the unknown suffix '.ckpt'; pass a training"),
      (str(tmp_path / "plain"), {}, "has no checkpoints/ folder; pass a training workdir"),
      (str(tmp_path / "empty"), {}, "holds no finished checkpoint; a run saves one"),
  ]


def test_bad_input_is_one_line(tmp_path):
  for path, kw, message in bad_inputs(tmp_path):
    with pytest.raises(loading.LoadError, match=re.escape(message)) as e:
      vitjax.load(path, **kw)
    assert "\n" not in str(e.value)
  with pytest.raises(loading.LoadError, match="config file .* does not exist"):
    loading.config_from_file(str(tmp_path / "nope.py:smoke=True"))


def test_config_from_file_reads_it_as_main_py_does():
  config = loading.config_from_file(os.path.join(ROOT, "configs", "default.py:smoke=True"))
  assert config.total_steps == 6 and config.model.depth == 2
  tome = loading.with_model_overrides(config, dict(tokens=dict(name="tome", r=2)))
  assert tome.model.tokens.r == 2 and config.model.tokens.name == "none"


@pytest.mark.slow
def test_bad_workdir_input_is_one_line(run, tmp_path):
  config, workdir, _ = run
  without_config = tmp_path / "work"
  without_config.mkdir()
  os.symlink(os.path.join(workdir, "checkpoints"), without_config / "checkpoints")
  other = default_config.get_config("smoke=True")  # mhsa: the saved dgqa does not fit it
  other.data.data_dir = config.data.data_dir
  file = str(tmp_path / "m.safetensors")
  checkpoints.save(file, common.zeros_like_abstract(common.abstract_params(tiny())), tiny())
  damaged = tmp_path / "damaged"  # a copy cut short: the newest step lost its tree metadata
  shutil.copytree(workdir, damaged)
  os.remove(damaged / "checkpoints" / "2" / "state" / "_METADATA")
  cases = [((str(without_config),), {}, "holds no config.json to rebuild the model from"),
           ((str(damaged),), dict(config=config), "at step 2 cannot be read ("),
           ((workdir,), dict(config=config, step=7), "has no step 7; its steps: 1, 2"),
           ((workdir,), dict(config=other), "does not fit the model of the config: parameters"),
           ((file,), dict(ema=True), "is a timm/big_vision file: config=, step= and ema= are")]
  for args, kw, message in cases:
    with pytest.raises(loading.LoadError, match=re.escape(message)) as e:
      vitjax.load(*args, **kw)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the README snippets
# The workdir, file and config the snippets name stand for a run and a file the test makes; the
# ViT-S/16 is made one block deep, which keeps its shapes and so the outputs the README states.
SUBSTITUTIONS = {"using a model": {'dict(variant="S/16")': 'dict(variant="S/16", depth=1)',
                                   'config="configs/default.py"': "config=CONFIG"},
                 "pretrained weights": {}}


def readme_snippet(name: str) -> str:
  """The code between `<!-- snippet: NAME -->` and the next `<!-- end snippet -->`, with its
  `expression  # -> value` lines (outputs the README states) turned into checks."""
  text = open(os.path.join(ROOT, "README.md")).read()
  assert f"<!-- snippet: {name} -->" in text, f"the README lost its {name!r} snippet markers"
  block = text.split(f"<!-- snippet: {name} -->", 1)[1].split("<!-- end snippet -->", 1)[0]
  code = block.split("```python\n", 1)[1].split("```", 1)[0]
  for old, new in SUBSTITUTIONS[name].items():
    assert code.count(old) == 1, f"the README's {name!r} snippet no longer has {old}"
    code = code.replace(old, new)
  return re.sub(r"^(\S.*?)\s+# -> (.*)$", r"assert (\1) == (\2), '\1 is not \2'", code,
                flags=re.M)


@pytest.mark.slow
def test_readme_snippets_run(run, tmp_path, monkeypatch):
  config, workdir, _ = run
  (tmp_path / "workdirs").mkdir()
  os.symlink(workdir, tmp_path / "workdirs" / "default")
  deit = models.build(dict(variant="S/16", width=64, num_heads=1, mlp_dim=128), num_classes=1000,
                      image_size=32)  # DeiT-S's layout, at a tiny width and resolution
  zeros = common.zeros_like_abstract(common.abstract_params(deit))  # its weights do not matter
  checkpoints.save(str(tmp_path / "deit_small_patch16_224.safetensors"), zeros, deit)
  monkeypatch.chdir(tmp_path)
  code = readme_snippet("using a model")
  assert code.count("assert ") == 3
  # pylint: disable=exec-used
  exec(compile(code, "README.md", "exec"), {"CONFIG": config})
  exec(compile(readme_snippet("pretrained weights"), "README.md", "exec"), {})
  assert os.path.exists(tmp_path / "out.safetensors")
