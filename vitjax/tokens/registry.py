"""Name -> token reducer. An entry is the method's fact sheet; its contract lives on the class."""
import dataclasses
from typing import Any, Mapping

_REGISTRY: dict = {}


@dataclasses.dataclass(frozen=True)
class Entry:
  """The registered facts of a reducer: its class (whose class variables declare the contract:
  needs, hook, reads, needs_cls, needs_grid, soft, options, choices), the paper and official code."""
  name: str
  cls: Any
  paper: str = ""
  official: str = ""   # the code the method follows (URL)

  def __getattr__(self, field):  # needs, hook, reads, needs_cls, ...: read from the contract
    if field.startswith("__"):
      raise AttributeError(field)
    return getattr(self.cls, field)


def register(name: str, *, paper: str = "", official: str = ""):
  """Class decorator: makes `name` selectable as `config.model.tokens.name`."""
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"token reducer {name!r} registered twice")
    cls.name_in_registry = name
    _REGISTRY[name] = Entry(name, cls, paper, official)
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
