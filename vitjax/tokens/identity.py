"""`none`: no token reduction (the plain ViT)."""
from vitjax.tokens import registry
from vitjax.tokens.base import Layout, Plan, Reducer


@registry.register("none", paper="(no reduction)")
class Identity(Reducer):
  """Keeps every token; plans no reduction anywhere."""
  options = {}

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    cls.parse(options, layout)
    return Plan((None,) * layout.depth)

  @classmethod
  def macs(cls, n: int, width: int, **kwargs) -> int:
    """No work of its own."""
    del n, width, kwargs
    return 0

  def __call__(self, x, state, aux, *, deterministic=True):
    return x, state
