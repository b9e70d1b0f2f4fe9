"""S13 `rmt_decay`: RMT's Manhattan self-attention, MaSA (Fan et al. 2024, "RMT: Retentive
Networks Meet Vision Transformers"), following the official code (https://github.com/qhfan/RMT,
classfication_release/RMT.py: `RetNetRelPos2d`, `VisionRetentionAll`, `VisionRetentionChunk`,
`DWConv2d`, `theta_shift`).

Per head h a decay gamma_h = 1 - 2^(-a - r h / H) (a = `initial_value`, r = `heads_range`) enters
the logits in log space, before the softmax, as the official code does (it adds the mask to
`qk_mat` and then takes `torch.softmax`; the spec's "multiply after the softmax, no
renormalisation" is not what it computes):
  full        P = softmax(Q' K'^T / sqrt(d) + (|y_n - y_m| + |x_n - x_m|) log gamma_h),
  decomposed  along each row first, P_w = softmax(Q' K'^T / sqrt(d) + |x_n - x_m| log gamma_h)
              over the w tokens of the row, then along each column, P_h with |y_n - y_m|, over
              the h tokens of the column, applied to the row result: y = P_h (P_w V).
That is, softmax(S) (.) D renormalised per row (the decay matrix D = gamma^Manhattan multiplies
exp(S)). Q' and K' are q and k rotated as the official `theta_shift`: a rotary embedding of the
1-D raster index l = y w + x of each patch (not a 2-D one), the channel pairs (2i, 2i + 1)
rotated by the angle l theta_i, theta_i = 10000^(-i / (d/2 - 1)) (`torch.linspace(0, 1, d/2)`).
The decomposed form reuses Q' and K' for both axes. LCE: a 5 x 5 depthwise conv (with bias, zero
padding 2) of the values on the patch grid, `lepe`, added to the attention output before the
output projection `proj`. The scale d^-1/2 is applied to k (a linear map: the same logits).
Checked against the official modules on random weights (a 3 x 4 grid, both forms): max
difference 1.4e-6.

Defaults: `form="full"`, initial_value 2 and heads_range 6: RMT-T's (`RMT_T3`) stages 3 and 4,
the full ones; RMT-T runs the decomposed form (`VisionRetentionChunk`) in stages 1 and 2, with
heads_range 4 (`heads_range=None` picks 6 for the full form and 4 for the decomposed one, RMT-T's
per form; RMT-S/M/L decompose in stages 1-3). `rotate=False` leaves out the rotation and
`initial_value=inf` makes gamma = 1 (zero log decay): then it is multi-head softmax attention
plus LCE.

Deviations (own design, also in the README):
- Projections: the zoo's fused `qkv` Dense (one matrix for the official `q_proj`, `k_proj`,
  `v_proj`, all with bias as there when qkv_bias) and `proj` (`out_proj`); initialisation is the
  zoo's (RMT overwrites its own xavier init with trunc_normal(0.02) in `VisRetNet`).
- Prefix tokens ([CLS], registers; RMT has none), `cls_mode="global_row"`: each prefix query
  attends to every token with plain softmax (no rotation, decay or LCE), patch queries do not
  see the prefix tokens; that row is exact, so `cls_probs` is too. `cls_mode="none"` refuses
  prefix tokens.
- `attn_drop` (0 by default) drops the softmax weights (of both axes in the decomposed form);
  the official module has no attention dropout.
- No key bias or mask: the decayed softmax is over the grid, so reducers that pass one (ToMe's
  sizes, dropped tokens) are refused. RMT's per-block CPE (`RetBlock.pos`, a 3 x 3 depthwise
  conv on the block input) belongs to the block, not to the attention, and is not here.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, projection_macs
from vitjax.attention.spatial import begin, finish

FORMS = ("full", "decomposed")
# RMT-T's heads_range per form: stages 1-2 decompose (4), stages 3-4 are full (6)
HEADS_RANGE = {"full": 6.0, "decomposed": 4.0}
LCE_KERNEL = 5  # the official DWConv2d(embed_dim, 5, 1, 2) on the values

CAPS = Capabilities(cls_probs="exact", key_metric=False, size_semantics=False, key_bias=False,
                    needs_grid=True, full_attn=False)


def log_decay(num_heads: int, initial_value: float, heads_range: float) -> np.ndarray:
  """[H] log gamma_h = log(1 - 2^(-a - r h / H)), the official `RetNetRelPos2d.decay`."""
  h = np.arange(num_heads, dtype=np.float64)
  return np.log(1.0 - 2.0 ** (-initial_value - heads_range * h / num_heads)).astype(np.float32)


def manhattan(grid) -> np.ndarray:
  """[P, P] |y_n - y_m| + |x_n - x_m| of the raster patches (`generate_2d_decay` before the
  decay)."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  r, c = rows.ravel(), cols.ravel()
  return (np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])).astype(np.float32)


def distance(length: int) -> np.ndarray:
  """[L, L] |i - j| along one axis (`generate_1d_decay` before the decay)."""
  i = np.arange(length)
  return np.abs(i[:, None] - i[None]).astype(np.float32)


