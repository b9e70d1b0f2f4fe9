"""Machinery the spatial (Tier S) mechanisms share: partitions of the patch grid, relative
position bias tables, neighbourhoods, and the frame every Tier S layer runs in.

Tokens of a Tier S layer are [B, prefix + h*w, ...] in raster order with ctx.grid = (h, w); the
prefix tokens ([CLS], registers) are split off before partitioning (`begin`) and attend to every
token afterwards (`finish`, cls_mode "global_row").

Partitions: Swin / MaxViT-block windows (`to_windows`: pad to multiples of the window, optionally
roll by -shift, cut into windows that become the batch axis; `from_windows` inverts it) and
MaxViT's grid groups (`to_grid` / `from_grid`); `partitioned_attention` runs softmax attention in
each part, padded keys excluded (impl "pallas": the flash kernel, parts as the batch, the position
bias and shift mask as its full bias, `flash_partitioned`).

Relative position bias: a learned table of (2 wh - 1)(2 ww - 1) entries per head indexed by the
offset of two tokens; `offset_index` gives the flat index of an offset, Swin's
`relative_position_index` is that of every in-window pair (query - key), MaxViT's and natten's
tables read key - query. `neighborhood` / `neighborhood_2d` give natten's inward-shifted (dilated)
neighbourhood of every query with the offset index of each of its keys.
"""
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import base

# What every partitioned (window, neighbourhood, grid) mechanism can give: an exact [CLS] row
# (prefix rows attend globally), no ToMe keys, no size semantics, no full attention matrix.
PARTITIONED_CAPS = base.Capabilities(cls_probs="exact", key_metric=False, size_semantics=False,
                                     needs_grid=True, full_attn=False)

# Logit added to a pair Swin's shifted-window mask forbids (Swin's own value: finite, so bf16 and
# fully masked rows stay finite).
SHIFT_MASK_LOGIT = -100.0
# Logit of a padding key: far enough below any real logit that exp underflows to exactly 0.
PAD_LOGIT = -1e9


def pair(v) -> tuple:
  """An int or a pair -> (int, int)."""
  if isinstance(v, (int, np.integer)):
    return int(v), int(v)
  a, b = v
  return int(a), int(b)


def patch_grid(ctx, n: int, name: str) -> tuple:
  """(h, w) and the prefix count of the raster tokens a Tier S layer sees; clear errors where the
  context does not describe them."""
  if ctx is None or ctx.grid is None:
    raise ValueError(f"error: {name} needs the patch grid (ctx.grid); it is a spatial attention, "
                     "use it before any token reduction or in a hierarchical backbone")
  h, w = (int(g) for g in ctx.grid)
  if n != ctx.num_prefix + h * w:
    raise ValueError(f"error: {name} got {n} tokens for a {h}x{w} grid with {ctx.num_prefix} "
                     f"prefix tokens; expected {ctx.num_prefix + h * w}")
  return (h, w), ctx.num_prefix


def fit_window(grid: Sequence[int], window, shift) -> tuple:
  """Swin's rule per axis: a window no smaller than the grid becomes the grid and is not shifted
  (official code and timm); returns ((wh, ww), (sh, sw))."""
  window, shift = pair(window), pair(shift)
  for ws, s in zip(window, shift):
    if ws < 1 or not 0 <= s < ws:
      raise ValueError(f"error: window {window} with shift {shift}; a window is >= 1 and a shift "
                       "in [0, window)")
  win = tuple(g if g <= ws else ws for g, ws in zip(grid, window))
  sh = tuple(0 if g <= ws else s for g, ws, s in zip(grid, win, shift))
  return win, sh


def padded(grid: Sequence[int], window: Sequence[int]) -> tuple:
  return tuple(math.ceil(g / ws) * ws for g, ws in zip(grid, window))


