"""`ptq4vit`: PTQ4ViT's twin uniform quantization (Yuan et al. 2022, "PTQ4ViT: Post-Training
Quantization for Vision Transformers with Twin Uniform Quantization"; official code:
https://github.com/hahnyuan/PTQ4ViT).

Post-softmax (in [0, 1], most mass near 0) and post-GELU (a short negative tail, min -0.17)
activations get two uniform ranges of k-1 bits each, with scales a power of two apart so that
hardware aligns them with a shift:
  softmax  R1 = [0, split) with step split / 2^(k-1), R2 = [split, 1] with step 1 / (2^(k-1) - 1);
           split = 2^-m, m searched in 0..19;
  GELU     R1 = negatives with the fixed step 0.16997 / 2^(k-1) (GELU's minimum over the codes),
           R2 = positives with step alpha * max / (2^(k-1) - 1), alpha searched.
Every other site is symmetric uniform (codes -2^(k-1) .. 2^(k-1) - 1) with step
alpha * max|x| / (2^(k-1) - 0.5), alpha in linspace(0.01, 1.2, 100) (the official eq_alpha,
eq_beta, eq_n): weights per output channel, activations per tensor.
Deviations: the official search scores candidates by a Hessian-guided distance of the layer's
output (and alternates weight and activation scales over rounds); here each site's scale
minimises the squared error of that site's own tensor, in one round.
"""
import dataclasses

import jax
import jax.numpy as jnp

from vitjax.quant import registry
from vitjax.quant.base import Quantizer, round_clip

GELU_MIN = 0.16997124254703522  # -min_x x Phi(x)
ALPHAS = tuple(0.01 + i * (1.2 - 0.01) / 99 for i in range(100))
SPLITS = tuple(range(20))


def symmetric(x, step, bits: int):
  qmax = 2 ** (bits - 1)
  return round_clip(x / step, -qmax, qmax - 1) * step


def twin_softmax(x, split, bits: int):
  """Two ranges: [0, split) in steps split / 2^(k-1), the rest in steps 1 / (2^(k-1) - 1)."""
  qmax = 2 ** (bits - 1)
  low = round_clip(x / (split / qmax), 0, qmax - 1) * (split / qmax)
  high = round_clip(x * (qmax - 1), 0, qmax - 1) / (qmax - 1)
  return jnp.where(x < split, low, high)


def twin_gelu(x, pos_step, bits: int):
  """Negatives in the fixed steps GELU_MIN / 2^(k-1), positives in `pos_step`."""
  qmax = 2 ** (bits - 1)
  neg_step = GELU_MIN / qmax
  neg = round_clip(x / neg_step, -qmax, 0) * neg_step
  pos = round_clip(x / pos_step, 0, qmax - 1) * pos_step
  return jnp.where(x < 0, neg, pos)


def search(x, make, candidates, axis=None):
  """The candidate c minimising mean (x - make(c))^2 (per channel along `axis` if given); the
  first of equal errors. A scan over the candidates: one compiled step, any number of them."""
  def err_of(c):
    err = jnp.square(x - make(c))
    return err.mean() if axis is None else err.reshape(-1, x.shape[axis]).mean(0)

  cands = jnp.asarray(candidates, jnp.float32)
  first = err_of(cands[0])

  def step(carry, c):
    best, best_err = carry
    err = err_of(c)
    better = err < best_err
    return (jnp.where(better, c, best), jnp.where(better, err, best_err)), None

  (best, _), _ = jax.lax.scan(step, (jnp.full_like(first, cands[0]), first), cands[1:])
  return best


@registry.register(
    "ptq4vit",
    summary="twin uniform for post-softmax and post-GELU; symmetric scale search "
    "elsewhere",
    paper="PTQ4ViT (Yuan et al. 2022), twin uniform quantization",
    official="https://github.com/hahnyuan/PTQ4ViT")
class PTQ4ViT(Quantizer):
  """Twin uniform for post-softmax and post-GELU, symmetric scale search elsewhere."""
  needs_softmax = True
  uniform_dense_inputs = False  # fc2's input is twin uniform

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801
    attention_weights: str = "own"

  def calibrate_weight(self, w, bits: int) -> dict:
    base = jnp.abs(w).reshape(-1, w.shape[-1]).max(0) / (2 ** (bits - 1) - 0.5)
    base = jnp.maximum(base, 1e-8)
    alpha = search(w, lambda a: symmetric(w, a * base, bits), ALPHAS, axis=w.ndim - 1)
    step = alpha * base
    return {"scale": step, "zero": jnp.full_like(step, 2 ** (bits - 1))}

  def calibrate(self, kind: str, x, bits: int) -> dict:
    if kind == "softmax" and self.own_weights():
      m = search(x, lambda m: twin_softmax(x, 2.0 ** -m, bits), SPLITS)
      return {"split": 2.0 ** -m}
    if kind == "post_gelu":
      base = jnp.maximum(x.max(), 1e-8) / (2 ** (bits - 1) - 1)
      return {"pos_step": search(x, lambda a: twin_gelu(x, a * base, bits), ALPHAS) * base}
    base = jnp.maximum(jnp.abs(x).max(), 1e-8) / (2 ** (bits - 1) - 0.5)
    step = search(x, lambda a: symmetric(x, a * base, bits), ALPHAS) * base
    return {"scale": step, "zero": jnp.asarray(2.0 ** (bits - 1))}

  def quantize(self, kind: str, x, params: dict, bits: int):
    if "split" in params:
      return twin_softmax(x, params["split"], bits)
    if "pos_step" in params:
      return twin_gelu(x, params["pos_step"], bits)
    return super().quantize(kind, x, params, bits)
