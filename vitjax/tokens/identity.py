"""`none`: no token reduction (the plain ViT)."""
from vitjax.tokens import registry
from vitjax.tokens.base import Layout, Plan, Reducer, selection_macs


@registry.register("none", paper="(no reduction)")
class Identity(Reducer):
  """Keeps every token; plans no reduction anywhere."""
  options = {}
  macs = classmethod(selection_macs)

  @classmethod
  def plan(cls, options, layout: Layout) -> Plan:
    cls.parse(options, layout)
    return Plan((None,) * layout.depth)

  def __call__(self, x, state, aux, *, deterministic=True):
    return x, state
