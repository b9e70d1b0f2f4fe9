"""Markdown tables of the registries (the README's feature tables).

  python -m vitjax.tables              # print them
  python -m vitjax.tables README.md    # rewrite the tables between their markers in README.md
"""
import re
import sys

from vitjax import attention, models, tokens

# Every registered name is tested against an independent reference (forward and gradient) and
# trains in a tiny ViT (tests/test_registry_train.py); a name that is not is not registered.
STATUS = "tested, trains"


def attention_table() -> str:
  rows = ["| name | tier | paper | complexity | [CLS] probs | keys (ToMe) | sizes | key bias/mask "
          "| status |", "|---|---|---|---|---|---|---|---|---|"]
  for name in attention.names():
    e = attention.get(name)
    c = e.caps
    rows.append(f"| `{name}` | {e.tier} | {e.paper} | {e.complexity} | {c.cls_probs} | "
                f"{'yes' if c.key_metric else 'no'} | {'yes' if c.size_semantics else 'no'} | "
                f"{'yes' if c.key_bias else 'no'} | {STATUS} |")
  return "\n".join(rows)


def tokens_table() -> str:
  rows = ["| name | paper | acts | reads from attention | needs [CLS] | soft merge | options |",
          "|---|---|---|---|---|---|---|"]
  for name in tokens.names():
    e = tokens.get(name)
    acts = e.hook.replace("_", " ")
    if e.hook == tokens.base.BEFORE_ATTENTION and e.needs:
      needs = ", ".join(e.needs) + (" (own block)" if e.reads == tokens.base.OWN_BLOCK
                                    else " (previous block)")
    else:
      needs = ", ".join(e.needs) or "-"
    opts = ", ".join(f"`{k}`" for k in e.options) or "-"
    rows.append(f"| `{name}` | {e.paper} | {acts} | {needs} | {'yes' if e.needs_cls else 'no'} "
                f"| {'yes' if e.soft else 'no'} | {opts} |")
  return "\n".join(rows)


def backbone_table() -> str:
  rows = ["| variant | width | depth | MLP | heads |", "|---|---|---|---|---|"]
  for name, (w, d, m, h) in models.VARIANTS.items():
    rows.append(f"| `{name}/<patch>` | {w} | {d} | {m} | {h} |")
  return "\n".join(rows)


TABLES = {"attention": attention_table, "tokens": tokens_table, "backbones": backbone_table}


def update(path: str):
  """Replaces each `<!-- NAME table -->...<!-- end -->` block of `path` with a fresh table."""
  text = open(path).read()
  for name, fn in TABLES.items():
    text = re.sub(rf"(<!-- {name} table -->\n).*?(\n<!-- end -->)",
                  lambda m, fn=fn: m.group(1) + fn() + m.group(2), text, flags=re.S)
  with open(path, "w") as f:
    f.write(text)


if __name__ == "__main__":
  if len(sys.argv) > 1:
    update(sys.argv[1])
  else:
    print("\n\n".join(f"## {name}\n\n{fn()}" for name, fn in TABLES.items()))
