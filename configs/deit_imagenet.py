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

from vitjax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/16", batch=1024, dtype="bfloat16", epochs=300,
                             attention="mhsa", tokens="none", smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = config_lib.imagenet("decode|random_resized_crop(224)|flip_lr|normalize")
  config.image_size = 224
  config.model = dict(name="vit", variant=arg.variant, drop_path=0.1,
                      attention=dict(name=arg.attention), tokens=dict(name=arg.tokens))
  config.dtype = arg.dtype
  config.batch_size = arg.batch
  config.total_epochs = arg.epochs
  config.warmup_epochs = 5
  config.label_smoothing = 0.1
  config.optimizer = config_lib.deit_optimizer(lr=5e-4 * arg.batch / 512, min_lr=1e-5,
                                               weight_decay=0.05)
  config_lib.imagenet_bookkeeping(config, eval_every_epochs=10)
  config.keep_checkpoint_every_steps = None
  if arg.smoke:
    config_lib.steps_not_epochs(config, 4, warmup_steps=1)
  return config
