"""`repq_vit`: RepQ-ViT (Li et al. 2023, "RepQ-ViT: Scale Reparameterization for Post-Training
Quantization of Vision Transformers"; official code: https://github.com/zkkli/RepQ-ViT,
classification/).

  Post-LayerNorm activations (the inputs of qkv and fc1): calibrated per channel (scale s_c,
    zero point z_c), then reparameterised to one layer-wise scale s~ = mean(s), z~ = mean(z):
    with r = s / s~ and b = min_c / r - min~ (min_c = -z_c s_c, min~ = -z~ s~), the LayerNorm's
    affine becomes gamma / r, beta / r - b and the next linear layer W r (per input channel),
    bias + b (W r). The float network is unchanged (exact before rounding); the next layer's
    weights are recalibrated on W r.
  Post-softmax: the log-sqrt(2) quantizer, q = clip(round(-2 log2(p / d)), 0, 2^b - 1),
    p ~ d 2^(-q/2), and 0 where the rounded code reaches 2^b; d is the 0.999 / 0.9999 / 0.99999
    quantile of p with the least squared error.
  Elsewhere the official UniformQuantizer: asymmetric, the [1 - p, p] quantile range with the
    least squared error over p in {0.999, 0.9999, 0.99999}; weights per output channel,
    activations per tensor (query, key and value: the inputs of the two attention matmuls).
Calibration is one pass over the calibration images (32 in the paper) with quantization on, then
the reparameterisation, then the recalibration of the reparameterised layers' weights, as the
official test_quant.py does.
Deviations: the official model keeps the patch embedding's input at 8 bits and quantizes the
head; here both follow `QuantConfig.full_precision` (default: both in float). Only blocks whose
norm1 feeds a Dense named `qkv` (norm2: `fc1`) are reparameterised; others keep per-channel
post-LayerNorm scales.
"""
import dataclasses

import flax
import jax.numpy as jnp

from vitjax.quant import registry
from vitjax.quant.base import Quantizer, calibrate_weights, percentile_search, site_key

PCTS = (0.999, 0.9999, 0.99999)
PAIRS = (("norm1", ("attn", "qkv")), ("norm2", ("mlp", "fc1")))


def log_sqrt2(x, delta, bits: int):
  """RepQ-ViT's log-sqrt(2) quantizer of post-softmax values."""
  r = jnp.round(-2.0 * jnp.log2(jnp.maximum(x / delta, 1e-30)))
  q = jnp.clip(r, 0, 2 ** bits - 1)
  # 2^(-q/2) as 2^-ceil(q/2) * sqrt(2) for odd q: a shift and one constant in hardware
  y = 2.0 ** -jnp.ceil(q / 2) * jnp.where(q % 2 == 1, jnp.sqrt(2.0), 1.0) * delta
  return jnp.where(r >= 2 ** bits, 0.0, y)


def log_sqrt2_delta(x, bits: int):
  flat = x.reshape(-1)
  deltas = jnp.stack([jnp.quantile(flat, p) for p in PCTS])
  errs = jnp.stack([jnp.mean(jnp.square(flat - log_sqrt2(flat, d, bits))) for d in deltas])
  return deltas[jnp.argmin(errs)]  # the first of equal errors, as the official strict `<` keeps


def reparameterise_pair(norm: dict, dense: dict, act: dict):
  """(norm params, dense params, layer-wise act params) of one LayerNorm -> Dense pair."""
  s, z = act["scale"], act["zero"]
  s_t, z_t = jnp.mean(s), jnp.mean(z)
  r = s / s_t
  b = (-z * s) / r - (-z_t * s_t)
  new_norm = {"scale": norm["scale"] / r, "bias": norm["bias"] / r - b}
  kernel = dense["kernel"] * r[:, None]
  new_dense = dict(dense, kernel=kernel)
  new_dense["bias"] = dense.get("bias", 0.0) + b @ kernel
  return new_norm, new_dense, {"scale": s_t, "zero": z_t}


@registry.register(
    "repq_vit",
    summary="per-channel post-LayerNorm scales reparameterised into the LayerNorm and "
    "the next layer; log-sqrt(2) softmax; percentile-search uniform elsewhere",
    paper="RepQ-ViT (Li et al. 2023), scale reparameterisation and "
    "log-sqrt(2) softmax", official="https://github.com/zkkli/RepQ-ViT")
class RepQViT(Quantizer):
  """Per-channel post-LayerNorm scales folded into the LayerNorm and the next layer."""
  needs_softmax = True

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801
    attention_weights: str = "own"

  def calibrate(self, kind: str, x, bits: int) -> dict:
    if kind == "softmax" and self.own_weights():
      return {"delta": log_sqrt2_delta(x, bits)}
    if kind == "post_ln":
      return percentile_search(x, bits, PCTS, axis=x.ndim - 1)
    return percentile_search(x, bits, PCTS)

  def quantize(self, kind: str, x, params: dict, bits: int):
    if "delta" in params:
      return log_sqrt2(x, params["delta"], bits)
    return super().quantize(kind, x, params, bits)

  def reparameterise(self, model, params, state, images, cfg):
    params = flax.core.unfreeze(params)
    params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in params.items()}
    changed = []
    for block in sorted(k for k in params if k.startswith("block_")):
      p = params[block]
      for norm_name, (parent, dense_name) in PAIRS:
        key = site_key((block, parent, dense_name), "post_ln")
        if norm_name not in p or dense_name not in p.get(parent, {}) or key not in state["acts"]:
          continue
        norm, dense, act = reparameterise_pair(p[norm_name], p[parent][dense_name],
                                               state["acts"][key])
        p = dict(p, **{norm_name: norm, parent: dict(p[parent], **{dense_name: dense})})
        state["acts"] = dict(state["acts"], **{key: act})
        changed.append(f"{block}/{parent}/{dense_name}/kernel")
      params[block] = p
    state["weights"] = dict(state["weights"], **calibrate_weights(
        params, cfg, self, [c for c in changed if c in state["weights"]]))
    return params, state

