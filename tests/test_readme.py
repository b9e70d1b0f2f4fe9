"""The README's feature tables list every registered attention, reducer and backbone."""
import os

from vitjax import attention, models, tokens

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_every_registered_name_is_in_the_readme():
  text = open(README).read()
  names = attention.names() + tokens.names() + [f"{v}/<patch>" for v in models.VARIANTS]
  # names starting with "test_" are registered by tests for negative cases
  missing = [n for n in names if f"`{n}`" not in text and not n.startswith("test_")]
  assert not missing, f"add these to the README tables (python -m vitjax.tables): {missing}"
