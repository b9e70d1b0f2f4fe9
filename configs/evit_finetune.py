r"""EViT fine-tuned for 30 epochs from a pretrained DeiT-S (EViT's cheapest recipe).

  # DeiT-S weights from timm, e.g. timm/deit_small_patch16_224.fb_in1k -> model.safetensors
  python main.py --config=configs/evit_finetune.py:keep_rate=0.7,init_from=/path/model.safetensors \
      --workdir=DIR --config.data.data_dir=/path/to/tensorflow_datasets
  python -m vitjax.evaluate --config=configs/evit_finetune.py:keep_rate=0.7 --checkpoint=DIR

Recipe (EViT, Liang et al. 2022, official code): 30 epochs, batch 2048, AdamW with lr 2e-5 x
batch/512, cosine to a minimum of 2e-6, no warm-up, weight decay 1e-6; the keep rate is constant
from the first step (one compiled step); drop-path off (the reference keeps the model in eval
mode while fine-tuning); the DeiT augmentations (RandAugment m9-mstd0.5-inc1, random erasing 0.25,
mixup 0.8 / cutmix 1.0 with label smoothing 0.1, repeated augmentation x3) and EMA 0.99996.
EViT at blocks 3, 6, 9 (0-indexed) with token fusion.

Expected (EViT paper, DeiT-S at 224 px): top-1 79.5 at keep rate 0.7 (3.0 GMACs) and 78.5 at
keep rate 0.5 (2.3 GMACs), from DeiT-S's 79.8 (4.6 GMACs). Without fine-tuning (see
configs/offtheshelf.py) the same keep rates lose more.

Args: init_from=PATH (.safetensors/.pth from timm or .npz from big_vision; required for a real
run), keep_rate=0.7, variant=S/16, batch=2048, epochs=30, dtype=bfloat16, smoke=True (a few steps
on the embedded digits, for tests; init_from optional there).
"""
import ml_collections
from ml_collections import config_dict

from vitjax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init_from="", keep_rate=0.7, variant="S/16", batch=2048,
                             epochs=30, dtype="bfloat16", smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # overridable from the command line
  if arg.init_from:
    config.init_from = arg.init_from
  config.init_skip = ()  # e.g. ("head",) to fine-tune onto another label set
  # the fine-tuning schedule: short, a small lr scaled by the batch, no warm-up (the weights
  # are trained already)
  config.total_epochs = arg.epochs
  config.warmup_epochs = 0
  config.batch_size = arg.batch
  config.optimizer = config_lib.deit_optimizer(lr=2e-5 * arg.batch / 512, min_lr=2e-6,
                                               weight_decay=1e-6)
  # the rest of the DeiT recipe, as configs/evit_scratch.py trains it
  config.data = config_lib.imagenet(config_lib.DEIT_TRAIN_PP, repeated_aug=3)
  config.image_size = 224
  config_lib.deit_regularisation(config)
  config.model = dict(name="vit", variant=arg.variant, drop_path=0.0,
                      tokens=dict(name="evit", keep_rate=arg.keep_rate, locations=(3, 6, 9)))
  config.dtype = arg.dtype
  config_lib.imagenet_bookkeeping(config, eval_every_epochs=5)
  if arg.smoke:
    config_lib.evit_on_digits(config)
    config.batch_size = 32
    config_lib.steps_not_epochs(config, 4)
    config.log_every_steps = 2
  return config
