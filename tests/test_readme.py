"""The README's feature tables are the ones the registries generate (`python -m vitjax.tables`)."""
import os
import re

import pytest

from vitjax import attention, models, quant, tables, tokens

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.mark.parametrize("name", sorted(tables.TABLES))
def test_readme_table_is_the_generated_one(name):
  text = open(README).read()
  block = re.search(rf"<!-- {name} table -->\n(.*?)\n<!-- end -->", text, flags=re.S)
  assert block, f"the README lost its {name} table markers"
  assert block.group(1) == tables.TABLES[name](), \
      "the README table is stale: run python -m vitjax.tables README.md"


def test_every_registered_name_is_in_the_readme():
  text = open(README).read()
  names = (attention.names() + tokens.names() + quant.names()
           + [f"{v}/<patch>" for v in models.VARIANTS])
  missing = [n for n in names if f"`{n}`" not in text]
  assert not missing, f"add these to the README tables (python -m vitjax.tables): {missing}"
