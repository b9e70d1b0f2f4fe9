r"""Post-training quantization of an imported timm / big_vision ViT, RepQ-ViT's ImageNet protocol.

  python -m vitjax.evaluate --config=configs/quant_imagenet.py:method=repq_vit,bits=W4A4 \
      --checkpoint=/path/deit_small_patch16_224.safetensors \
      --config.data.data_dir=/path/to/tensorflow_datasets

Calibration: the first `calib` (32, as RepQ-ViT) images of the ImageNet train split with the
evaluation preprocessing; evaluation on the 50k validation images. Patch embedding and head stay
in full precision unless fp=none (fp=embedding or fp=head keeps one). integer=True runs the
quantized Dense layers as int8 matmuls (uniform quantizers: minmax, percentile, repq_vit,
fq_vit). The attention runs materialised (impl reference): the quantizers read its weights.

Expected (RepQ-ViT paper, DeiT-S, ImageNet val top-1): 69.03% at W4/A4, 78.90% at W6/A6 (full
precision 79.85%). This codebase's quantizer keeps the embedding and head in float by default,
where the paper quantizes the head and keeps the embedding's input at 8 bits: expect a small gap
in either direction. Not run here (no ImageNet on this machine).
Args: method (vitjax.quant.names()), bits=W4A4 (W8A8, W6A6, ...), calib=32, fp=embedding+head,
integer=False, reducer=none (evit / tome at blocks 3, 6, 9, keep_rate=0.7), batch=256,
smoke=True (the embedded digits and the checkpoint's tiny model, for tests).
"""
import ml_collections
from ml_collections import config_dict

from vitjax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="repq_vit", bits="W4A4", calib=32, fp="embedding+head",
                             integer=False, reducer="none", keep_rate=0.7, batch=256,
                             smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)
  config.data = dict(name="imagenet2012", data_dir=config_dict.placeholder(str),
                     train_split="train", eval_split="validation", pp_train="", worker_count=16,
                     pp_eval="decode|resize_small(256)|central_crop(224)|normalize")
  config.image_size = 224
  tokens = dict(name="none")
  if arg.reducer != "none":
    tokens = dict(name=arg.reducer, keep_rate=arg.keep_rate, locations=(3, 6, 9))
  config.model = dict(from_checkpoint=True, tokens=tokens, impl="reference")
  config.quant = dict(method=arg.method, bits=arg.bits, calib_images=arg.calib,
                      full_precision=tuple(x for x in arg.fp.split("+") if x and x != "none"),
                      integer=arg.integer)
  config.dtype = "float32"
  config.batch_size = arg.batch
  config.mesh = (("data", -1),)
  if arg.smoke:
    config.data.update(name="vitjax_digits", train_split="train", eval_split="test",
                       pp_eval="value_range(-1, 1)", worker_count=0)
    config.image_size = None
    if arg.reducer != "none":
      config.model.tokens.locations = (1,)
    config.batch_size = 120
  return config
