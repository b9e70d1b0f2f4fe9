r"""Swin Transformer on ImageNet-1k with the official training recipe.

  python main.py --config=configs/swin_imagenet.py:variant=T --workdir=DIR \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python -m vitjax.train.aot --config=configs/swin_imagenet.py:variant=B \
      --topology=v5p:2x2x1 --mesh="(('data', 1), ('fsdp', -1))" --sharding=fsdp

Recipe (microsoft/Swin-Transformer `config.py` and `configs/swin/swin_{tiny,small,base}_patch4_
window7_224.yaml`): 300 epochs, batch 1024, AdamW (betas 0.9 / 0.999, eps 1e-8) with lr 5e-4 x
batch / 512, 20 warm-up epochs, cosine to 5e-6 x batch / 512, weight decay 0.05 (none on norms,
biases and the relative position tables), gradient clipping at norm 5; RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25 (pixel mode), mixup 0.8 / cutmix 1.0 (switch 0.5) with
label smoothing 0.1, no EMA, no repeated augmentation; drop-path 0.2 / 0.3 / 0.5 for T / S / B.

Expected (Swin paper, Table 1): top-1 81.3 / 83.0 / 83.5 for T / S / B at 4.5 / 8.7 / 15.4 GMACs.
Deviation: the warm-up starts at lr 0 rather than the official 5e-7 x batch / 512.
Args: variant=T (S, B), batch=1024, epochs=300, dtype=bfloat16, smoke=True (a few steps of a
two-stage Swin on the embedded digits with the same recipe, for tests).
"""
import ml_collections

from vitjax import config_lib

DROP_PATH = {"T": 0.2, "S": 0.3, "B": 0.5}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="T", batch=1024, epochs=300, dtype="bfloat16",
                             smoke=False)
  if arg.variant not in DROP_PATH:
    raise ValueError(f"unknown Swin variant {arg.variant!r} for this recipe; valid: "
                     f"{', '.join(DROP_PATH)}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = config_lib.imagenet(config_lib.DEIT_TRAIN_PP)
  config.image_size = 224
  config.model = dict(name="swin", variant=arg.variant, drop_path=DROP_PATH[arg.variant])
  config.dtype = arg.dtype
  config.batch_size = arg.batch
  config.total_epochs = arg.epochs
  config.warmup_epochs = 20
  config.label_smoothing = 0.0  # folded into the mixup targets
  config.mixup = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0,
                      label_smoothing=0.1)
  config.optimizer = config_lib.deit_optimizer(lr=5e-4 * arg.batch / 512,
                                               min_lr=5e-6 * arg.batch / 512, weight_decay=0.05)
  config.optimizer.clip_norm = 5.0
  config_lib.imagenet_bookkeeping(config, eval_every_epochs=10)
  if arg.smoke:
    smoke(config)
  return config


def smoke(config):
  """The same recipe on the 8x8 digits: a two-stage Swin on 2x2 patches (a 4x4 grid, 2x2
  windows, shifted in odd blocks), a few steps in float32."""
  config.data.update(name="vitjax_digits", train_split="train", eval_split="test", worker_count=0,
                     pp_train="randaugment(2, 9.0, 0.5)|value_range(-1, 1)|random_erasing(0.25)",
                     pp_eval="value_range(-1, 1)")
  config.image_size = None
  config.model.update(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=2)
  config.dtype = "float32"
  config.batch_size = 64
  config_lib.steps_not_epochs(config, 4, warmup_steps=1)
  config.optimizer.lr = 1e-3
  config.log_every_steps = 2
