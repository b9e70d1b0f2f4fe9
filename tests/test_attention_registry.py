"""The attention registry's fact sheets against the mechanisms they describe.

Driven by the registry, so a new mechanism is checked the moment it registers: its analytic MAC
count against XLA's count of the layer's forward, a naive-formula reference test in the zoo tests,
the tier its capabilities imply, and the one build-time impl check. Mechanism files share their
machinery through `base` only.
"""
import ast
import dataclasses
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_attention_normalized
import test_attention_zoo_a
import test_attention_zoo_b
import test_attention_zoo_s
from vitjax import attention, tables
from vitjax.attention import registry
from vitjax.attention.base import AttnContext

# XLA also counts the elementwise work (softmax, biases, masks, feature maps) that MACs leave out;
# at the tiny shapes below that is 1-13% of a layer. An entry with more states its own tolerance.
MACS_RTOL = 0.15
SHAPES = [(8, 32, 2), (4, 64, 4)]  # (grid side, width, heads): n = side^2 + a [CLS]


def zoo_names() -> list:
  """The mechanisms of vitjax.attention (tests register names of their own for negative cases)."""
  return [n for n in attention.names()
          if attention.get(n).cls.__module__.startswith("vitjax.attention.")]


def grid_context(side: int) -> AttnContext:
  rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  pos = np.concatenate([np.full((1, 2), np.nan), np.stack([rows.ravel(), cols.ravel()], -1)])
  return AttnContext(pos=jnp.asarray(pos, jnp.float32)[None], grid=(side, side))


def xla_macs(module, x, ctx) -> float:
  """Half of XLA's flop count of the layer's forward (a MAC is two flops), without running it."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, ctx))
  cost = jax.jit(lambda v, x: module.apply(v, x, ctx)[0]).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / 2


@pytest.mark.parametrize("side,width,heads", SHAPES)
@pytest.mark.parametrize("name", zoo_names())
def test_macs_match_xla_cost_analysis(name, side, width, heads):
  entry = attention.get(name)
  assert entry.macs is not None, f"{name} has no analytic MAC count"
  n = side * side + 1
  module = attention.build(name, num_heads=heads, dtype=jnp.float32)
  measured = xla_macs(module, jnp.ones((1, n, width)), grid_context(side))
  rtol = MACS_RTOL if entry.macs_tolerance is None else entry.macs_tolerance
  analytic = entry.macs(n, width, heads)
  assert abs(measured / analytic - 1) <= rtol, (name, measured, analytic, measured / analytic)


def test_macs_read_the_options():
  gqa, mqa = attention.get("gqa").macs, attention.get("mqa").macs
  assert gqa(17, 64, 4, num_kv_heads=1) == mqa(17, 64, 4) < gqa(17, 64, 4)
  performer = attention.get("performer").macs
  assert performer(17, 64, 4, num_features=64) < performer(17, 64, 4)
  # a variant counts with its own defaults: agent_grid adds pooling, biases and its conv
  assert attention.get("agent_grid").macs(65, 32, 2) > attention.get("agent").macs(65, 32, 2)


def test_every_mechanism_has_a_reference_case():
  cases = {**test_attention_zoo_a.REFERENCE_CASES, **test_attention_zoo_a.GRID_REFERENCE_CASES,
           **test_attention_zoo_b.REFERENCE_CASES, **test_attention_normalized.REFERENCE_CASES,
           **test_attention_zoo_s.REFERENCE_CASES}
  missing = sorted(set(zoo_names()) - set(cases))
  assert not missing, f"no naive-formula reference test for {missing}"


def test_fact_sheets():
  fields = {f.name for f in dataclasses.fields(registry.Entry)}
  assert fields == {"name", "cls", "caps", "paper", "official", "complexity", "impls", "macs",
                    "macs_tolerance"}
  assert "tier" not in inspect.signature(registry.register).parameters
  for name in zoo_names():
    e = attention.get(name)
    assert e.paper and e.complexity and "reference" in e.impls, name
    assert e.official == "" or e.official.startswith("https://github.com/"), name
    assert e.tier == ("S" if e.caps.needs_grid else "G"), name
  assert attention.get("sra").tier == "S" and attention.get("sra_tokenset").tier == "G"
  grid = attention.get("agent_grid")
  assert (grid.paper, grid.official, grid.impls) == (attention.get("agent").paper,
                                                     attention.get("agent").official,
                                                     attention.get("agent").impls)


@pytest.mark.parametrize("name", zoo_names())
def test_impl_is_checked_when_built_with_one_message(name):
  impls = attention.get(name).impls
  message = f"attention {name!r} supports impl {impls}, got 'nope'"
  with pytest.raises(ValueError) as err:
    attention.build(name, num_heads=2, dtype=jnp.float32, impl="nope")
  assert str(err.value) == message
  with pytest.raises(ValueError) as err:
    registry.check(dict(name=name, impl="nope"))
  assert str(err.value) == message
  for impl in impls:
    assert attention.build(name, num_heads=2, dtype=jnp.float32, impl=impl).impl == impl


def test_spec_impl_overrides_the_model_impl():
  registry.check(dict(name="mhsa", impl="xla"), impl="nope")  # the spec's own impl is the one used
  registry.check("levit_bias")                                # no impl given: nothing to check
  with pytest.raises(ValueError, match="supports impl"):
    registry.check("levit_bias", impl="xla")
  built = attention.build(dict(name="mhsa", impl="xla"), num_heads=2, dtype=jnp.float32,
                          impl="reference")
  assert built.impl == "xla"


def test_no_mechanism_imports_a_sibling():
  root = pathlib.Path(attention.__file__).parent
  shared = {"vitjax.attention.base", "vitjax.attention.registry",
            "vitjax.attention.spatial"}  # the Tier S machinery
  for path in sorted(root.glob("*.py")):
    if path.stem == "__init__":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module == "vitjax.attention":
        assert {a.name for a in node.names} <= {"registry", "base", "spatial"}, path.name
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vitjax.attention"):
        assert node.module in shared, (path.name, node.module)
      elif isinstance(node, ast.Import):
        assert all(not a.name.startswith("vitjax.attention.") or a.name in shared
                   for a in node.names), path.name


def test_context_carries_training_progress():
  ctx = AttnContext()
  assert ctx.progress is None and ctx.step is None
  ctx = AttnContext(step=jnp.asarray(3), progress=jnp.float32(0.25))
  assert len(jax.tree_util.tree_leaves(ctx)) == 2  # both traced, so schedules never recompile


def test_attention_table_reads_the_fact_sheets():
  rows = {r.split(" | ")[0][3:-1]: r.split(" | ") for r in tables.attention_table().split("\n")[2:]}
  assert set(zoo_names()) <= set(rows)
  assert rows["sra"][1] == "S" and rows["mhsa"][1] == "G"
  assert rows["mhsa"][5] == "reference, xla, cudnn, pallas" and rows["latte"][5] == "reference"
  assert rows["performer"][3] == f"[code]({attention.get('performer').official})"
