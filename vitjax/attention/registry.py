"""Name -> attention mechanism. Every mechanism registers itself here with its capabilities."""
import dataclasses
from typing import Any, Mapping, Optional

from vitjax.attention.base import Capabilities

_REGISTRY: dict = {}


@dataclasses.dataclass(frozen=True)
class Entry:
  name: str
  cls: Any
  caps: Capabilities
  paper: str = ""
  complexity: str = ""
  tier: str = "G"


def register(name: str, *, caps: Capabilities = Capabilities(), paper: str = "",
             complexity: str = "", tier: str = "G"):
  """Class decorator: makes `name` selectable as `config.model.attention.name`."""
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"attention {name!r} registered twice")
    cls.caps = caps
    _REGISTRY[name] = Entry(name, cls, caps, paper, complexity, tier)
    return cls
  return deco


def names() -> list:
  return sorted(_REGISTRY)


def get(name: str) -> Entry:
  if name not in _REGISTRY:
    raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(names())}")
  return _REGISTRY[name]


def split_spec(spec) -> tuple:
  """A spec is a name or a mapping {name: ..., **kwargs}; returns (name, kwargs)."""
  if isinstance(spec, str):
    return spec, {}
  if isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
    d = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    d.pop("per_layer", None)
    if "name" not in d:
      raise ValueError(f"attention spec {d} has no 'name'; valid names: {', '.join(names())}")
    return d.pop("name"), d
  raise TypeError(f"attention spec must be a name or a dict with 'name', got {type(spec).__name__}")


def check(spec) -> tuple:
  """Validates a spec without building it; returns (entry, kwargs)."""
  mech, kwargs = split_spec(spec)
  entry = get(mech)
  fields = {f.name for f in dataclasses.fields(entry.cls)}
  bad = set(kwargs) - fields
  if bad:
    valid = sorted(fields - {"parent", "name", "num_heads", "dtype"})
    raise ValueError(f"attention {mech!r} has no option(s) {sorted(bad)}; valid options: {valid}")
  return entry, kwargs


def build(spec, *, num_heads: int, dtype: Any, name: Optional[str] = None, **common):
  """Instantiates the mechanism of `spec` (unbound flax module)."""
  entry, kwargs = check(spec)
  fields = {f.name for f in dataclasses.fields(entry.cls)}
  common = {k: v for k, v in common.items() if k in fields and k not in kwargs}
  return entry.cls(num_heads=num_heads, dtype=dtype, name=name, **common, **kwargs)
