"""`percentile`: percentile range calibration (Wu et al. 2020, "Integer Quantization for Deep
Learning Inference: Principles and Empirical Evaluation", NVIDIA; its calibrators ship in
TensorRT's pytorch-quantization).

Weights: per output channel min-max, asymmetric (as `minmax`). Activations: per tensor,
asymmetric, the range [q(1 - p), q(p)] of the calibration tensor's quantiles, p = 0.9999 by
default (the paper's 99.99th percentile), so rare outliers are clipped instead of stretching
the grid. Valid with every attention.
Deviation: the paper's calibrator builds a histogram over many batches and clips |x| (one
symmetric range); here the quantiles are exact on the calibration tensor and the range is
two-sided, like the `minmax` baseline it replaces.
"""
import dataclasses

import jax.numpy as jnp

from vitjax.quant import registry
from vitjax.quant.base import QuantError, Quantizer, channel_minmax, minmax_params


@registry.register(
    "percentile",
    summary="activations clipped at the [1-p, p] quantiles (p = 0.9999)",
    paper="Wu et al. 2020, Integer Quantization for Deep Learning "
    "Inference (percentile calibration)",
    official="https://github.com/NVIDIA/TensorRT/tree/release/10.0/tools/"
    "pytorch-quantization")
class Percentile(Quantizer):
  """Per-tensor activation ranges at the p-th quantiles."""

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801
    p: float = 0.9999

  def __init__(self, **options):
    super().__init__(**options)
    if not 0.5 < self.opts.p <= 1.0:
      raise QuantError(f"percentile p={self.opts.p} is outside (0.5, 1]; e.g. 0.9999")

  def calibrate_weight(self, w, bits: int) -> dict:
    return minmax_params(*channel_minmax(w), bits)

  def calibrate(self, kind: str, x, bits: int) -> dict:
    flat = x.reshape(-1)
    return minmax_params(jnp.quantile(flat, 1.0 - self.opts.p), jnp.quantile(flat, self.opts.p),
                         bits)
