r"""DeiT-S/16 on ImageNet-1k with the optimizer numbers of the DeiT recipe.

  python main.py --config=configs/deit_imagenet.py --workdir=DIR \
      --config.data.data_dir=/path/to/tensorflow_datasets

Recipe (Touvron et al. 2021, Table 9): AdamW, lr 5e-4 x batch/512, weight decay 0.05, cosine,
5 warm-up epochs, 300 epochs, label smoothing 0.1, drop-path 0.1, batch 1024.
Expected: 79.8% top-1 (DeiT-S) with the full recipe; RandAugment, mixup/cutmix, random erasing and
repeated augmentation are part of that recipe. Without them expect a few points less.
Args: variant=S/16 (Ti/16, B/16), batch=1024, dtype=bfloat16, smoke=True (4 steps, for tests).
"""
import ml_collections
from ml_collections import config_dict

from vitjax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/16", batch=1024, dtype="bfloat16", epochs=300,
                             attention="mhsa", tokens="none", smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(
      name="imagenet2012", data_dir=config_dict.placeholder(str),
      train_split="train", eval_split="validation",
      pp_train="decode|random_resized_crop(224)|flip_lr|normalize",
      pp_eval="decode|resize_small(256)|central_crop(224)|normalize", worker_count=16)
  config.image_size = 224
  config.model = dict(name="vit", variant=arg.variant, drop_path=0.1,
                      attention=dict(name=arg.attention), tokens=dict(name=arg.tokens))
  config.dtype = arg.dtype
  config.batch_size = arg.batch
  config.total_epochs = arg.epochs
  config.warmup_epochs = 5
  config.label_smoothing = 0.1
  config.optimizer = dict(name="adamw", lr=5e-4 * arg.batch / 512, weight_decay=0.05,
                          schedule="cosine", min_lr=1e-5, b1=0.9, b2=0.999, eps=1e-8,
                          clip_norm=None, grad_accum_steps=1)
  config.mesh = (("data", -1),)
  config.sharding = "dp"
  config.log_every_steps = 100
  config.eval_every_epochs = 10
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3
  config.keep_checkpoint_every_steps = None
  if arg.smoke:
    config.total_epochs, config.total_steps = None, 4
    config.warmup_epochs, config.warmup_steps = None, 1
    config.eval_every_epochs = config.checkpoint_every_epochs = None
    config.eval_every_steps = config.checkpoint_every_steps = 4
  return config
