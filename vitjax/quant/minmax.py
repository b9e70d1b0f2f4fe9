"""`minmax`: the min-max baseline of uniform affine quantization (Jacob et al. 2018, "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference"; the range
calibration of TensorFlow Lite and of the PTQ baselines in the ViT papers).

Weights: per output channel, asymmetric, [min, max] of the channel onto 0 .. 2^b - 1.
Activations: per tensor, asymmetric, [min, max] over the calibration images. Every site alike,
softmax weights included, so it is valid with every attention.
Official code: none is followed (a textbook quantizer); it is the reference the others improve on.
"""
import dataclasses

from vitjax.quant import registry
from vitjax.quant.base import Quantizer, channel_minmax, minmax_params


@registry.register(
    "minmax",
    summary="min-max ranges; weights asymmetric per channel, activations per tensor",
    paper="Jacob et al. 2018 (uniform affine quantization, min-max "
    "ranges)")
class MinMax(Quantizer):
  """Min-max ranges everywhere."""

  @dataclasses.dataclass(frozen=True)
  class options_cls:  # noqa: N801
    pass

  def calibrate_weight(self, w, bits: int) -> dict:
    return minmax_params(*channel_minmax(w), bits)

  def calibrate(self, kind: str, x, bits: int) -> dict:
    return minmax_params(x.min(), x.max(), bits)
