"""`none`: no token reduction (the plain ViT)."""
from vitjax.tokens import registry
from vitjax.tokens.base import Reducer


@registry.register("none", paper="(no reduction)")
class Identity(Reducer):
  """Keeps every token; plans no reduction anywhere."""

  @classmethod
  def plan(cls, options, *, depth, num_patches, num_prefix):
    if options:
      raise ValueError(f"token reducer 'none' takes no options, got {sorted(options)}")
    return [None] * depth

  def __call__(self, x, state, aux, *, deterministic=True):
    return x, state
