"""S8 `deformable`: DAT's deformable attention (Xia et al. 2022, "Vision Transformer with
Deformable Attention"), following the released DAT code (https://github.com/LeapLabTHU/DAT, tag
CVPR2022, models/dat_blocks.py: `DAttentionBaseline`; defaults from configs/dat_tiny.yaml). The
repository's main branch now holds DAT++ (2023), whose `DAttentionBaseline` differs; the first
paper's code is followed here, and the differences are named below.

Queries q = proj_q(x) on the h x w patch grid. The q channels are cut into G offset groups of C/G
channels (group g: channels g C/G ... (g + 1) C/G - 1, heads g H/G ... (g + 1) H/G - 1); one
offset network, shared by the groups, maps each group's channels to an offset field:
  theta = conv 1x1 (C/G -> 2, no bias)(GELU(LayerNorm_c(DWConv_{k x k, stride r, pad k//2}(q_g))))
on the hk x wk = ceil(h / r) x ceil(w / r) grid (channel 0: rows, 1: columns). The reference
points are the centres of that grid in [-1, 1]: p = ((i + 1/2) / hk, (j + 1/2) / wk) * 2 - 1, and
  delta = tanh(theta) * (1 / hk, 1 / wk) * s_off      (s_off = offset_range_factor > 0;
                                                       s_off = 0: delta = theta, no tanh)
  pos = p + delta                                      (s_off < 0: pos = tanh(p + theta))
Each group's channels of the layer input x (not q) are sampled at pos bilinearly, PyTorch's
grid_sample with align_corners=True (pixel = (u + 1) / 2 * (side - 1)) and zero padding outside
the grid; keys and values are proj_k and proj_v of the hk wk sampled vectors. Softmax attention
of every patch query over the sampled keys, scale d^-1/2, plus the deformable relative position
bias: a learned table [H, 2h - 1, 2w - 1] (init N(0, 0.01^2) truncated at +-2) sampled bilinearly
(align_corners=True, zeros) at the displacement (q_centre - pos) / 2 of each (query, key) pair,
q_centre the query grid's centres normalised as p. Then the output projection proj_out.
Options as the official: use_pe (the bias at all), dwc_pe (instead: a 3 x 3 depthwise conv of the
queries added to the attention output, LePE-like), fixed_pe (instead: a learned [H, hw, hk wk]
bias), no_off (zero offsets: the keys are sampled at the reference points).

Defaults: those of DAT-T's third stage, the /16 grid where a ViT's patches sit (configs/
dat_tiny.yaml: stride 1, offset_range_factor 2, use_pe True, dwc_pe / fixed_pe / no_off False,
kernel ksizes[2] = 5, groups 3 for 12 heads). n_groups=None gives DAT-T's four heads per group
(H // 4 groups, at least 1). With stride 1 the keys are as many as the patches (hk wk = hw), but
zero offsets do not sample the grid itself: the centres (i + 1/2) / h map to the pixel
(i + 1/2)(h - 1) / h under align_corners=True, between patches (the official convention).

Checked once against the released PyTorch module (random weights; 4x4, 6x5, 5x5 grids, 1-2
groups, stride 1-2, kernels 3-7, with and without dwc_pe): outputs within 7e-6, input gradients
within 2e-6 relative.

Differences of DAT++ (main branch), not followed: offsets scaled by 1 / (hk - 1), reference points
and query grid normalised by (side - 1), s_off < 0 clamps instead of tanh, no_off average-pools,
and a log-CPB option. The default kernel is an option here (DAT picks it by stage index).

Deviations (own design, also in the README):
- Prefix tokens ([CLS], registers; DAT has none), cls_mode "global_row": a prefix query attends
  to every token (keys and values proj_k / proj_v of the unsampled tokens, no position bias);
  patch queries do not see the prefix tokens. That row is exact, so `cls_probs` is too.
- fixed_pe's table is [H, hw, hk wk] for any stride (the released code's fixed_pe reads an
  undefined attribute, `self.n_sample`; DAT++ fixed it as here); no_off builds no offset network
  (the released code builds it and discards its output).
- A context key bias or mask is refused (the keys are sampled), as is qk_norm (DAT has none).
- The bilinear sampler is explicit gathers of the four corners in float32 (`sample_bilinear`);
  static shapes: hk and wk follow from the grid, the kernel and the stride.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities
from vitjax.attention.spatial import begin, bias_init, finish

NORM_EPSILON = 1e-5   # PyTorch's LayerNorm default (the offset network's LayerNormProxy)
HEADS_PER_GROUP = 4   # DAT-T: groups 3 and 6 for 12 and 24 heads


# ----------------------------------------------------------------------------- sampling
def sample_bilinear(img, coords):
  """img [B, h, w, C], coords [B, M, 2] (row, col) in pixels -> [B, M, C] float32: bilinear
  interpolation of the four neighbours, each neighbour outside the grid counting as zero
  (grid_sample's zeros padding). Explicit gathers; gradients reach coords and img."""
  b, h, w, c = img.shape
  flat = img.reshape(b, h * w, c).astype(jnp.float32)
  coords = coords.astype(jnp.float32)
  y, x = coords[..., 0:1], coords[..., 1:2]                      # [B, M, 1]
  y0, x0 = jnp.floor(y), jnp.floor(x)
  dy, dx = jnp.asarray([0.0, 0.0, 1.0, 1.0]), jnp.asarray([0.0, 1.0, 0.0, 1.0])
  yi, xi = y0 + dy, x0 + dx                                      # [B, M, 4] the four corners
  weight = (1.0 - jnp.abs(y - yi)) * (1.0 - jnp.abs(x - xi))
  inside = (yi >= 0) & (yi <= h - 1) & (xi >= 0) & (xi <= w - 1)
  idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
  m = idx.shape[1]
  corners = jnp.take_along_axis(flat, idx.reshape(b, m * 4, 1), axis=1).reshape(b, m, 4, c)
  return jnp.einsum("bmk,bmkc->bmc", jnp.where(inside, weight, 0.0), corners)


def to_pixels(pos, size):
  """Normalised (row, col) in [-1, 1] -> pixels, align_corners=True: -1 and 1 are the centres of
  the first and last rows (columns)."""
  scale = jnp.asarray([size[0] - 1, size[1] - 1], jnp.float32)
  return (pos.astype(jnp.float32) + 1.0) * 0.5 * scale


def grid_sample(img, pos):
  """img [B, h, w, C], pos [B, ..., 2] normalised (row, col) -> [B, ..., C] float32 (PyTorch's
  grid_sample, bilinear, zeros padding, align_corners=True, with (x, y) swapped to (row, col))."""
  b = img.shape[0]
  out = sample_bilinear(img, to_pixels(pos, img.shape[1:3]).reshape(b, -1, 2))
  return out.reshape(*pos.shape[:-1], img.shape[-1])


def reference_points(size) -> np.ndarray:
  """[hk, wk, 2] centres of an hk x wk grid normalised to [-1, 1] (the released
  `_get_ref_points`: (i + 1/2) / hk * 2 - 1)."""
  rows = (np.arange(size[0], dtype=np.float32) + 0.5) / size[0] * 2 - 1
  cols = (np.arange(size[1], dtype=np.float32) + 0.5) / size[1] * 2 - 1
  return np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1)


