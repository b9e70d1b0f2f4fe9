r"""EViT-DeiT-S trained from scratch on ImageNet-1k with the DeiT recipe (EViT's main setting).

  python main.py --config=configs/evit_scratch.py:keep_rate=0.7 --workdir=DIR \
      --config.data.data_dir=/path/to/tensorflow_datasets

Recipe (DeiT, Touvron et al. 2021; EViT, Liang et al. 2022): 300 epochs, batch 2048, AdamW with lr
5e-4 x batch/512, cosine to 1e-5 after 5 warm-up epochs, weight decay 0.05; RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode), mixup 0.8 / cutmix 1.0 (switch 0.5) with
label smoothing 0.1, repeated augmentation x3, drop-path 0.1, EMA 0.99996. EViT reorganises the
tokens at blocks 3, 6 and 9 (0-indexed) with fusion; the keep rate is 1 for the first 10 epochs,
then follows a cosine ramp to its target over 100 epochs, quantised into at most 16 compiled
step shapes (the reducer's `warmup` option).

Expected (EViT paper, DeiT-S at 224 px): top-1 79.5 / top-5 94.8 at keep rate 0.7 (3.0 GMACs),
78.5 / 94.2 at keep rate 0.5 (2.3 GMACs); plain DeiT-S is 79.8 at 4.6 GMACs. Evaluate with
  python -m vitjax.evaluate --config=configs/evit_scratch.py:keep_rate=0.7 --checkpoint=DIR

Deviation: the warm-up starts at lr 0 rather than DeiT's 1e-6.
Args: keep_rate=0.7, variant=S/16, batch=2048, epochs=300, dtype=bfloat16,
smoke=True (a few steps on the embedded digits with the same recipe, for tests).
"""
import ml_collections

from vitjax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, keep_rate=0.7, variant="S/16", batch=2048, epochs=300,
                             dtype="bfloat16", smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = config_lib.imagenet(config_lib.DEIT_TRAIN_PP, repeated_aug=3)
  config.image_size = 224
  config.model = dict(name="vit", variant=arg.variant, drop_path=0.1,
                      tokens=dict(name="evit", keep_rate=arg.keep_rate, locations=(3, 6, 9),
                                  warmup=dict(start_epoch=10, ramp_epochs=100, max_buckets=16)))
  config.dtype = arg.dtype
  config.batch_size = arg.batch
  config.total_epochs = arg.epochs
  config.warmup_epochs = 5
  config_lib.deit_regularisation(config)
  config.optimizer = config_lib.deit_optimizer(lr=5e-4 * arg.batch / 512, min_lr=1e-5,
                                               weight_decay=0.05)
  config_lib.imagenet_bookkeeping(config, eval_every_epochs=10)
  if arg.smoke:
    smoke(config)
  return config


def smoke(config):
  """The same recipe on the 8x8 digits, tiny model, a few steps (the keep-rate ramp included)."""
  config_lib.evit_on_digits(config)
  config.batch_size = 256  # 5 steps per epoch: the keep rate ramps over the 6 steps
  config_lib.steps_not_epochs(config, 6, warmup_steps=1)
  config.optimizer.lr = 1e-3
  config.model.tokens.warmup.update(start_epoch=0, ramp_epochs=1, max_buckets=3)
  config.log_every_steps = 2