def to_windows(x, window: Sequence[int], shift: Sequence[int] = (0, 0), fill=0.0):
  """x [B, h, w, ...] -> [B * nW, wh * ww, ...]: pad with `fill` to multiples of the window, roll
  by -shift, and cut into windows in raster order of windows."""
  xp = np if isinstance(x, np.ndarray) else jnp  # numpy for the static masks
  b, h, w = x.shape[:3]
  hp, wp = padded((h, w), window)
  pads = [(0, 0), (0, hp - h), (0, wp - w)] + [(0, 0)] * (x.ndim - 3)
  x = xp.pad(x, pads, constant_values=fill)
  if any(shift):
    x = xp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
  wh, ww = window
  rest = x.shape[3:]
  x = x.reshape(b, hp // wh, wh, wp // ww, ww, *rest)
  x = xp.moveaxis(x, 3, 2)  # [B, nh, nw, wh, ww, ...]
  return x.reshape(b * (hp // wh) * (wp // ww), wh * ww, *rest)


def from_windows(x, window: Sequence[int], grid: Sequence[int], shift: Sequence[int] = (0, 0)):
  """The inverse of `to_windows`: [B * nW, wh * ww, ...] -> [B, h, w, ...]."""
  xp = np if isinstance(x, np.ndarray) else jnp
  (wh, ww), (h, w) = window, grid
  hp, wp = padded(grid, window)
  nh, nw = hp // wh, wp // ww
  rest = x.shape[2:]
  x = x.reshape(-1, nh, nw, wh, ww, *rest)
  x = xp.moveaxis(x, 2, 3).reshape(-1, hp, wp, *rest)
  if any(shift):
    x = xp.roll(x, (shift[0], shift[1]), axis=(1, 2))
  return x[:, :h, :w]


def shift_regions(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> np.ndarray:
  """Swin's region ids [nW, T] of the rolled, padded grid: the slices (0, -ws), (-ws, -s), (-s, end)
  per axis; two tokens of a window from different regions were not neighbours before the roll."""
  hp, wp = padded(grid, window)
  img = np.zeros((1, hp, wp), np.float32)
  cnt = 0
  for rows in _bands(hp, window[0], shift[0]):
    for cols in _bands(wp, window[1], shift[1]):
      img[:, rows, cols] = cnt
      cnt += 1
  return to_windows(img, window)


def _bands(size: int, ws: int, s: int) -> list:
  if s == 0:
    return [slice(0, size)]
  return [slice(0, size - ws), slice(size - ws, size - s), slice(size - s, size)]


def shift_mask(grid, window, shift) -> Optional[np.ndarray]:
  """[nW, T, T] additive logits: SHIFT_MASK_LOGIT between regions, 0 within; None without shift."""
  if not any(shift):
    return None
  ids = shift_regions(grid, window, shift)
  return np.where(ids[:, :, None] != ids[:, None, :], SHIFT_MASK_LOGIT, 0.0).astype(np.float32)


def table_size(window: Sequence[int]) -> int:
  """Entries per head of a relative position table for offsets within a window."""
  return (2 * window[0] - 1) * (2 * window[1] - 1)


def offset_index(dy, dx, window: Sequence[int]):
  """Flat table index of offsets (dy, dx) = query - key, each in (-ws, ws)."""
  return (dy + window[0] - 1) * (2 * window[1] - 1) + (dx + window[1] - 1)


def relative_position_index(window: Sequence[int]) -> np.ndarray:
  """[T, T] table index of every (query, key) pair of a window (Swin's buffer of that name)."""
  rows, cols = np.meshgrid(np.arange(window[0]), np.arange(window[1]), indexing="ij")
  r, c = rows.ravel(), cols.ravel()
  return offset_index(r[:, None] - r[None, :], c[:, None] - c[None, :], window)


def window_bias(table, window: Sequence[int]):
  """table [(2wh-1)(2ww-1), H] -> the [H, T, T] relative position bias of one window."""
  idx = relative_position_index(window)
  return jnp.take(table, jnp.asarray(idx.reshape(-1)), axis=0).reshape(
      *idx.shape, -1).transpose(2, 0, 1)


def bias_init(stddev: float = 0.02):
  """Swin's initialiser of its tables: a normal truncated at +-2 (timm's trunc_normal_, std .02)."""
  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -2.0 / stddev, 2.0 / stddev, shape, dtype)
  return init


# ----------------------------------------------------------------------------- neighbourhoods
def neighborhood(length: int, kernel: int, dilation: int = 1) -> tuple:
  """One axis of (dilated) neighbourhood attention: keys [L, K], valid [L, K], offset [L, K],
  K = min(k, the longest dilation group).

  Position i attends to k positions of its dilation group {g, g + delta, ...}, g = i mod delta: the
  window centred on i, shifted inward at the borders so it keeps k positions (NAT / natten); a
  group shorter than k is attended whole (the extra slots are invalid). offset = (key - query) /
  delta + k - 1, the index into a (2k - 1) table.
  """
  slots = min(kernel, -(-length // dilation))  # no more than the longest group
  keys = np.zeros((length, slots), np.int64)
  valid = np.zeros((length, slots), bool)
  for i in range(length):
    g, j = i % dilation, i // dilation
    size = len(range(g, length, dilation))
    k = min(kernel, size)
    start = min(max(j - kernel // 2, 0), size - k)
    keys[i, :k] = g + dilation * np.arange(start, start + k)
    keys[i, k:] = i
    valid[i, :k] = True
  offset = (keys - np.arange(length)[:, None]) // dilation + kernel - 1
  return keys, valid, offset


def neighborhood_2d(grid: Sequence[int], kernel: Sequence[int], dilation: Sequence[int]) -> tuple:
  """keys [P, K] (raster indices), valid [P, K], offset index [P, K] into a [(2kh-1)(2kw-1)]
  table of (dy, dx) = key - query, for the P = h*w raster queries (K <= kh*kw)."""
  kr, vr, orow = neighborhood(grid[0], kernel[0], dilation[0])
  kc, vc, ocol = neighborhood(grid[1], kernel[1], dilation[1])
  keys = kr[:, None, :, None] * grid[1] + kc[None, :, None, :]
  valid = vr[:, None, :, None] & vc[None, :, None, :]
  offset = orow[:, None, :, None] * (2 * kernel[1] - 1) + ocol[None, :, None, :]
  flat = lambda a: a.reshape(grid[0] * grid[1], -1)  # noqa: E731
  return flat(keys), flat(valid), flat(offset)


def prefix_rows(q, k, v, bias, num_prefix: int, drop):
  """cls_mode "global_row": the prefix queries' softmax attention over every token, [B,P,H,d];
  drop(weights) applies the layer's attention dropout."""
  logits = jnp.einsum("bnhd,bmhd->bhnm", q[:, :num_prefix], k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + bias
  w = drop(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
  return jnp.einsum("bhnm,bhmd->bhnd", w, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


# ----------------------------------------------------------------------------- partitions
def to_grid(x, groups: Sequence[int], fill=0.0):
  """MaxViT's grid partition: x [B, h, w, ...] -> [B * nW, Gh * Gw, ...], padded with `fill` to
  multiples of the grid; a group holds the G x G tokens spaced hp / Gh rows and wp / Gw columns apart."""
  xp = np if isinstance(x, np.ndarray) else jnp
  b, h, w = x.shape[:3]
  hp, wp = padded((h, w), groups)
  x = xp.pad(x, [(0, 0), (0, hp - h), (0, wp - w)] + [(0, 0)] * (x.ndim - 3),
             constant_values=fill)
  gh, gw = groups
  rest = x.shape[3:]
  x = x.reshape(b, gh, hp // gh, gw, wp // gw, *rest)
  x = xp.moveaxis(x, (1, 3), (3, 4))  # [B, hp/G, wp/G, Gh, Gw, ...]
  return x.reshape(b * (hp // gh) * (wp // gw), gh * gw, *rest)


def from_grid(x, groups: Sequence[int], grid: Sequence[int]):
  """The inverse of `to_grid`."""
  xp = np if isinstance(x, np.ndarray) else jnp
  (gh, gw), (h, w) = groups, grid
  hp, wp = padded(grid, groups)
  rest = x.shape[2:]
  x = x.reshape(-1, hp // gh, wp // gw, gh, gw, *rest)
  x = xp.moveaxis(x, (3, 4), (1, 3)).reshape(-1, hp, wp, *rest)
  return x[:, :h, :w]


def partitioned_attention(q, k, v, key_bias, grid, cut, paste, pair_bias=None, mask=None, *,
                          impl="reference", drop=None):
  """Softmax attention within the parts of a partition of the patch grid (windows, groups).

  q, k, v [B, h*w, H, d]; key_bias [B, h*w] or None; cut(t [B, h, w, ...], fill) -> [B*nW, T, ...]
  and paste its inverse; pair_bias [H, T, T] and mask [nW, T, T] are shared by all images. Padding
  keys get PAD_LOGIT. impl "reference" materialises the weights (also whenever `drop` is given),
  "pallas" runs the flash kernel (`flash_partitioned`), else jax.nn.dot_product_attention with
  the parts as the batch. Returns [B, h*w, H, d].
  """
  b, _, h, d = q.shape
  img = lambda t: t.reshape(b, *grid, *t.shape[2:])  # noqa: E731
  qw, kw, vw = (cut(img(t), 0.0) for t in (q, k, v))   # [B*nW, T, H, d]
  if impl == "pallas" and drop is None:
    keys = None
    if key_bias is not None or qw.shape[0] * qw.shape[1] > b * grid[0] * grid[1]:  # padding
      kb = jnp.zeros((b, grid[0] * grid[1]), jnp.float32) if key_bias is None else key_bias
      keys = cut(img(kb.astype(jnp.float32)), PAD_LOGIT)[:, None, None, :]   # [B*nW, 1, 1, T]
    yw = flash_partitioned(qw, kw, vw, keys, pair_bias, mask)
    return paste(yw).reshape(b, grid[0] * grid[1], h, d)
  t = qw.shape[1]
  kb = jnp.zeros((b, grid[0] * grid[1]), jnp.float32) if key_bias is None else key_bias
  logits_bias = cut(img(kb), PAD_LOGIT).reshape(b, -1, 1, 1, t)   # [B, nW, 1, 1, T]
  if pair_bias is not None:
    logits_bias = logits_bias + pair_bias
  if mask is not None:
    logits_bias = logits_bias + jnp.asarray(mask)[None, :, None]
  n_win = logits_bias.shape[1]
  logits_bias = jnp.broadcast_to(logits_bias, (b, n_win, h, t, t)).reshape(b * n_win, h, t, t)
  if impl == "reference" or drop is not None:
    logits = jnp.einsum("bnhd,bmhd->bhnm", qw, kw,
                        preferred_element_type=jnp.float32) * d ** -0.5 + logits_bias
    w = jax.nn.softmax(logits, axis=-1)
    w = (w if drop is None else drop(w)).astype(v.dtype)
    yw = jnp.einsum("bhnm,bhmd->bhnd", w, vw.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
  else:
    yw = jax.nn.dot_product_attention(qw, kw, vw, bias=logits_bias.astype(qw.dtype),
                                      implementation="xla")
  return paste(yw).reshape(b, grid[0] * grid[1], h, d)


def flash_partitioned(qw, kw, vw, key_bias=None, pair_bias=None, mask=None):
  """Softmax attention of the parts [B*nW, T, H, d] (images x nW, parts fastest) through the flash
  kernel: key_bias [B*nW, 1, 1, T] or None its per-key bias; pair_bias [H, T, T] (every part) and
  mask [nW, T, T] (part b % nW) its full bias, [nW, H, T, T] with a mask, else [H, T, T]: never
  expanded over the images. Head dims 32, 64 or 128 (the kernel's)."""
  from vitjax.kernels import flash_attention  # pylint: disable=import-outside-toplevel
  full = None if pair_bias is None else pair_bias.astype(jnp.float32)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)[:, None]               # [nW, 1, T, T]
    full = mask if full is None else full[None] + mask
    full = jnp.broadcast_to(full, (mask.shape[0], qw.shape[2], *mask.shape[2:]))
  return flash_attention.attention(qw, kw, vw, key_bias, pair_bias=full)


# ----------------------------------------------------------------------------- the shared frame
CLS_MODES = ("global_row", "none")


def begin(module, q, ctx, need) -> tuple:
  """The checks every Tier S mechanism makes before attending; returns (grid, num_prefix)."""
  name = type(module).__name__
  if module.cls_mode not in CLS_MODES:
    raise ValueError(f"error: cls_mode {module.cls_mode!r}; valid: {', '.join(CLS_MODES)}")
  unknown = set(need) - set(module.caps.provides())
  if unknown:
    raise ValueError(f"error: {name} cannot give {sorted(unknown)}; it gives "
                     f"{', '.join(module.caps.provides())}")
  grid, npre = patch_grid(ctx, q.shape[1], name)
  if npre and module.cls_mode == "none":
    raise ValueError(f"error: cls_mode='none' takes no prefix tokens, got {npre}; use "
                     "cls_mode='global_row' or a model without a [CLS] token")
  return grid, npre


def finish(module, y, q, k, v, bias, ctx, need, deterministic) -> tuple:
  """(patch outputs with the prefix rows in front, aux): the prefix queries attend to every token
  (cls_mode "global_row"), which makes the [CLS] row exact."""
  npre = ctx.num_prefix
  if npre:
    drop = lambda w: module.dropout_weights(w, deterministic)  # noqa: E731
    y = jnp.concatenate([prefix_rows(q, k, v, bias, npre, drop), y], axis=1)
  return y, base.cls_aux(need, lambda: base.query_row(base.softmax_weights, q, k, bias,
                                                      base.cls_position(ctx)))
