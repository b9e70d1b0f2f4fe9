"""Markdown tables of the registries (the README's feature tables).

  python -m vitjax.tables              # print them
  python -m vitjax.tables README.md    # rewrite the tables between their markers in README.md
"""
import dataclasses
import re
import sys

from vitjax import attention, models, quant, tokens


def yes_no(flag: bool) -> str:
  return "yes" if flag else "no"


def attention_table() -> str:
  """One row per registered mechanism, from its registry entry. No status column: every name is
  held to a naive-formula reference test and to training in a tiny ViT by the registry-driven
  tests (tests/test_attention_registry.py, tests/test_registry_train.py), so none is untested."""
  rows = ["| name | tier | paper | official code | complexity | impls | [CLS] probs | keys (ToMe) "
          "| sizes | key bias/mask |", "|---|---|---|---|---|---|---|---|---|---|"]
  for name in attention.names():
    e = attention.get(name)
    c = e.caps
    code = f"[code]({e.official})" if e.official else "-"
    rows.append(f"| `{name}` | {e.tier} | {e.paper} | {code} | {e.complexity} | "
                f"{', '.join(e.impls)} | {c.cls_probs} | {yes_no(c.key_metric)} | "
                f"{yes_no(c.size_semantics)} | {yes_no(c.key_bias)} |")
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


def swin_table() -> str:
  rows = ["| variant | embed dim | depths | heads | window |", "|---|---|---|---|---|"]
  for name, (embed, depths, heads) in models.swin.VARIANTS.items():
    rows.append(f"| `{name}` | {embed} | {', '.join(map(str, depths))} | "
                f"{', '.join(map(str, heads))} | {models.Swin.window_size} |")
  return "\n".join(rows)


def davit_table() -> str:
  rows = ["| variant | embed dims | depths (dual units) | heads | window |",
          "|---|---|---|---|---|"]
  for name, (dims, depths, heads) in models.davit.VARIANTS.items():
    rows.append(f"| `{name}` | {', '.join(map(str, dims))} | {', '.join(map(str, depths))} | "
                f"{', '.join(map(str, heads))} | {models.DaViT.window_size} |")
  return "\n".join(rows)


def cvt_table() -> str:
  rows = ["| variant | embed dims | depths | heads | [CLS] | K/V stride |", "|---|---|---|---|---|---|"]
  for name, (dims, depths, heads) in models.cvt.VARIANTS.items():
    rows.append(f"| `{name}` | {', '.join(map(str, dims))} | {', '.join(map(str, depths))} | "
                f"{', '.join(map(str, heads))} | last stage | {models.CvT.stride_kv} |")
  return "\n".join(rows)


def quant_table() -> str:
  """One row per registered quantizer, in registration order, from its registry entry and its
  class's contract (needs_softmax, uniform_dense_inputs, options)."""
  rows = ["| quantizer | what it does | needs softmax | int8 path | options | paper | official "
          "code |", "|---|---|---|---|---|---|---|"]
  for name in quant.registry.in_order():
    e = quant.get(name)
    opts = ", ".join(f"`{f.name}`" for f in dataclasses.fields(e.cls.options_cls)) or "-"
    code = f"[code]({e.official})" if e.official else "-"
    rows.append(f"| `{name}` | {e.summary} | {yes_no(e.needs_softmax)} | "
                f"{yes_no(e.cls.uniform_dense_inputs)} | {opts} | {e.paper} | {code} |")
  return "\n".join(rows)


TABLES = {"attention": attention_table, "tokens": tokens_table, "backbones": backbone_table,
          "swin": swin_table, "davit": davit_table, "cvt": cvt_table, "quant": quant_table}


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