def sampled_grid(grid, ksize: int, stride: int) -> tuple:
  """The offset network's output grid: a k x k conv with padding k // 2 and stride r."""
  return tuple((g + 2 * (ksize // 2) - ksize) // stride + 1 for g in grid)


def default_groups(num_heads: int, n_groups: Optional[int]) -> int:
  return max(1, num_heads // HEADS_PER_GROUP) if n_groups is None else n_groups


# ----------------------------------------------------------------------------- MACs
def deformable_macs(n, width, num_heads, *, stride, ksize, use_pe, dwc_pe, fixed_pe, no_off,
                    n_groups=None, num_prefix=1, **_):
  """proj_q and proj_out on the n tokens; the offset network (k^2 per output and channel, then
  C -> 2 per group); 4 multiply-adds per sampled channel; proj_k, proj_v on the hk wk samples
  (and on the n tokens for the prefix rows); Q K^T and P V; the sampled bias (4 per pair and
  head) or the depthwise 3 x 3 conv (the grid taken as square)."""
  side = math.isqrt(n - num_prefix)
  patches = side * side
  ns = math.prod(sampled_grid((side, side), ksize, stride))
  total = 2 * n * width * width + 2 * ns * width * width + 2 * patches * ns * width
  if not no_off:
    total += ns * ksize ** 2 * width + 2 * ns * width
  total += 4 * ns * width
  if num_prefix:
    total += 2 * n * width * width + 2 * num_prefix * n * width
  if use_pe and dwc_pe:
    total += 9 * patches * width
  elif use_pe and not fixed_pe:
    total += 4 * patches * ns * num_heads
  del n_groups
  return total


# ----------------------------------------------------------------------------- the layer
class OffsetNetwork(nn.Module):
  """conv_offset: [B', h, w, C/G] -> [B', hk, wk, 2] offsets (rows, cols), unscaled."""
  ksize: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, q):
    c, k, pad = q.shape[-1], self.ksize, self.ksize // 2
    t = nn.Conv(c, (k, k), strides=self.stride, padding=((pad, pad), (pad, pad)),
                feature_group_count=c, dtype=self.dtype, name="dwconv")(q)
    t = nn.LayerNorm(epsilon=NORM_EPSILON, dtype=self.dtype, name="norm")(t)
    t = nn.gelu(t, approximate=False)  # PyTorch's nn.GELU: the exact form
    return nn.Dense(2, use_bias=False, dtype=self.dtype, name="proj")(t)


@registry.register(
    "deformable",
    caps=Capabilities(cls_probs="exact", key_metric=False, size_semantics=False, key_bias=False,
                      needs_grid=True, full_attn=False),
    paper="Vision Transformer with Deformable Attention (Xia et al. 2022)",
    official="https://github.com/LeapLabTHU/DAT",
    complexity="O(N N/r^2 D) + N/r^2 k^2 D (offsets)", macs=deformable_macs,
    # the bias interpolation is elementwise work per (query, key, group): its coordinates and
    # four corner weights, ~80 XLA flops a pair against 2 D of Q K^T and P V: XLA counts 51%
    # over the contractions at width 32 (the registry test's smallest), 3% at ViT-S
    macs_tolerance=0.6)
class DeformableAttention(Attention):
  """Softmax attention over keys sampled at learned offsets from a reference grid (DAT)."""
  n_groups: Optional[int] = None   # offset groups; None: num_heads // 4 (at least 1)
  stride: int = 1                  # of the offset network: hk = ceil(h / stride)
  ksize: int = 5                   # its depthwise kernel
  offset_range_factor: float = 2.0
  use_pe: bool = True
  dwc_pe: bool = False
  fixed_pe: bool = False
  no_off: bool = False
  cls_mode: str = "global_row"

  @nn.compact
  def __call__(self, x, ctx=None, *, need=(), deterministic=True):
    groups = self.check(x, ctx)
    b, n, width = x.shape
    d, heads = self.head_dim(width), self.num_heads
    grid, npre = begin(self, x, ctx, need)
    dense = lambda name: nn.Dense(width, use_bias=self.qkv_bias, dtype=self.dtype,  # noqa: E731
                                  name=name)
    q = dense("proj_q")(x)
    q_img = q[:, npre:].reshape(b, *grid, width)
    pos = self.sample_positions(q_img, groups)                # [B*G, hk, wk, 2]
    size = pos.shape[1:3]
    sampled = grid_sample(split_groups(x[:, npre:].reshape(b, *grid, width), groups), pos)
    sampled = merge_groups(sampled.reshape(b, groups, -1, width // groups)).astype(x.dtype)
    proj_k, proj_v = dense("proj_k"), dense("proj_v")
    k = proj_k(sampled).reshape(b, -1, heads, d)
    v = proj_v(sampled).reshape(b, -1, heads, d)
    qh = q.reshape(b, n, heads, d)
    logits = jnp.einsum("bnhd,bmhd->bhnm", qh[:, npre:], k,
                        preferred_element_type=jnp.float32) * d ** -0.5
    if self.use_pe and not self.dwc_pe:
      logits = logits + self.position_bias(pos, grid, size, groups)
    w = self.dropout_weights(jax.nn.softmax(logits, axis=-1), deterministic).astype(v.dtype)
    y = jnp.einsum("bhnm,bmhd->bnhd", w, v)
    if self.use_pe and self.dwc_pe:
      lepe = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=width,
                     dtype=self.dtype, name="rpe_table")(q_img)
      y = y + lepe.reshape(b, -1, heads, d).astype(y.dtype)
    k_all = v_all = None
    if npre or need:  # the prefix rows see the unsampled tokens
      k_all = proj_k(x).reshape(b, n, heads, d)
      v_all = proj_v(x).reshape(b, n, heads, d)
    y, aux = finish(self, y, qh, k_all, v_all, None, ctx, need, deterministic)
    y = nn.Dense(width, dtype=self.dtype, name="proj_out")(y.reshape(b, n, width))
    return nn.Dropout(self.proj_drop)(y, deterministic=deterministic), aux

  def check(self, x, ctx) -> int:
    name = "deformable"
    if ctx is not None and (ctx.key_bias is not None or ctx.valid is not None):
      raise ValueError(f"error: {name} takes no key bias or mask (its keys are sampled from the "
                       "grid); use it before any token reduction")
    if self.qk_norm:
      raise ValueError(f"error: {name} has no qk_norm (DAT normalises neither queries nor keys); "
                       "use qk_norm=False")
    if self.ksize < 1 or self.ksize % 2 == 0 or self.stride < 1:
      raise ValueError(f"error: {name} ksize={self.ksize}, stride={self.stride}; the kernel is an "
                       "odd int >= 1 (padding k // 2) and the stride an int >= 1")
    groups = default_groups(self.num_heads, self.n_groups)
    if groups < 1 or self.num_heads % groups or x.shape[-1] % groups:
      raise ValueError(f"error: {name} n_groups={groups} with {self.num_heads} heads of width "
                       f"{x.shape[-1]}; use a group count dividing the heads")
    return groups

  def sample_positions(self, q_img, groups: int):
    """[B*G, hk, wk, 2] normalised (row, col) sample positions of every offset group."""
    b, h, w, _ = q_img.shape
    size = sampled_grid((h, w), self.ksize, self.stride)
    ref = jnp.asarray(reference_points(size))
    if self.no_off:
      return jnp.broadcast_to(ref, (b * groups, *ref.shape))
    theta = OffsetNetwork(self.ksize, self.stride, self.dtype, name="conv_offset")(
        split_groups(q_img, groups)).astype(jnp.float32)
    factor = self.offset_range_factor
    if factor > 0:
      theta = jnp.tanh(theta) * jnp.asarray([1.0 / size[0], 1.0 / size[1]]) * factor
    return theta + ref if factor >= 0 else jnp.tanh(theta + ref)

  def position_bias(self, pos, grid, size, groups: int):
    """[B, H, hw, hk wk] float32: fixed_pe's table, else the table sampled at the displacements."""
    heads, patches, ns = self.num_heads, grid[0] * grid[1], size[0] * size[1]
    if self.fixed_pe:
      table = self.param("rpe_table", bias_init(0.01), (heads, patches, ns))
      return table.astype(jnp.float32)[None]
    table = self.param("rpe_table", bias_init(0.01), (heads, 2 * grid[0] - 1, 2 * grid[1] - 1))
    bg, hg = pos.shape[0], heads // groups
    table = table.astype(jnp.float32).reshape(groups, hg, *table.shape[1:]).transpose(0, 2, 3, 1)
    table = jnp.broadcast_to(table[None], (bg // groups, *table.shape))
    table = table.reshape(bg, *table.shape[2:])               # [B*G, 2h-1, 2w-1, H/G]
    q_grid = jnp.asarray(reference_points(grid)).reshape(patches, 1, 2)
    disp = (q_grid - pos.reshape(bg, 1, ns, 2)) * 0.5          # [B*G, hw, ns, 2]
    bias = grid_sample(table, disp)                            # [B*G, hw, ns, H/G]
    bias = bias.reshape(bg // groups, groups, patches, ns, hg)
    return bias.transpose(0, 1, 4, 2, 3).reshape(bg // groups, heads, patches, ns)


def split_groups(img, groups: int):
  """[B, h, w, C] -> [B*G, h, w, C/G], group g holding channels g C/G ... (g + 1) C/G - 1."""
  b, h, w, c = img.shape
  t = img.reshape(b, h, w, groups, c // groups).transpose(0, 3, 1, 2, 4)
  return t.reshape(b * groups, h, w, c // groups)


def merge_groups(t):
  """[B, G, M, C/G] -> [B, M, C] (the channels of group g at g C/G ...)."""
  b, g, m, c = t.shape
  return t.transpose(0, 2, 1, 3).reshape(b, m, g * c)