def rotation(patches: int, d: int) -> tuple:
  """(sin, cos) [P, d] of the official theta_shift: angle l theta_i at channels 2i and 2i + 1."""
  theta = 1.0 / 10000.0 ** np.linspace(0.0, 1.0, d // 2)
  angle = np.arange(patches)[:, None] * np.repeat(theta, 2)[None]
  return np.sin(angle).astype(np.float32), np.cos(angle).astype(np.float32)


def theta_shift(x, sin, cos):
  """x [B, P, H, d] rotated per channel pair: (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  return x * cos[:, None] + turned * sin[:, None]


def rmt_macs(n, width, num_heads, *, form, num_prefix=1, **_):
  """Projections of the n tokens, the 5 x 5 depthwise LCE on the P patches, Q K^T and P V of
  each patch over the P patches (full) or over its row and then its column (decomposed), and the
  prefix rows over all n keys (the grid is taken as square)."""
  del num_heads
  side = math.isqrt(n - num_prefix)
  patches = side * side
  keys = patches if form == "full" else 2 * side
  return (projection_macs(n, width) + LCE_KERNEL ** 2 * patches * width
          + 2 * patches * keys * width + 2 * num_prefix * n * width)


@registry.register(
    "rmt_decay", caps=CAPS,
    paper="RMT: Retentive Networks Meet Vision Transformers (Fan et al. 2024)",
    official="https://github.com/qhfan/RMT",
    complexity="full O(N^2 D), decomposed O(N (h + w) D); + 25 N D (LCE)", macs=rmt_macs)
class RMTDecay(Attention):
  """Softmax attention with a per-head Manhattan-distance decay in log space, rotated q and k,
  and a 5 x 5 depthwise conv of the values (LCE); full, or decomposed into rows then columns."""
  form: str = "full"
  initial_value: float = 2.0
  heads_range: Optional[float] = None  # None: RMT-T's, 6 (full) or 4 (decomposed)
  rotate: bool = True
  cls_mode: str = "global_row"

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    del x
    self.check(q, bias)
    grid, npre = begin(self, q, ctx, need)
    b, _, heads, d = q.shape
    qp, kp, vp = q[:, npre:], k[:, npre:] * jnp.asarray(d ** -0.5, k.dtype), v[:, npre:]
    if self.rotate:
      sin, cos = (jnp.asarray(t, q.dtype) for t in rotation(grid[0] * grid[1], d))
      qp, kp = theta_shift(qp, sin, cos), theta_shift(kp, sin, cos)
    decay = jnp.asarray(log_decay(heads, self.initial_value, self.decay_range()))
    drop = lambda w: self.dropout_weights(w, deterministic).astype(v.dtype)  # noqa: E731
    if self.form == "full":
      y = self.full(qp, kp, vp, decay, grid, drop)
    else:
      y = self.decomposed(qp, kp, vp, decay, grid, drop)
    img = vp.reshape(b, *grid, heads * d)
    lce = nn.Conv(heads * d, (LCE_KERNEL,) * 2, padding=LCE_KERNEL // 2,
                  feature_group_count=heads * d, dtype=self.dtype, name="lepe")(img)
    y = y + lce.reshape(y.shape).astype(y.dtype)
    return finish(self, y, q, k, v, None, ctx, need, deterministic)

  def decay_range(self) -> float:
    return HEADS_RANGE[self.form] if self.heads_range is None else self.heads_range

  def full(self, q, k, v, decay, grid, drop):
    """[B, P, H, d] patches -> [B, P, H, d]: one softmax over all patches."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32)
    logits = logits + decay[:, None, None] * jnp.asarray(manhattan(grid))
    w = drop(jax.nn.softmax(logits, axis=-1))
    return jnp.einsum("bhnm,bmhd->bnhd", w, v)

  def decomposed(self, q, k, v, decay, grid, drop):
    """[B, P, H, d] patches -> [B, P, H, d]: softmax along each row, then along each column."""
    b, _, heads, d = q.shape
    img = lambda t: t.reshape(b, *grid, heads, d)  # noqa: E731
    q, k, v = img(q), img(k), img(v)
    along_w = jnp.einsum("byihd,byjhd->byhij", q, k, preferred_element_type=jnp.float32)
    along_w = along_w + decay[:, None, None] * jnp.asarray(distance(grid[1]))
    v = jnp.einsum("byhij,byjhd->byihd", drop(jax.nn.softmax(along_w, axis=-1)), v)
    along_h = jnp.einsum("bixhd,bjxhd->bxhij", q, k, preferred_element_type=jnp.float32)
    along_h = along_h + decay[:, None, None] * jnp.asarray(distance(grid[0]))
    y = jnp.einsum("bxhij,bjxhd->bixhd", drop(jax.nn.softmax(along_h, axis=-1)), v)
    return y.reshape(b, -1, heads, d)

  def check(self, q, bias):
    if self.form not in FORMS:
      raise ValueError(f"error: rmt_decay form {self.form!r}; valid: {', '.join(FORMS)}")
    if bias is not None:
      raise ValueError("error: rmt_decay takes no key bias or mask (its decayed softmax is over "
                       "the patch grid); use it before any token reduction")
    if self.qk_norm:
      raise ValueError("error: rmt_decay has no qk_norm (RMT normalises neither queries nor "
                       "keys); use qk_norm=False")
    if self.rotate and q.shape[-1] % 2:
      raise ValueError(f"error: rmt_decay rotates channel pairs, got head dim {q.shape[-1]}; use "
                       "an even head dim or rotate=False")
    if not self.initial_value > 0 or self.decay_range() < 0:
      raise ValueError(f"error: rmt_decay initial_value={self.initial_value}, heads_range="
                       f"{self.decay_range()}; gamma = 1 - 2^(-a - r h / H) needs a > 0 and r >= 0")
