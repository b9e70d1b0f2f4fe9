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

DEIT_TRAIN_PP = ("decode|random_resized_crop(224)|flip_lr|randaugment(2, 9.0, 0.5)|normalize"
                 "|random_erasing(0.25, 'pixel')")
DEIT_EVAL_PP = "decode|resize_small(256)|central_crop(224)|normalize"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, init_from="", keep_rate=0.7, variant="S/16", batch=2048,
                             epochs=30, dtype="bfloat16", smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = config_dict.placeholder(str)  # overridable from the command line
  if arg.init_from:
    config.init_from = arg.init_from
  config.init_skip = ()  # e.g. ("head",) to fine-tune onto another label set
  config.data = dict(name="imagenet2012", data_dir=config_dict.placeholder(str),
                     train_split="train",
                     eval_split="validation", pp_train=DEIT_TRAIN_PP, pp_eval=DEIT_EVAL_PP,
                     worker_count=16, repeated_aug=3)
  config.image_size = 224
  config.model = dict(name="vit", variant=arg.variant, drop_path=0.0,
                      tokens=dict(name="evit", keep_rate=arg.keep_rate, locations=(3, 6, 9)))
  config.dtype = arg.dtype
  config.batch_size = arg.batch
  config.total_epochs = arg.epochs
  config.warmup_epochs = 0
  config.label_smoothing = 0.0  # folded into the mixup targets
  config.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0,
                      label_smoothing=0.1)
  config.ema = dict(decay=0.99996)
  config.optimizer = dict(name="adamw", lr=2e-5 * arg.batch / 512, min_lr=2e-6,
                          weight_decay=1e-6, schedule="cosine", b1=0.9, b2=0.999, eps=1e-8,
                          clip_norm=None, grad_accum_steps=1)
  config.mesh = (("data", -1),)
  config.sharding = "dp"
  config.log_every_steps = 100
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3
  if arg.smoke:
    config.data.update(name="vitjax_digits", train_split="train", eval_split="test",
                       worker_count=0, pp_eval="value_range(-1, 1)",
                       pp_train="randaugment(2, 9.0, 0.5)|value_range(-1, 1)|random_erasing(0.25)")
    config.image_size = None
    config.model.update(variant="Ti/2", width=64, depth=4, num_heads=2, mlp_dim=128)
    config.model.tokens.locations = (1, 2, 3)
    config.dtype = "float32"
    config.batch_size = 32
    config.total_epochs, config.total_steps = None, 4
    config.log_every_steps = 2
    config.eval_every_epochs = config.checkpoint_every_epochs = None
    config.eval_every_steps = config.checkpoint_every_steps = 4
  return config
