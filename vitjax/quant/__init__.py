"""Post-training quantization of ViTs: quantizers in a registry, one file per method.

  qmodel, params = quant.quantize(model, params, calib_images, dict(method="repq_vit",
                                                                     bits="W4A4"))
  logits, out = qmodel.apply({"params": params}, images)
"""
from vitjax.quant import registry
from vitjax.quant.base import (BIT_WIDTHS, FP_LAYERS, QuantConfig, QuantError,  # noqa: F401
                               QuantizedModel, calibrate, from_config, kept_overlap, make_config,
                               quantize, quantized_apply, restore, save)
# registration order = the README table's order
from vitjax.quant import minmax, percentile, ptq4vit, repq_vit, fq_vit, i_vit  # noqa: F401,E402

get = registry.get
names = registry.names
