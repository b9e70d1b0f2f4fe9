"""vitjax: Vision Transformers in JAX/Flax for research on efficient attention and token reduction.

  model, variables, config = vitjax.load("workdirs/default", config="configs/default.py")
  logits, out = model.apply(variables, images, train=False)
"""
__version__ = "0.1.0"


def __getattr__(name):
  # `vitjax.load` is imported on first use: `import vitjax.config_lib` (every config file does)
  # stays free of JAX, Flax and orbax.
  if name == "load":
    from vitjax.loading import load  # pylint: disable=import-outside-toplevel
    return load
  raise AttributeError(f"module 'vitjax' has no attribute {name!r}")
