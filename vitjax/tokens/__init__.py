"""Token reduction: every reducer is reachable by name through `registry`.

Each module of this package registers its reducers on import; importing the package imports them all.
"""
import importlib
import pkgutil

from vitjax.tokens import registry
from vitjax.tokens.base import Reducer, TokenState, initial_state, take_state, take_tokens  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
  if _m.name not in ("base", "registry"):
    importlib.import_module(f"{__name__}.{_m.name}")

get = registry.get
names = registry.names
