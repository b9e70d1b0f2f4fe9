"""Name -> post-training quantizer, each with its fact sheet (paper, official code)."""
import dataclasses
from typing import Any, Mapping

from vitjax.quant.base import QuantError

_REGISTRY: dict = {}


@dataclasses.dataclass(frozen=True)
class Entry:
  """A quantizer's facts; its contract (needs_softmax, uniform_dense_inputs, options) lives on
  the class."""
  name: str
  cls: Any
  paper: str = ""
  official: str = ""
  summary: str = ""

  def make(self, options: Mapping = None):
    return self.cls(**dict(options or {}))

  @property
  def needs_softmax(self) -> bool:
    return self.cls.needs_softmax


def register(name: str, *, paper: str = "", official: str = "", summary: str = ""):
  """Class decorator: makes `name` selectable as `config.quant.method`; summary: what it does, in
  one line (the README's quantizer table)."""
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"quantizer {name!r} registered twice")
    cls.name = name
    _REGISTRY[name] = Entry(name, cls, paper, official, summary)
    return cls
  return deco


def names() -> list:
  return sorted(_REGISTRY)


def in_order() -> list:
  """The names in registration order (the README table's order)."""
  return list(_REGISTRY)


def get(name: str) -> Entry:
  if name not in _REGISTRY:
    raise QuantError(f"unknown quantizer {name!r}; valid names: {', '.join(names())}")
  return _REGISTRY[name]


def generic_methods() -> list:
  """Quantizers without a part made for softmax: valid with every attention."""
  return [n for n in names() if not get(n).needs_softmax]


def integer_methods() -> list:
  return [n for n in names() if get(n).cls.uniform_dense_inputs]


def softmax_attentions() -> list:
  """Registered Tier G attention mechanisms whose materialised weights are a softmax (found by
  tracing each once, `base.weight_kinds`); mechanisms that cannot be traced at the tiny probe
  shape are left out."""
  from vitjax.attention import registry as attn_registry  # pylint: disable=import-outside-toplevel
  from vitjax.quant.base import weight_kinds  # pylint: disable=import-outside-toplevel
  out = []
  for n in attn_registry.names():
    if attn_registry.get(n).tier != "G":
      continue
    try:
      if "softmax" in weight_kinds(n):
        out.append(n)
    except Exception:  # pylint: disable=broad-except  (a probe shape a mechanism rejects)
      continue
  return out


def valid_pairs(attentions=None) -> list:
  """(quantizer, attention) pairs that pass the check with default options."""
  from vitjax.attention import registry as attn_registry  # pylint: disable=import-outside-toplevel
  attentions = attentions or [n for n in attn_registry.names()
                              if attn_registry.get(n).tier == "G"]
  soft = set(softmax_attentions())
  return [(q, a) for q in names() for a in attentions if not get(q).needs_softmax or a in soft]
