r"""Off-the-shelf token reduction: a training-free reducer (EViT, Top-K or ToMe) put into an
imported pretrained ViT/DeiT and evaluated as it is, without fine-tuning.

  python -m vitjax.evaluate --config=configs/offtheshelf.py:reducer=evit \
      --checkpoint=/path/deit_small_patch16_224.safetensors --keep_rates=1.0,0.9,0.7,0.5 \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python -m vitjax.evaluate --config=configs/offtheshelf.py:reducer=tome,r=16 \
      --checkpoint=/path/deit_small_patch16_224.safetensors

The architecture is read from the file (model.from_checkpoint=True: width, depth, heads, tokens,
pooling, position embedding layout; timm does not store the head count, so it follows the width
as in the standard variants). The reducer is the only change: EViT and Top-K prune by the [CLS]
attention at blocks 3, 6, 9 (keep_rate), ToMe merges r tokens per block (r) or reaches keep_rate
at those blocks. The table printed has top-1, top-5, throughput, GMACs and parameters per keep
rate. Only the validation split is needed (train_split points at it: nothing is trained).
--keep_rates sweeps evit/topk, and tome when r=0.

Expected on ImageNet-1k val (ToMe paper, off-the-shelf, timm weights): AugReg ViT-S/16
(vit_small_patch16_224.augreg_in21k_ft_in1k, inception_norm=True) 81.41 unreduced, 79.30 with ToMe
r=13 (proportional attention on, as ToMe does for timm models; DeiT-S MAC ratio 1.70 at r=13).
EViT/Top-K without fine-tuning lose more than EViT's fine-tuned 79.5 at keep rate 0.7 (DeiT-S,
configs/evit_finetune.py), which is their upper reference. Preprocessing here is
resize_small(256) + central_crop(224) with bilinear resizing, where timm uses bicubic with its
crop_pct: expect a few tenths of a point of difference from timm's own evaluation.

Args: reducer=evit (topk, tome, none), keep_rate=0.7, r=0 (ToMe tokens merged per block; 0: use
keep_rate), init_from=PATH (alternative to --checkpoint), inception_norm=False (True: inputs in
[-1, 1], for AugReg/big_vision weights), batch=256, smoke=True (the embedded digits and a tiny
model, for tests).
"""
import ml_collections
from ml_collections import config_dict

from vitjax import config_lib

REDUCERS = ("evit", "topk", "tome", "none")


def tokens_spec(reducer: str, keep_rate: float, r: int, locations) -> dict:
  if reducer not in REDUCERS:
    raise ValueError(f"offtheshelf reducer must be one of {REDUCERS}, got {reducer!r}")
  if reducer == "none":
    return dict(name="none")
  spec = dict(name=reducer)
  if reducer == "tome":
    spec["prop_attn"] = True  # ToMe's default for timm models
  if reducer == "tome" and r > 0:
    return dict(spec, r=r)
  return dict(spec, keep_rate=keep_rate, locations=tuple(locations))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, reducer="evit", keep_rate=0.7, r=0, init_from="", batch=256,
                             inception_norm=False, smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # overridable from the command line
  if arg.init_from:
    config.init_from = arg.init_from
  config.data = dict(name="imagenet2012", data_dir=config_dict.placeholder(str),
                     train_split="validation",
                     eval_split="validation", pp_train="", worker_count=16,
                     pp_eval="decode|resize_small(256)|central_crop(224)|"
                     + ("value_range(-1, 1)" if arg.inception_norm else "normalize"))
  config.image_size = 224
  config.model = dict(from_checkpoint=True,
                      tokens=tokens_spec(arg.reducer, arg.keep_rate, arg.r, (3, 6, 9)))
  config.dtype = "float32"
  config.batch_size = arg.batch
  config.mesh = (("data", -1),)
  if arg.smoke:
    config.data.update(name="vitjax_digits", train_split="test", eval_split="test",
                       pp_eval="value_range(-1, 1)", worker_count=0)
    config.image_size = None
    config.model.tokens = tokens_spec(arg.reducer, arg.keep_rate, arg.r, (1, 2, 3))
    config.batch_size = 120
  return config
