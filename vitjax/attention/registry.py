"""Name -> attention mechanism, each with its fact sheet (an `Entry`)."""
import dataclasses
from typing import Any, Callable, Mapping, Optional

from vitjax.attention.base import Capabilities

_REGISTRY: dict = {}
_MODULE_FIELDS = ("parent", "name")


@dataclasses.dataclass(frozen=True)
class Entry:
  """What is known about a mechanism without building it.

  macs(n, width, num_heads, **options) -> int: multiply-accumulates of one image through the layer
  on n tokens, projections included, with the class defaults for options not given. It counts the
  contractions the layer runs (what it computes, not what the paper's kernel would); the test
  compares it with XLA's flop count, whose elementwise work it leaves out: `macs_tolerance` is
  the relative gap allowed where that work is large (None: the test's default), with its reason
  at the registration.
  """
  name: str
  cls: Any
  caps: Capabilities
  paper: str = ""
  official: str = ""           # URL of the official code followed ("" where none was)
  complexity: str = ""
  impls: tuple = ("reference",)
  macs: Optional["Macs"] = None
  macs_tolerance: Optional[float] = None

  @property
  def tier(self) -> str:
    """"S" for mechanisms that need the raster grid of patches, else "G"."""
    return "S" if self.caps.needs_grid else "G"


@dataclasses.dataclass(frozen=True)
class Macs:
  """An analytic MAC count fn(n, width, num_heads, **options) whose options default to the
  fields of the mechanism's class."""
  fn: Callable
  cls: Any

  def __call__(self, n: int, width: int, num_heads: int, **options) -> int:
    defaults = {f.name: f.default for f in dataclasses.fields(self.cls)
                if f.default is not dataclasses.MISSING and f.name not in _MODULE_FIELDS}
    return int(self.fn(n, width, num_heads, **{**defaults, **options}))


def register(name: str, *, like: Optional[str] = None, caps: Optional[Capabilities] = None,
             paper: Optional[str] = None, official: Optional[str] = None,
             complexity: Optional[str] = None, impls: Optional[tuple] = None,
             macs: Optional[Callable] = None, macs_tolerance: Optional[float] = None):
  """Class decorator: makes `name` selectable as `config.model.attention.name`.

  like: a registered mechanism this one is a variant of (a subclass with other defaults); the
  facts not given here are that entry's, its MAC count applied to this class's defaults.
  """
  base = get(like) if like is not None else Entry(name, None, Capabilities())
  facts = dict(caps=caps, paper=paper, official=official, complexity=complexity, impls=impls,
               macs_tolerance=macs_tolerance)
  facts = {k: getattr(base, k) if v is None else v for k, v in facts.items()}
  facts["impls"] = tuple(facts["impls"])
  macs = base.macs.fn if macs is None and base.macs is not None else macs

  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"attention {name!r} registered twice")
    if "reference" not in facts["impls"]:
      raise ValueError(f"attention {name!r}: every mechanism has impl 'reference', got "
                       f"{facts['impls']}")
    cls.caps = facts["caps"]
    _REGISTRY[name] = Entry(name, cls, macs=None if macs is None else Macs(macs, cls), **facts)
    return cls
  return deco


def names() -> list:
  return sorted(_REGISTRY)


def get(name: str) -> Entry:
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(names())}") from None


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


def check(spec, impl: Optional[str] = None) -> tuple:
  """Validates a spec without building it; returns (entry, kwargs).

  The impl checked is the spec's own `impl` option, else `impl` (the model's), if either is given.
  """
  mech, kwargs = split_spec(spec)
  entry = get(mech)
  fields = {f.name for f in dataclasses.fields(entry.cls)}
  bad = set(kwargs) - fields
  if bad:
    valid = sorted(fields - {"parent", "name", "num_heads", "dtype"})
    raise ValueError(f"attention {mech!r} has no option(s) {sorted(bad)}; valid options: {valid}")
  impl = kwargs.get("impl", impl)
  if impl is not None and impl not in entry.impls:
    raise ValueError(f"attention {mech!r} supports impl {entry.impls}, got {impl!r}")
  return entry, kwargs


def build(spec, *, num_heads: int, dtype: Any, name: Optional[str] = None, **common):
  """Instantiates the mechanism of `spec` (unbound flax module); `common` holds the model-wide
  options (impl, qkv_bias, dropout rates, ...), each passed where the mechanism has that field."""
  entry, kwargs = check(spec, common.get("impl"))
  fields = {f.name for f in dataclasses.fields(entry.cls)}
  common = {k: v for k, v in common.items() if k in fields and k not in kwargs}
  return entry.cls(num_heads=num_heads, dtype=dtype, name=name, **common, **kwargs)
