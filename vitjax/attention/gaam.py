"""G19 `gaam`: Gaussian Adaptive Attention (Ioannides et al. 2024).

Not a pairwise attention: along the normalised axis (tokens here) each channel gets
  mu, var = mean and unbiased variance over the axis (+ eps),
  G_g = exp(-((x - (mu + delta_g)) / sqrt(var))^2 / (2 c_g^2)) / sqrt(2 pi c_g^2), g = 1..num_gaussians,
  M = prod_g G_g / sum_axis prod_g G_g,   GAAM(x) = x * M,
with learned offsets delta (init 0) and scales c (init standard normal, only |c| matters), as in the
official code (https://github.com/gioannides/Gaussian-Adaptive-Attention; eps 1e-8; the product
over Gaussians and the normalisation along the axis follow it). "Multi-head" gives each head its
own (delta, c):
  head_axis="channels" (default, own design): heads split the channels; statistics stay over all
      tokens, so the layer is permutation-equivariant over tokens and works on any token set;
  head_axis="tokens" (official): heads split the normalised (token) axis into chunks (the last chunk
      takes the remainder), which ties the result to token order and count.
How it sits in a ViT block (the abstract says only "compatible with dot-product attention"):
  mode="gate" (default): x' = x + GAAM(x) (the official GaussianBlock residual), then softmax MHSA;
  mode="mixer": y = W_o GAAM(x), no pairwise attention at all.
Capabilities are declared for the weakest mode: no [CLS] probabilities, no keys, no key bias or mask
(the statistics would include masked tokens), no size semantics. num_gaussians = 4 is our choice.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from vitjax.attention import registry
from vitjax.attention.base import Attention, AttnContext, Capabilities, quadratic_macs


def gaussian_mixture(x, offsets, scales, eps: float = 1e-8):
  """x [..., n, c] normalised over axis -2; offsets/scales [G] -> x * M (float32)."""
  x = x.astype(jnp.float32)
  mean = x.mean(-2, keepdims=True)
  var = x.var(-2, keepdims=True, ddof=1) + eps
  mix = 1.0
  for g in range(offsets.shape[0]):
    y = (x - (mean + offsets[g])) / jnp.sqrt(var)
    c2 = scales[g] ** 2
    mix = mix * jnp.exp(-(y ** 2) / (2.0 * c2)) / jnp.sqrt(2 * jnp.pi * c2)
  mix = mix / jnp.maximum(mix.sum(-2, keepdims=True), eps)
  return x * mix


def chunks(size: int, parts: int) -> list:
  """Official chunking of an axis: equal chunks, the last one takes the remainder."""
  step = size // parts
  if step == 0:
    raise ValueError(f"gaam cannot split {size} tokens into {parts} heads")
  return [(i * step, (i + 1) * step if i < parts - 1 else size) for i in range(parts)]


class GAAM(nn.Module):
  """Multi-head Gaussian adaptive reweighting of x [B, N, D] along the token axis."""
  num_heads: int
  num_gaussians: int = 4
  head_axis: str = "channels"
  eps: float = 1e-8

  @nn.compact
  def __call__(self, x):
    shape = (self.num_heads, self.num_gaussians)
    offsets = self.param("mean_offsets", nn.initializers.zeros, shape)
    scales = self.param("c", nn.initializers.normal(1.0), shape)
    axis = {"channels": -1, "tokens": -2}.get(self.head_axis)
    if axis is None:
      raise ValueError(f"unknown head_axis {self.head_axis!r}; valid: channels, tokens")
    out = [gaussian_mixture(x[:, lo:hi] if axis == -2 else x[..., lo:hi], offsets[i], scales[i],
                            self.eps)
           for i, (lo, hi) in enumerate(chunks(x.shape[axis], self.num_heads))]
    return jnp.concatenate(out, axis=axis)


def gaam_macs(n, width, num_heads, *, mode, **_):
  """Gate mode: MHSA's after the mixture; mixer mode: the output projection only. The mixture
  itself is elementwise (its ~G x 10 operations per entry are in the registered tolerance)."""
  return quadratic_macs(n, width, num_heads) if mode == "gate" else n * width * width


# no reducer signals, no key bias: see the module docstring
GAAM_CAPS = Capabilities(cls_probs="none", key_metric=False, size_semantics=False, key_bias=False,
                         full_attn=False)


@registry.register("gaam", caps=GAAM_CAPS,
                   paper="Gaussian Adaptive Attention is All You Need (Ioannides et al. 2024)",
                   official="https://github.com/gioannides/Gaussian-Adaptive-Attention",
                   complexity="O(N D G) (+ MHSA in gate mode)", macs=gaam_macs)
class GaussianAdaptive(Attention):
  """GAAM as a gate in front of softmax attention, or as a standalone token-wise mixer."""
  num_gaussians: int = 4
  head_axis: str = "channels"
  mode: str = "gate"
  gaam_heads: Optional[int] = None  # default: num_heads

  @nn.compact
  def __call__(self, x, ctx: Optional[AttnContext] = None, *, need=(), deterministic=True):
    if ctx is not None and (ctx.key_bias is not None or ctx.valid is not None):
      raise ValueError("gaam cannot take a key bias or key mask (its statistics span all tokens)")
    if need:
      raise ValueError(f"gaam provides no reducer signals, asked for {sorted(need)}")
    if self.mode not in ("gate", "mixer"):
      raise ValueError(f"unknown gaam mode {self.mode!r}; valid: gate, mixer")
    gaam = GAAM(self.gaam_heads or self.num_heads, self.num_gaussians, self.head_axis,
                name="gaam")
    if self.mode == "mixer":
      return self.project_out(gaam(x).astype(x.dtype), x.shape[-1], deterministic), {}
    x = x + gaam(x).astype(x.dtype)
    q, k, v = self.project(x)
    y, _ = self.attend(q, k, v, None, None, need=(), deterministic=deterministic)
    return self.project_out(y, x.shape[-1], deterministic), {}
