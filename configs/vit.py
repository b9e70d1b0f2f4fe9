r"""Any ViT variant on any tfds dataset, with the attention and token reducer chosen by name.

  python main.py --config=configs/vit.py:variant=S/16,dataset=cifar10 --workdir=DIR
  python main.py --config=configs/vit.py:variant=Ti/4,dataset=cifar10,attention=sigmoid,epochs=100 \
      --workdir=DIR --config.data.data_dir=~/tensorflow_datasets

Datasets other than `vitjax_digits` must be prepared as array_record in data_dir first
(`tfds build cifar10 --file_format=array_record`, on a machine with network and TensorFlow).
Expected (cifar10, Ti/4 at 32 px, 100 epochs, batch 256, 1 GPU): ~80% top-1 without extra
augmentation; ViTs need strong augmentation and many epochs on small data.
"""
import ml_collections
from ml_collections import config_dict

from vitjax import config_lib

DATASETS = {
    "vitjax_digits": dict(num_classes=10, image_size=8, train_split="train", eval_split="test",
                          pp_train="value_range(-1, 1)", pp_eval="value_range(-1, 1)"),
    "cifar10": dict(num_classes=10, image_size=32, train_split="train", eval_split="test",
                    pp_train="random_resized_crop(32, scale=(0.6, 1.0))|flip_lr|value_range(-1, 1)",
                    pp_eval="value_range(-1, 1)"),
    "cifar100": dict(num_classes=100, image_size=32, train_split="train", eval_split="test",
                     pp_train="random_resized_crop(32, scale=(0.6, 1.0))|flip_lr|value_range(-1, 1)",
                     pp_eval="value_range(-1, 1)"),
    "imagenet2012": dict(num_classes=1000, image_size=224, train_split="train",
                         eval_split="validation",
                         pp_train="decode|random_resized_crop(224)|flip_lr|normalize",
                         pp_eval="decode|resize_small(256)|central_crop(224)|normalize"),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="S/16", dataset="cifar10", attention="mhsa",
                             tokens="none", epochs=100, batch=256, lr=1e-3, dtype="float32",
                             smoke=False)
  if arg.dataset not in DATASETS:
    raise ValueError(f"unknown dataset {arg.dataset!r} for configs/vit.py; valid: "
                     f"{', '.join(DATASETS)} (or write a config of your own)")
  ds = DATASETS[arg.dataset]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name=arg.dataset, data_dir=config_dict.placeholder(str),
                     train_split=ds["train_split"],
                     eval_split=ds["eval_split"], pp_train=ds["pp_train"], pp_eval=ds["pp_eval"],
                     worker_count=0)
  config.image_size = ds["image_size"]
  config.model = dict(name="vit", variant=arg.variant, attention=dict(name=arg.attention),
                      tokens=dict(name=arg.tokens), drop_path=0.1)
  config.dtype = arg.dtype
  config.batch_size = arg.batch
  config.total_epochs = arg.epochs
  config.warmup_epochs = min(5, arg.epochs / 10)
  config.label_smoothing = 0.1
  config.optimizer = dict(name="adamw", lr=arg.lr, weight_decay=0.05, clip_norm=1.0,
                          schedule="cosine", min_lr=1e-5, grad_accum_steps=1)
  config.mesh = (("data", -1),)
  config.sharding = "dp"
  config.log_every_steps = 50
  config.eval_every_epochs = max(arg.epochs // 10, 1)
  config.checkpoint_every_epochs = max(arg.epochs // 20, 1)
  config.keep_checkpoints = 3
  if arg.smoke:
    config_lib.steps_not_epochs(config, 4, warmup_steps=1)
  return config
