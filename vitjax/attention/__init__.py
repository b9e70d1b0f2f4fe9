"""The attention zoo: every mechanism is reachable by name through `registry`.

Each module of this package registers its mechanisms on import; importing the package imports them
all, so adding a file is all it takes to add a mechanism.
"""
import importlib
import pkgutil

from vitjax.attention import registry
from vitjax.attention.base import AUX_FIELDS, Attention, AttnContext, Capabilities  # noqa: F401

for _m in pkgutil.iter_modules(__path__):
  if _m.name not in ("base", "registry"):
    importlib.import_module(f"{__name__}.{_m.name}")

get = registry.get
names = registry.names
build = registry.build
