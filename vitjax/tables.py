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


def reducer_spec(name: str) -> dict:
  """The reducer at a typical setting: keep rate 0.7, or 8 tokens merged per block."""
  options = tokens.get(name).options
  return {"name": name, **({"keep_rate": 0.7} if "keep_rate" in options else {}),
          **({"r": 8} if "r" in options and "keep_rate" not in options else {})}


def compatibility_table() -> str:
  """Backbone x reducer: each family's default model built with each registered reducer at a
  typical setting; a cell is what `models.build` says, so the table cannot drift from the
  config-time checks. The last column is the family's one-line refusal."""
  names = [n for n in tokens.names() if n != "none"]
  rows = ["| backbone | " + " | ".join(f"`{n}`" for n in names) + " | why not |",
          "|---|" + "---|" * (len(names) + 1)]
  for family in models.MODELS:
    cells, why = [], set()
    for name in names:
      try:
        models.build({"name": family, "tokens": reducer_spec(name)}, num_classes=10,
                     image_size=224)
        cells.append("yes")
      except ValueError as e:
        cells.append("-")
        why.add(str(e).split(": ", 1)[-1].split("; valid")[0])
    reason = "; ".join(sorted(why)) if why else ""
    rows.append(f"| `{family}` | " + " | ".join(cells) + f" | {reason} |")
  return "\n".join(rows)


def mvitv2_table() -> str:
  m = models.MViTv2
  rows = ["| variant | embed dims | depths | heads | query strides | key/value strides |",
          "|---|---|---|---|---|---|"]
  for name, (dims, depths, heads) in models.mvitv2.VARIANTS.items():
    kv = models.mvitv2.kv_strides(m.q_strides, m.kv_stride)
    rows.append(f"| `{name}` | {', '.join(map(str, dims))} | {', '.join(map(str, depths))} | "
                f"{', '.join(map(str, heads))} | {', '.join(map(str, m.q_strides))} | "
                f"{', '.join(map(str, kv))} |")
  return "\n".join(rows)


def maxvit_table() -> str:
  rows = ["| variant | stem | embed dims | depths (MaxViT blocks) | heads | window / grid | "
          "pre-logits |", "|---|---|---|---|---|---|---|"]
  for name, (dims, depths, hidden) in models.maxvit.VARIANTS.items():
    heads = [d // models.MaxViT.head_dim for d in dims]
    rows.append(f"| `{name}` | {models.MaxViT.stem_width} | {', '.join(map(str, dims))} | "
                f"{', '.join(map(str, depths))} | {', '.join(map(str, heads))} | "
                f"{models.MaxViT.window_size} / {models.MaxViT.grid_size} | {hidden} |")
  return "\n".join(rows)


def gcvit_table() -> str:
  rows = ["| variant | embed dim | depths | heads | MLP ratio | layer scale |",
          "|---|---|---|---|---|---|"]
  for name, (dim, depths, heads, ratio, scale) in models.gcvit.VARIANTS.items():
    rows.append(f"| `{name}` | {dim} | {', '.join(map(str, depths))} | "
                f"{', '.join(map(str, heads))} | {ratio:g} | {scale if scale else '-'} |")
  return "\n".join(rows)


def cvt_table() -> str:
  rows = ["| variant | embed dims | depths | heads | [CLS] | K/V stride |",
          "|---|---|---|---|---|---|"]
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
          "swin": swin_table, "davit": davit_table, "mvitv2": mvitv2_table,
          "maxvit": maxvit_table, "gcvit": gcvit_table, "cvt": cvt_table,
          "quant": quant_table, "compatibility": compatibility_table}


def update(path: str):
  """Replaces each `<!-- NAME table -->...<!-- end -->` block of `path` with a fresh table."""
  text = open(path).read()
  for name, fn in TABLES.items():
    text = re.sub(rf"(<!-- {name} table -->\n)(?:.*?\n)??(<!-- end -->)",
                  lambda m, fn=fn: m.group(1) + fn() + "\n" + m.group(2), text, flags=re.S)
  with open(path, "w") as f:
    f.write(text)


if __name__ == "__main__":
  if len(sys.argv) > 1:
    update(sys.argv[1])
  else:
    print("\n\n".join(f"## {name}\n\n{fn()}" for name, fn in TABLES.items()))
