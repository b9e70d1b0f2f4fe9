"""`i_vit`: I-ViT's integer-only operators (Li & Gu 2023, "I-ViT: Integer-only Quantization for
Efficient Vision Transformer Inference", ICCV; official code: https://github.com/zkkli/I-ViT,
models/quantization_utils/quant_modules.py and quant_utils.py).

Each non-linear operator works on integer codes x_int (x = s x_int) with integer adds, shifts
(floor division by powers of two) and one integer division:
  i-exp (shift)  x_int + floor(x_int / 2) - floor(x_int / 16) ~ x log2(e) / s; with
                 x0 = floor(-1 / s), x clamped at n x0, q = floor(x / x0), r = x - x0 q:
                 exp_int = max(floor((r / 2 - x0) 2^(n - q)), 0) at scale s / 2^n.
  Shiftmax       i-exp of x_int - max (n = 15), sum clamped at 2^31 - 1, factor =
                 floor((2^31 - 1) / sum), out = floor(exp factor / 2^(31 - b + 1)) at 1 / 2^(b-1);
                 b = 16 for the attention weights (the official IntSoftmax(16)).
  ShiftGELU      x sigmoid(1.702 x): the sigmoid as i-exp(x - max) / (i-exp(x - max) +
                 i-exp(-max)) with n = 23 and max the row's maximum (last axis, as the official);
                 out = x_int sig_int at s / 2^(b-1), b = 8.
  I-LayerNorm    mean = round(mean x_int), var = sum (x_int - mean)^2, std by the official
                 integer iteration k <- floor((k + floor(var / k)) / 2) ten times from 2^16,
                 y = floor((x_int - mean) floor((2^31 - 1) / std) / 2) at sqrt(D) / 2^30,
                 plus floor(beta / gamma / that scale), times gamma.
  Dyadic requantization  z_int s_in -> round(z_int m / 2^e) at s_out, m / 2^e = s_in / s_out
                 (the official fixedpoint_mul / batch_frexp).
Weights: symmetric per output channel, max|w| / (2^(b-1) - 1) (QuantLinear); activations:
symmetric per tensor, max|x| / (2^(b-1) - 1) (QuantAct); LayerNorm inputs (the residual stream)
at 16 bits (QuantAct(16)).

Deviations (named): (1) fake-quant between the operators: each site's float value is quantized
on arrival, which equals the official dyadic requantization up to its 2^-15 mantissa rounding
(`dyadic_requant` is exact integer arithmetic here, tested against round(x s_in / s_out)); the
mantissa has 15 bits, not 31, so that products of 16-bit codes stay in int32 (JAX without x64),
and it rounds half up. (2) The framework sees the softmax's output p, not its input: Shiftmax
reads x - max(x) = log p - log max(p) (exact up to float rounding; p that underflows to 0 reads
as the clamp n x0), quantized at a_bits with scale max|x - max| / (2^(b-1) - 1) instead of the
official 8-bit max|x| / 127 of the logits. (3) ShiftGELU reads fc1's output (the official
qact_gelu: fc1's output quantized at 8 bits) stashed by the quantized apply. (4) Calibration is
one min-max pass, not the official running min-max with momentum 0.95 over batches. (5) The
official model quantizes the patch embedding's input and the head; here `full_precision` says.
"""
import dataclasses

import jax.numpy as jnp

from vitjax.quant import registry
from vitjax.quant.base import Quantizer, symmetric_params, uniform

SOFTMAX_N, GELU_N = 15, 23  # the official "sufficiently large integer" of each i-exp
SOFTMAX_BITS, GELU_BITS, NORM_BITS = 16, 8, 16
INT31 = 2 ** 31 - 1
MANTISSA_BITS = 15


def floor_div(a, b):
  return jnp.floor(a / b)


def int_exp_shift(x_int, scale, n: int):
  """(exp_int, out scale): e^(s x) for x_int <= 0 by shifts (the official int_exp_shift)."""
  x_int = x_int + floor_div(x_int, 2) - floor_div(x_int, 2 ** 4)
  x0 = jnp.floor(-1.0 / scale)
  x_int = jnp.maximum(x_int, n * x0)
  q = floor_div(x_int, x0)
  r = x_int - x0 * q
  exp_int = jnp.maximum(jnp.floor((r / 2 - x0) * 2.0 ** (n - q)), 0)
  return exp_int, scale / 2 ** n


def shiftmax(x_int, scale, out_bits: int = SOFTMAX_BITS):
  """Integer softmax over the last axis: codes at scale 1 / 2^(b-1)."""
  x_int = x_int - x_int.max(axis=-1, keepdims=True)
  exp_int, _ = int_exp_shift(x_int, scale, SOFTMAX_N)
  total = jnp.minimum(exp_int.sum(axis=-1, keepdims=True), INT31)
  factor = jnp.floor(INT31 / total)
  return jnp.floor(exp_int * factor / 2 ** (31 - out_bits + 1))


