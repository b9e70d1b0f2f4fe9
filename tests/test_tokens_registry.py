"""Registry-driven: every reducer has a reference test and takes exactly its declared options."""
import jax
import jax.numpy as jnp
import pytest

from vitjax import models, tokens
from vitjax.tokens import macs as tokens_macs
from vitjax.tokens.base import REQUIRED, Layout, initial_state

import test_tokens_evit
import test_tokens_learned
import test_tokens_merge

REFERENCE_CASES = {**test_tokens_evit.REFERENCE_CASES, **test_tokens_learned.REFERENCE_CASES,
                   **test_tokens_merge.REFERENCE_CASES}
LAYOUT = Layout(depth=12, num_patches=196, num_prefix=1)


def test_every_reducer_has_a_reference_case():
  missing = sorted(set(tokens.names()) - set(REFERENCE_CASES))
  assert not missing, f"registered reducers without a reference test: {missing}"
  assert all(callable(t) and t.__name__.startswith("test_") for t in REFERENCE_CASES.values())


def required(cls) -> dict:
  """The options a reducer cannot plan without (a keep rate is its only required kind)."""
  return {k: 0.5 for k, v in cls.options.items() if v is REQUIRED}


@pytest.mark.parametrize("name", tokens.names())
def test_unknown_option_fails_in_one_line_naming_the_valid_ones(name):
  cls = tokens.get(name).cls
  with pytest.raises(ValueError) as err:
    cls.plan({**required(cls), "no_such_option": 1}, LAYOUT)
  message = str(err.value)
  assert "\n" not in message and "no_such_option" in message and "valid options" in message
  assert all(repr(k) in message for k in cls.options), message


@pytest.mark.parametrize("name", tokens.names())
def test_every_declared_option_is_accepted_with_its_default(name):
  cls = tokens.get(name).cls
  base = cls.plan(required(cls), LAYOUT)
  defaults = {k: v for k, v in cls.options.items() if v is not REQUIRED}
  for key, value in defaults.items():
    assert cls.plan({**required(cls), key: value}, LAYOUT) == base, key
  assert cls.plan({**required(cls), **defaults}, LAYOUT) == base


# ----- each reducer's own MACs against XLA's count of its forward -----
# XLA also counts what MACs leave out: elementwise maps (an exact GELU is 64 flops, DynamicViT's
# predictor 16% over its MACs), norms, comparisons and sorts (ATS's sampling, ToMe's matching).
# At DeiT-S shapes that stays within 20% of the count plus 0.1% of a DeiT-S block
# (12 n D^2 + 2 n^2 D MACs, 0.38 G), which also bounds the pure selections' 0.
SIDE, WIDTH, HEADS = 14, 384, 6
MACS_RTOL, BLOCK_SHARE = 0.2, 1e-3
VARIANTS = {"tome": dict(r=8), "mctf": dict(r=8)}
EXTRA_VARIANTS = [("tome", dict(r=8, metric="x")), ("evit", dict(fuse=False)),
                  ("kmedoids", dict(medoid_update="textbook")),
                  ("tokenlearner", dict(fuser=True, locations=(1,)))]


def first_reduction(name: str, options: dict):
  """(kwargs, tokens received) of the reducer's first planned block on a DeiT-S-shaped encoder."""
  cls = tokens.get(name).cls
  at_one = {"locations": (1,)} if cls.options.get("locations") is not None else {}
  opts = {**required(cls), **at_one, **options}
  plan = cls.plan(opts, Layout(depth=4, num_patches=SIDE * SIDE, num_prefix=1))
  return next((kw for kw in plan.blocks if kw), None), 1 + SIDE * SIDE


def xla_macs(module, x, state, aux) -> float:
  """Half of XLA's flop count of the reducer's forward (fuser included), without running it."""
  def run(module, x, state, aux):
    y, new = module(x, state, aux)
    return module.after_block(y, new, (x, state))[0]
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x, state, aux, method=run))
  cost = jax.jit(lambda v, x: module.apply(v, x, state, aux, method=run)).lower(
      variables, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost.get("flops", 0.0) / 2


def all_aux(n: int) -> dict:
  attn = jnp.full((1, HEADS, n, n), 1.0 / n)
  return {"attn": attn, "cls_probs": attn[:, :, 0].mean(1), "cls_probs_per_head": attn[:, :, 0],
          "value_norm": jnp.ones((1, HEADS, n)), "key_metric": jnp.ones((1, n, WIDTH // HEADS))}


@pytest.mark.parametrize("name, options", [(n, VARIANTS.get(n, {})) for n in tokens.names()]
                         + EXTRA_VARIANTS)
def test_reducer_macs_match_xla_cost_analysis(name, options):
  cls = tokens.get(name).cls
  kwargs, n = first_reduction(name, options)
  analytic = cls.macs(n, WIDTH, num_heads=HEADS, num_prefix=1, **(kwargs or {}))
  if kwargs is None:  # plans nothing: no work of its own
    assert analytic == 0
    return
  module = cls(num_prefix=1, **kwargs)
  measured = xla_macs(module, jnp.ones((1, n, WIDTH)), initial_state(1, 1, (SIDE, SIDE)),
                      all_aux(n))
  slack = BLOCK_SHARE * (12 * n * WIDTH ** 2 + 2 * n * n * WIDTH)
  assert abs(measured - analytic) <= MACS_RTOL * analytic + slack, (name, measured, analytic)


def test_reducer_macs_of_a_built_model():
  """macs.reducer_macs sums each planned reduction's count at the tokens it receives."""
  model = models.build(dict(variant="S/16", width=64, num_heads=4, mlp_dim=256,
                            tokens=dict(name="evit", keep_rate=0.7)), num_classes=10,
                       image_size=224)
  received = [c.n_in for c in tokens_macs.block_counts(model)]
  assert tokens_macs.reducer_macs(model) == sum((received[i] - 1) * 64 for i in (3, 6, 9))
