"""Markdown tables of the registries (the README's feature tables): `python -m vitjax.tables`."""
from vitjax import attention, models, tokens


def attention_table() -> str:
  rows = ["| name | tier | paper | complexity | [CLS] probs | keys (ToMe) | sizes | key bias/mask |",
          "|---|---|---|---|---|---|---|---|"]
  for name in attention.names():
    e = attention.get(name)
    c = e.caps
    rows.append(f"| `{name}` | {e.tier} | {e.paper} | {e.complexity} | {c.cls_probs} | "
                f"{'yes' if c.key_metric else 'no'} | {'yes' if c.size_semantics else 'no'} | "
                f"{'yes' if c.key_bias else 'no'} |")
  return "\n".join(rows)


def tokens_table() -> str:
  rows = ["| name | paper | needs from attention | slot | needs [CLS] | soft merge |",
          "|---|---|---|---|---|---|"]
  for name in tokens.names():
    e = tokens.get(name)
    needs = ", ".join(e.needs) or "-"
    rows.append(f"| `{name}` | {e.paper} | {needs} | {e.slot} | {'yes' if e.needs_cls else 'no'} "
                f"| {'yes' if e.soft else 'no'} |")
  return "\n".join(rows)


def backbone_table() -> str:
  rows = ["| variant | width | depth | MLP | heads |", "|---|---|---|---|---|"]
  for name, (w, d, m, h) in models.VARIANTS.items():
    rows.append(f"| `{name}/<patch>` | {w} | {d} | {m} | {h} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print("## Attention\n\n" + attention_table() + "\n\n## Token reduction\n\n" + tokens_table()
        + "\n\n## Backbones\n\n" + backbone_table())