def shift_gelu(x_int, scale, out_bits: int = GELU_BITS):
  """(codes, out scale) of x sigmoid(1.702 x) with the sigmoid by i-exp."""
  s_sig = scale * 1.702
  x_max = x_int.max(axis=-1, keepdims=True)
  exp_int, _ = int_exp_shift(x_int - x_max, s_sig, GELU_N)
  exp_max, _ = int_exp_shift(-x_max, s_sig, GELU_N)
  total = jnp.minimum(exp_int + exp_max, INT31)
  factor = jnp.floor(INT31 / total)
  sig_int = jnp.floor(exp_int * factor / 2 ** (31 - out_bits + 1))
  return x_int * sig_int, scale / 2 ** (out_bits - 1)


def int_sqrt(v, iterations: int = 10):
  """floor-Newton iteration from 2^16, as the official I-LayerNorm."""
  k = jnp.full_like(v, 2.0 ** 16)
  for _ in range(iterations):
    k = jnp.floor((k + jnp.floor(v / k)) / 2)
  return k


def i_layernorm(x_int, gamma, beta):
  """Float output of I-LayerNorm over the last axis (codes times sqrt(D) / 2^30 gamma)."""
  dim = x_int.shape[-1]
  mean = jnp.round(x_int.mean(axis=-1, keepdims=True))
  y = x_int - mean
  std = jnp.maximum(int_sqrt(jnp.sum(y * y, axis=-1, keepdims=True)), 1)  # 0 for a flat row
  y = jnp.floor(y * jnp.floor(INT31 / std) / 2)
  scale = jnp.sqrt(jnp.float32(dim)) / 2 ** 30
  y = y + jnp.floor(beta / gamma / scale)
  return y * scale * gamma


def dyadic(ratio, bits: int = MANTISSA_BITS):
  """(m, e) integers with m / 2^e ~ ratio, m < 2^bits (frexp, mantissa rounded half up)."""
  mant, exp = jnp.frexp(jnp.asarray(ratio, jnp.float32))
  m = jnp.floor(mant * 2 ** bits + 0.5).astype(jnp.int32)
  return m, (bits - exp).astype(jnp.int32)


def dyadic_requant(z_int, s_in, s_out, bits: int):
  """Integer codes at s_in -> symmetric b-bit codes at s_out: (z m + 2^(e-1)) >> e, clipped."""
  m, e = dyadic(s_in / s_out)
  z = jnp.asarray(z_int, jnp.int32)
  out = jnp.right_shift(z * m + jnp.left_shift(1, e - 1), e)
  return jnp.clip(out, -2 ** (bits - 1), 2 ** (bits - 1) - 1)


def codes(x, params):
  return jnp.round(x / params["scale"])


@registry.register(
    "i_vit",
    summary="integer-only Shiftmax, ShiftGELU and I-LayerNorm (integer sqrt) on the "
    "codes; symmetric min-max elsewhere, LayerNorm inputs at 16 bits",
    paper="I-ViT (Li & Gu 2023), Shiftmax, ShiftGELU, I-LayerNorm",
    official="https://github.com/zkkli/I-ViT")
class IViT(Quantizer):
  """Symmetric min-max sites; Shiftmax, ShiftGELU and I-LayerNorm on integer codes."""
  needs_softmax = True
  quantizes_norm_inputs = True
  replaces_gelu = True

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801
    attention_weights: str = "own"

  def calibrate_weight(self, w, bits: int) -> dict:
    return symmetric_params(jnp.abs(w).reshape(-1, w.shape[-1]).max(0), bits)

  def calibrate(self, kind: str, x, bits: int) -> dict:
    if kind == "softmax" and self.own_weights():
      d = softmax_input(x)
      return {"shiftmax": symmetric_params(jnp.abs(d).max(), bits)["scale"]}
    if kind == "norm_input":
      return symmetric_params(jnp.abs(x).max(), NORM_BITS)
    return symmetric_params(jnp.abs(x).max(), bits)

  def quantize(self, kind: str, x, params: dict, bits: int):
    if "shiftmax" in params:
      s = params["shiftmax"]
      d = jnp.clip(jnp.round(softmax_input(x) / s), -2.0 ** bits + 1, 0)
      return shiftmax(d, s) / 2 ** (SOFTMAX_BITS - 1)
    if kind == "norm_input":
      return uniform(x, params["scale"], params["zero"], NORM_BITS)
    return super().quantize(kind, x, params, bits)

  def layer_norm(self, x, params: dict, gamma, beta):
    """I-LayerNorm of the (quantized) LayerNorm input x."""
    return i_layernorm(codes(x, params), gamma, beta)

  def gelu(self, x, params: dict):
    """ShiftGELU of fc1's (quantized) output x."""
    out, scale = shift_gelu(codes(x, params), params["scale"])
    return out * scale


def softmax_input(p):
  """x - max(x) of the softmax that gave p (log p - log max p)."""
  logp = jnp.log(jnp.maximum(p, 1e-30))
  return logp - logp.max(axis=-1, keepdims=True)
