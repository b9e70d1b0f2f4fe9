"""`fq_vit`: FQ-ViT (Lin et al. 2022, "FQ-ViT: Post-Training Quantization for Fully Quantized
Vision Transformer"; official code: https://github.com/megvii-research/FQ-ViT).

  Power-of-Two Factor (PTF) for LayerNorm inputs: one layer-wise min-max scale s (8 bits over
    the whole tensor) divided by 2^K (K = 3), and per channel c a factor 2^a_c, a_c in 0..K, the
    one with the least squared error of that channel (ties: the smaller); one zero point.
  Log-Int-Softmax (LIS): attention weights p -> q = clip(round(-log2 p), 0, 2^b - 1), p ~ 2^-q,
    and 0 where round(-log2 p) >= 2^b; b = 4 (the official uint4 for the softmax output).
  Elsewhere the official min-max observers: weights int8-style symmetric per output channel
    (scale max|w| / ((2^b - 1) / 2), codes -2^(b-1) .. 2^(b-1) - 1), activations asymmetric per
    tensor (scale (max - min) / (2^b - 1), zero point -round(min / s)).
Deviations: the official model quantizes each layer's *output* (q, k and v as one qkv tensor;
fc1 before GELU); here the inputs of every matmul are quantized, as for the other methods. LIS
is simulated on the float softmax: the integer i-exp polynomial that feeds it in the official
IntSoftmax is not used, nor the 16-bit quantized softmax input.
"""
import dataclasses

import jax.numpy as jnp

from vitjax.quant import registry
from vitjax.quant.base import Quantizer, QuantError, channel_minmax, minmax_params, uniform


def log2_quant(x, bits: int):
  """FQ-ViT's log2 quantizer of softmax weights (no scale: weights are at most 1)."""
  r = jnp.round(-jnp.log2(jnp.maximum(x, 1e-30)))
  q = jnp.clip(r, 0, 2 ** bits - 1)
  return jnp.where(r >= 2 ** bits, 0.0, 2.0 ** -q)


def ptf_params(x, bits: int, k: int = 3) -> dict:
  """Layer-wise range, per-channel power-of-two factors (last axis = channels)."""
  base = minmax_params(x.min(), x.max(), bits)
  s1 = base["scale"] / 2 ** k
  cols = x.reshape(-1, x.shape[-1])
  errs = jnp.stack([jnp.mean(jnp.square(cols - uniform(cols, s1 * 2 ** a, base["zero"], bits)), 0)
                    for a in range(k + 1)])
  return {"scale": s1 * 2.0 ** jnp.argmin(errs, axis=0), "zero": base["zero"]}


@registry.register(
    "fq_vit",
    summary="power-of-two factor for LayerNorm inputs; log2 (4-bit) softmax; min-max "
    "elsewhere",
    paper="FQ-ViT (Lin et al. 2022), power-of-two factor and "
    "log-int-softmax", official="https://github.com/megvii-research/FQ-ViT")
class FQViT(Quantizer):
  """PTF at LayerNorm inputs, log2 softmax, min-max elsewhere."""
  needs_softmax = True
  quantizes_norm_inputs = True

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801
    softmax_bits: int = 4
    ptf_k: int = 3
    attention_weights: str = "own"

  def __init__(self, **options):
    super().__init__(**options)
    if not 1 <= self.opts.softmax_bits <= 8 or not 0 <= self.opts.ptf_k <= 7:
      raise QuantError(f"fq_vit softmax_bits={self.opts.softmax_bits} (1..8) or ptf_k="
                       f"{self.opts.ptf_k} (0..7) out of range")

  def calibrate_weight(self, w, bits: int) -> dict:
    lo, hi = channel_minmax(w)
    scale = jnp.maximum(jnp.maximum(-lo, hi) / ((2 ** bits - 1) / 2), 1e-8)
    return {"scale": scale, "zero": jnp.full_like(scale, 2 ** (bits - 1))}

  def calibrate(self, kind: str, x, bits: int) -> dict:
    if kind == "softmax" and self.own_weights():
      return {"log2": jnp.asarray(self.opts.softmax_bits, jnp.int32)}
    if kind == "norm_input":
      return ptf_params(x, bits, self.opts.ptf_k)
    return minmax_params(x.min(), x.max(), bits)

  def quantize(self, kind: str, x, params: dict, bits: int):
    if "log2" in params:
      return log2_quant(x, self.opts.softmax_bits)
    return super().quantize(kind, x, params, bits)
