"""Where each head of a trained ViT looks: the [CLS] query's attention over the patches.

  maps = attention_maps.cls_attention(model, variables, images, block=-1)   # [B, H, h, w]

The block's attention is asked for its per-head [CLS] row (`cls_probs_per_head`, the signal ATS
reads) on the tokens the block received in the forward pass (`out["stem"]` or
`out["block_{i-1}"]`), through the block's own `attend`: every mechanism of the zoo that can give a
[CLS] row is drawn by the same code, and nothing here repeats its formula. Models whose tokens were
reduced before `block` have no grid left to draw on and are refused.
"""
import jax
import numpy as np

from vitjax.models.stage import Block


def _block_variables(variables, i: int) -> dict:
  name = f"block_{i}"
  return {col: tree[name] for col, tree in variables.items() if name in tree}


def cls_attention(model, variables, images, block: int = -1):
  """[B, H, h, w] float32 numpy: the [CLS] row of `block`'s attention per head over the patch grid
  (prefix tokens left out; each head's row over all keys sums to 1 for softmax mechanisms)."""
  depth = model.depth
  i = block % depth
  if not -depth <= block < depth:
    raise ValueError(f"block {block} is outside the model's {depth} blocks; use 0..{depth - 1} "
                     "or a negative index")
  if not model.class_token:
    raise ValueError("the model has no [CLS] token (class_token=False): no [CLS] row to draw")
  stage = model.stage()
  plans = stage.plan().blocks
  if any(p is not None for p in plans[:i + 1]):
    raise ValueError(f"block {i} sees reduced tokens (the model's reducer acts at or before it): "
                     "draw the attention of a model without `tokens`, or an earlier block")
  from vitjax.attention import registry  # pylint: disable=import-outside-toplevel
  spec = stage.blocks[i]["attention"]
  entry, _ = registry.check(spec)
  if "cls_probs_per_head" not in entry.caps.provides():
    raise ValueError(f"attention {entry.name!r} gives no [CLS] row (cls_probs='none'); "
                     "pick a mechanism whose registry entry has a [CLS] row")
  _, out = model.apply(variables, images, train=False)
  x = out["stem"] if i == 0 else out[f"block_{i - 1}"]
  ctx = stage.context(stage.initial_state(x), False, False, None, None)
  blk = Block(**stage.blocks[i])
  _, aux = blk.apply(_block_variables(variables, i), x, ctx, ("cls_probs_per_head",),
                     method=Block.attend)
  row = np.asarray(jax.device_get(aux["cls_probs_per_head"]), np.float32)[..., model.num_prefix:]
  return row.reshape(*row.shape[:2], *model.grid)
