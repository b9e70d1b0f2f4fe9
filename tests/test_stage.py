"""The encoder stage: reducers at their declared hooks, the per-reduction outputs, warm-up pieces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax import models
from vitjax.tokens import schedule
from vitjax.tokens.base import Layout
from vitjax.tokens.evit import EViT

IMAGES = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))


def tiny(tokens=None, **kw):
  cfg = dict(variant="Ti/4", width=32, depth=4, num_heads=2, mlp_dim=64, tokens=tokens, **kw)
  return models.build(cfg, num_classes=10, image_size=16)


def test_parameter_names_stay_flat():
  model = tiny(dict(name="dynamicvit", keep_rate=0.5, locations=(1, 2)))
  params = model.init(jax.random.key(1), IMAGES)["params"]
  assert {"block_0", "block_3", "reduce_1", "reduce_2", "embedding_kernel", "head"} <= set(params)


def test_reductions_report_kept_index_and_cls_scores():
  model = tiny(dict(name="evit", keep_rate=0.5, locations=(1, 2)), track_source=True)
  variables = model.init(jax.random.key(1), IMAGES)
  _, out = model.apply(variables, IMAGES)
  assert sorted(out["reductions"]) == ["block_1", "block_2"]
  r1 = out["reductions"]["block_1"]
  # EViT at block 1 keeps ceil(0.5 * 16) = 8 patches by descending [CLS] score, then fuses
  scores = np.asarray(r1["cls_scores"])[:, 1:]
  want = np.argsort(-scores, axis=1, kind="stable")[:, :8] + 1
  index = np.asarray(r1["index"])
  np.testing.assert_array_equal(index[:, 0], 0)          # [CLS] first
  np.testing.assert_array_equal(index[:, 1:9], want)
  np.testing.assert_array_equal(index[:, 9], -1)         # the fused token is a new one
  np.testing.assert_array_equal(np.asarray(r1["size"])[:, 9], 8.0)
  # the index agrees with the source map of the same reduction
  src = np.asarray(out["token_state_1"].source)
  np.testing.assert_array_equal(src[:, np.arange(9), :].argmax(-1), index[:, :9])


def test_merging_marks_merged_tokens_new():
  model = tiny(dict(name="tome", r=3))
  _, out = model.apply(model.init(jax.random.key(1), IMAGES), IMAGES)
  rec = out["reductions"]["block_0"]
  index, size = np.asarray(rec["index"]), np.asarray(rec["size"])
  assert ((index == -1) == (size > 1)).all()
  for b in range(index.shape[0]):  # a token left alone keeps its own, distinct position
    row = index[b][index[b] >= 0]
    assert len(set(row.tolist())) == len(row)


def test_before_attention_reducer_reads_the_previous_block():
  model = tiny(dict(name="kmedoids", keep_rate=0.5, locations=(2,)))
  plans = model.stage().block_plans()
  assert plans[1].need == ("attn",) and plans[2].need == ()
  with pytest.raises(ValueError, match="place it at block 1 or later"):
    tiny(dict(name="kmedoids", keep_rate=0.5, locations=(0,)))


def test_one_step_ahead_reducer_reads_its_own_block():
  model = tiny(dict(name="mctf", r=2), class_token=True)
  plans = model.stage().block_plans()
  assert plans[0].reducer is None and all(p.need == ("attn",) for p in plans[1:])


def test_prop_attn_is_the_reducers_default():
  assert tiny(dict(name="tome", r=2)).stage().plan().prop_attn
  assert not tiny(dict(name="tome", r=2, prop_attn=False)).stage().plan().prop_attn
  assert not tiny(dict(name="evit", keep_rate=0.5, locations=(1,))).stage().plan().prop_attn


def test_scan_with_drop_path():
  model = tiny(None, scan=True, drop_path=0.1)
  variables = model.init(jax.random.key(1), IMAGES)
  logits, _ = model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(2)})
  assert logits.shape == (2, 10)


def test_warmup_pieces_follow_the_quantised_keep_rate():
  """The pieces are the distinct token-count tuples of EViT's warm-up, computed once."""
  layout = Layout(depth=12, num_patches=196, num_prefix=1)
  opts = dict(keep_rate=0.7, warmup=dict(start_epoch=1, ramp_epochs=10, grid=0.02))
  warm = EViT.warmup(opts, layout, steps_per_epoch=10)
  kw = dict(steps_per_epoch=10, start_epoch=1, ramp_epochs=10)
  assert warm.num_pieces == schedule.count_buckets(target=0.7, grid=0.02, **kw)
  assert warm.starts[0] == 0 and warm.overrides[0] == {"keep_rate": 1.0}
  assert warm.overrides[-1] == {"keep_rate": 0.7}
  for step in (0, 9, 10, 37, 55, 110, 500):
    kr = schedule.quantize(schedule.keep_rate_at(step, target=0.7, **kw), 0.02, target=0.7)
    piece = warm.overrides[warm.piece(step)]["keep_rate"]
    counts = [EViT.plan({**opts, "keep_rate": k}, layout).blocks for k in (kr, piece)]
    assert counts[0] == counts[1]


def test_warmup_without_a_schedule_is_none():
  assert tiny(dict(name="evit", keep_rate=0.5, locations=(1,)),
              class_token=True).token_warmup(10) is None
  assert tiny(None).token_warmup(10) is None


def test_model_with_tokens_updates_the_reducer_options():
  model = tiny(dict(name="evit", keep_rate=0.5, locations=(1,)), class_token=True)
  assert model.with_tokens({"keep_rate": 1.0}).stage().plan().blocks == (None,) * 4


def test_reducer_constraint_is_chained_after_the_optimizer():
  """Sinkhorn's centres stay on unit rows through the trainer's optimizer (as the benchmark's
  in-place renormalisation keeps them); a model without a constraint adds no step."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from vitjax.train import recipe  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(optimizer=dict()))
  assert tiny(None).after_update() is None
  model = tiny(dict(name="sinkhorn", keep_rate=0.5, locations=(2,)))
  tx = recipe.wrap_optimizer(optax.adamw(0.1), config, model)
  params = model.init(jax.random.key(1), IMAGES)["params"]
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  norms = np.linalg.norm(np.asarray(new["reduce_2"]["centers"]), axis=-1)
  np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
  assert not np.allclose(new["reduce_2"]["centers"], params["reduce_2"]["centers"])
