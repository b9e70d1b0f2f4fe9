"""Name -> token reducer, with what each needs from the attention layers."""
import dataclasses
from typing import Any, Mapping

_REGISTRY: dict = {}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  cls: Any
  needs: tuple        # aux fields read from attention (e.g. ("cls_probs",))
  slot: str           # "mid" or "pre"
  needs_cls: bool     # needs a [CLS] token
  needs_grid: bool    # needs raster-ordered tokens at its location
  soft: bool          # soft merge: defines no sizes afterwards
  paper: str = ""


def register(name: str, *, needs=(), slot: str = "mid", needs_cls: bool = False,
             needs_grid: bool = False, soft: bool = False, paper: str = ""):
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"token reducer {name!r} registered twice")
    cls.needs, cls.slot = tuple(needs), slot
    _REGISTRY[name] = Entry(name, cls, tuple(needs), slot, needs_cls, needs_grid, soft, paper)
    return cls
  return deco


def names() -> list:
  return sorted(_REGISTRY)


def get(name: str) -> Entry:
  if name not in _REGISTRY:
    raise ValueError(f"unknown token reducer {name!r}; valid names: {', '.join(names())}")
  return _REGISTRY[name]


def split_spec(spec) -> tuple:
  """A spec is None, a name or a mapping {name: ..., **options}; returns (name, options)."""
  if spec is None:
    return "none", {}
  if isinstance(spec, str):
    return spec, {}
  if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
    d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    return d.pop("name", "none"), d
  raise TypeError(f"tokens spec must be a name or a dict with 'name', got {type(spec).__name__}")


def compatible_attentions(entry: Entry) -> list:
  """Names of the registered attention mechanisms that give this reducer what it needs."""
  from vitjax.attention import registry as attn_registry  # pylint: disable=import-outside-toplevel
  return [n for n in attn_registry.names()
          if set(entry.needs) <= set(attn_registry.get(n).caps.provides())]
