r"""The embedded default: a small ViT on scikit-learn's handwritten digits (no download).

  python main.py --config=configs/default.py --workdir=workdirs/default

Expected: about 98% test top-1 on the 360 held-out digits after 2000 steps of batch 128 (measured:
97.8 / 97.8 / 98.1% with seeds 0 / 1 / 2), in about 4 minutes on a 2-core CPU.
Args (after a colon, comma-separated): smoke=True (a few steps, for tests), steps=N,
attention=NAME, tokens=NAME (a token reducer at blocks 1 and 2, block 1 with smoke, with a [CLS]
token), keep_rate=0.7 (for a reducer that merges a fixed r per block instead, MCTF: r = the
patches a keep rate drops at the first location, 16 -> 11 tokens at 0.7). Args combine in any
order.
"""
import ml_collections
from ml_collections import config_dict

from vitjax import config_lib
from vitjax.tokens import registry as tokens_registry

NUM_PATCHES = (8 // 2) ** 2


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, steps=0, attention="mhsa", tokens="none",
                             keep_rate=0.7)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(
      name="vitjax_digits", data_dir=config_dict.placeholder(str),
      train_split="train", eval_split="test",
      pp_train="random_crop(8, pad=2)|value_range(-1, 1)", pp_eval="value_range(-1, 1)",
      worker_count=0)

  # 8x8 images, 2x2 patches: 16 patch tokens. Fixed sin-cos position embeddings and average
  # pooling generalise better than learned ones on 1437 training images; without a [CLS] token,
  # which average pooling never reads, training is faster and no less accurate (README).
  config.model = dict(name="vit", variant="Ti/2", width=96, depth=4, num_heads=3, mlp_dim=384,
                      pool="gap", posemb="sincos2d", class_token=False, drop_path=0.0,
                      dropout=0.0, attention=dict(name=arg.attention), tokens=dict(name=arg.tokens))
  if arg.tokens != "none":  # reduce after blocks 1 and 2 of 4 (EViT reduces at 4, 7, 10 of 12)
    if "keep_rate" in tokens_registry.get(arg.tokens).options:
      config.model.tokens.update(keep_rate=arg.keep_rate, locations=(1, 2))
    else:
      config.model.tokens.update(r=round(NUM_PATCHES * (1 - arg.keep_rate)), locations=(1, 2))
    config.model.class_token = True  # EViT, Top-K, ATS, ... rank patches by the [CLS] row
  config.dtype = "float32"

  config.batch_size = 128
  config.total_steps = arg.steps or 2000
  config.label_smoothing = 0.1
  config.optimizer = dict(name="adamw", lr=2e-3, weight_decay=0.05, b2=0.999, clip_norm=1.0,
                          schedule="cosine", min_lr=1e-5, grad_accum_steps=1)
  config.warmup_steps = 100

  config.mesh = (("data", -1),)
  config.sharding = "dp"

  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2

  if arg.smoke:
    config.model.update(depth=2, width=64, num_heads=2, mlp_dim=128)
    if arg.tokens != "none":  # the reducer after block 1 of 2
      config.model.tokens.locations = (1,)
    config.total_steps = arg.steps or 6
    config.warmup_steps = 2
    config.log_every_steps = 2
    config.eval_every_steps = config.checkpoint_every_steps = 3
  return config
