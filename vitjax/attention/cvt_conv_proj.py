"""S11 `cvt_conv_proj`: CvT's convolutional projection (Wu et al. 2021, "CvT: Introducing
Convolutions to Vision Transformers"), following the official code
(https://github.com/microsoft/CvT, lib/models/cls_cvt.py: `Attention` with method 'dw_bn').

For each of q, k and v the patch tokens are put back on their h x w grid and go through their own
depthwise k x k convolution (no bias, padding k // 2; stride 1 for q, `stride_kv` for k and v)
and BatchNorm (`conv_proj_{q,k,v}/conv`, `/bn`), are flattened in raster order, and the prefix
tokens ([CLS]: CvT's last stage) are put in front unconvolved; then separate Linear projections
`proj_q`, `proj_k`, `proj_v` (biases per `qkv_bias`), softmax attention of the n queries over the
1 + ceil(h / s) ceil(w / s) keys, and the output projection `proj`:
  y = proj(concat_h softmax(q_h k_h^T * D^-1/2) v_h).
The scale is the official one: the full width D (`dim_out ** -0.5`), not the head width d.
Defaults: kernel 3, stride_kv 2 (every CvT model). impl: the softmax core's paths (q carries
H^-1/2, so that the core's d^-1/2 makes the official D^-1/2).

BatchNorm: PyTorch's momentum 0.1 (flax's 0.9) and epsilon 1e-5; the running statistics live in
the `batch_stats` collection; training (deterministic=False) normalises with the batch statistics
and updates the running ones, evaluation uses the running ones (as the official eval mode).

Deviations (own design, also in the README): several prefix tokens (registers) all skip the
convolution, as CvT's single [CLS] does. The layer's [CLS] row is over the strided keys, not the
tokens, so it gives none (`cls_probs="none"`) and takes no key bias or mask: reducers that read
the attention are refused when the model is built. PyTorch updates its running variance with the
unbiased batch variance, flax with the biased one (n / (n - 1) apart; the same in evaluation).
"""
import math

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import SOFTMAX_IMPLS, Attention, AttnContext, Capabilities
from vitjax.attention.spatial import patch_grid

BN_MOMENTUM = 0.9  # flax's convention for PyTorch's BatchNorm momentum 0.1
BN_EPSILON = 1e-5


def strided(grid, stride: int) -> tuple:
  """The grid after a stride-s convolution with padding k // 2 (odd k): ceil(side / s)."""
  return tuple(-(-g // stride) for g in grid)


def cvt_macs(n, width, num_heads, *, kernel_size, stride_kv, num_prefix=1, grid=None, **_):
  """The official count (`Attention.compute_macs`) without its biases: the depthwise convs (k^2 D
  per output position), proj_q and proj on the n tokens, proj_k and proj_v on the m keys,
  Q K^T and P V (2 n m D). A square grid unless `grid` is given."""
  del num_heads
  if grid is None:
    side = math.isqrt(n - num_prefix)
    grid = (side, side)
  patches = grid[0] * grid[1]
  kv = math.prod(strided(grid, stride_kv))
  m = num_prefix + kv
  convs = kernel_size ** 2 * width * (patches + 2 * kv)
  return convs + 2 * n * width * width + 2 * m * width * width + 2 * n * m * width


# The [CLS] row is over the strided keys: none to give; the keys are not the tokens'.
CAPS = Capabilities(cls_probs="none", key_metric=False, size_semantics=False, key_bias=False,
                    needs_grid=True, full_attn=False)


class ConvProjection(nn.Module):
  """[B, h, w, D] -> [B, h' w', D]: depthwise conv (no bias) + BatchNorm, flattened."""
  kernel_size: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, img, deterministic: bool):
    k, pad, c = self.kernel_size, self.kernel_size // 2, img.shape[-1]
    y = nn.Conv(c, (k, k), strides=self.stride, padding=((pad, pad), (pad, pad)),
                feature_group_count=c, use_bias=False, dtype=self.dtype, name="conv")(img)
    y = nn.BatchNorm(use_running_average=deterministic, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, name="bn")(y)
    return y.reshape(y.shape[0], -1, c)


@registry.register(
    "cvt_conv_proj", caps=CAPS,
    paper="CvT: Introducing Convolutions to Vision Transformers (Wu et al. 2021)",
    official="https://github.com/microsoft/CvT",
    complexity="O(N N/s^2 D) + k^2 N D (convs)", impls=SOFTMAX_IMPLS, macs=cvt_macs)
class CvtConvProj(Attention):
  """Softmax attention whose q, k, v come from depthwise conv + BatchNorm of the patch grid (k and
  v strided), scaled by the full width."""
  kernel_size: int = 3
  stride_kv: int = 2

  @nn.compact
  def __call__(self, x, ctx=None, *, need=(), deterministic=True):
    ctx = AttnContext() if ctx is None else ctx
    self.check(need, ctx)
    b, n, width = x.shape
    d, h = self.head_dim(width), self.num_heads
    grid, npre = patch_grid(ctx, n, "cvt_conv_proj")
    prefix, img = x[:, :npre], x[:, npre:].reshape(b, *grid, width)

    def project(kind, stride):
      conv = ConvProjection(self.kernel_size, stride, self.dtype, name=f"conv_proj_{kind}")
      t = jnp.concatenate([prefix, conv(img, deterministic).astype(x.dtype)], axis=1)
      t = nn.Dense(width, use_bias=self.qkv_bias, dtype=self.dtype, name=f"proj_{kind}")(t)
      return t.reshape(b, t.shape[1], h, d)

    q, k, v = project("q", 1), project("k", self.stride_kv), project("v", self.stride_kv)
    # the official scale D^-1/2 = d^-1/2 H^-1/2: q takes H^-1/2, the softmax core its d^-1/2
    q = q * jnp.asarray(h ** -0.5, q.dtype)
    y, _ = self.attend(q, k, v, None, ctx, need=(), deterministic=deterministic)
    return self.project_out(y, width, deterministic), {}

  def check(self, need, ctx):
    if need:
      raise ValueError(f"error: cvt_conv_proj gives none of {sorted(need)}; its [CLS] row and "
                       "keys are over the strided keys, not the tokens")
    if ctx.key_bias is not None or ctx.valid is not None:
      raise ValueError("error: cvt_conv_proj takes no key bias or mask (its keys are strided "
                       "convolutions of the grid); use it before any token reduction")
    if self.qk_norm:
      raise ValueError("error: cvt_conv_proj has no qk_norm (CvT normalises neither queries nor "
                       "keys); use qk_norm=False")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0 or self.stride_kv < 1:
      raise ValueError(f"error: cvt_conv_proj kernel_size={self.kernel_size}, stride_kv="
                       f"{self.stride_kv}; the kernel is an odd int >= 1 (padding k // 2 keeps "
                       "the query grid) and the stride an int >= 1")
