"""vitjax: Vision Transformers in JAX/Flax for research on efficient attention and token reduction."""
__version__ = "0.1.0"
