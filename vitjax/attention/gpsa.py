"""S14 `gpsa`: ConViT's gated positional self-attention (d'Ascoli et al. 2021, "ConViT: Improving
Vision Transformers with Soft Convolutional Inductive Biases"), following the official code
(https://github.com/facebookresearch/convit, convit.py) as timm's convit.py carries it (GPSA).

Per head h, content and positional attention mixed by a learned gate, then renormalised:
  A_h = (1 - sigmoid(l_h)) softmax(Q_h K_h^T / sqrt(d)) + sigmoid(l_h) softmax(r W_h + c_h),
  A_h <- A_h / sum_j A_h,  y_h = A_h V_h,
with r_ij = (dx, dy, dx^2 + dy^2) the key's offset from the query on the patch grid and the
positional projection `pos_proj` (3 -> H, with bias). Locality init (the official `local_init`,
applied after every layer is initialised): `v` is the identity, the gates l_h = 1, and head
h1 + K h2 (K = floor(sqrt(H)), h1, h2 < K) gets W_h = strength (2 (h2 - c), 2 (h1 - c), -1),
c = (K - 1) / 2, so its positional softmax peaks at the offset (h2 - c, h1 - c); other heads keep
the ordinary init, biases are 0. Projections as the official code: `qk` (D -> 2D), `v`, `proj`.

Deviations (own design, also in the README): a context key bias or mask (ToMe's log-sizes,
padding) is added to both the content and the positional logits; prefix tokens (ConViT inserts
its [CLS] only after the GPSA layers) take part in content attention only: their rows are plain
softmax attention and they receive no positional weight. Non-square grids use the same offsets.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitjax.attention import registry
from vitjax.attention.base import Attention, Capabilities, projection_macs, softmax_weights
from vitjax.attention.spatial import PAD_LOGIT, patch_grid


def relative_indices(grid) -> np.ndarray:
  """[P, P, 3] float32: (dx, dy, dx^2 + dy^2) of key m from query n, raster order."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  r, c = rows.ravel(), cols.ravel()
  dx = (c[None, :] - c[:, None]).astype(np.float32)
  dy = (r[None, :] - r[:, None]).astype(np.float32)
  return np.stack([dx, dy, dx ** 2 + dy ** 2], axis=-1)


def local_init(strength: float):
  """The official locality pattern of the [3, H] positional kernel (other heads ~ N(0, 0.02)),
  all of it times the strength."""
  def init(key, shape, dtype=jnp.float32):
    heads = shape[1]
    side = int(heads ** 0.5)
    centre = (side - 1) / 2
    pattern, local = np.zeros(shape, np.float32), np.zeros(shape, bool)
    for h1 in range(side):
      for h2 in range(side):
        pattern[:, h1 + side * h2] = (2 * (h2 - centre), 2 * (h1 - centre), -1.0)
        local[:, h1 + side * h2] = True
    kernel = 0.02 * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    return (strength * jnp.where(local, pattern, kernel)).astype(dtype)
  return init


def identity_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(*shape, dtype=dtype)


def gpsa_macs(n, width, num_heads, **_):
  """MHSA's projections and products, plus the positional projection of every pair (3 MACs per
  head and pair)."""
  return projection_macs(n, width) + 2 * n * n * width + 3 * n * n * num_heads


@registry.register(
    "gpsa", caps=Capabilities(cls_probs="exact", size_semantics=False, needs_grid=True),
    paper="ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases "
          "(d'Ascoli et al. 2021)",
    official="https://github.com/facebookresearch/convit",
    complexity="O(N^2 D + N^2 H)", macs=gpsa_macs, macs_tolerance=0.3)
class GPSA(Attention):
  """Content attention gated per head with a learned positional attention on the patch grid."""
  locality_strength: float = 1.0

  def project(self, x):
    if self.qk_norm:
      raise ValueError("error: gpsa has no qk_norm (ConViT's GPSA normalises neither queries nor "
                       "keys); use qk_norm=False")
    b, n, width = x.shape
    d = self.head_dim(width)
    qk = nn.Dense(2 * width, use_bias=self.qkv_bias, dtype=self.dtype, name="qk")(x)
    q, k = (t.reshape(b, n, self.num_heads, d) for t in jnp.split(qk, 2, axis=-1))
    v = nn.Dense(width, use_bias=self.qkv_bias, kernel_init=identity_init, dtype=self.dtype,
                 name="v")(x)
    return q, k, v.reshape(b, n, self.num_heads, d)

  def mix(self, x, q, k, v, bias, ctx, *, need, deterministic):
    del x
    grid, npre = patch_grid(ctx, q.shape[1], "gpsa")
    pos_logits = nn.Dense(self.num_heads, kernel_init=local_init(self.locality_strength),
                          name="pos_proj")(jnp.asarray(relative_indices(grid)))
    pos_logits = jnp.pad(pos_logits.transpose(2, 0, 1).astype(jnp.float32),
                         ((0, 0), (npre, 0), (npre, 0)), constant_values=PAD_LOGIT)
    gate = jax.nn.sigmoid(self.param("gating_param", nn.initializers.ones, (self.num_heads,)))
    # prefix query rows take no positional part: their gate is 0
    gate = jnp.where(jnp.arange(q.shape[1]) < npre, 0.0, gate[:, None])[None, :, :, None]

    def weights(q, k, bias):
      content = softmax_weights(q, k, bias)
      pos = jax.nn.softmax(pos_logits if bias is None else pos_logits + bias, axis=-1)
      mixed = (1.0 - gate) * content + gate * pos
      return mixed / jnp.sum(mixed, axis=-1, keepdims=True)

    return self.attend(q, k, v, bias, ctx, need=need, deterministic=deterministic,
                       weights=weights)
