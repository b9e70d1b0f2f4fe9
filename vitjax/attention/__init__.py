"""The attention zoo: every mechanism is reachable by name through `registry`."""
from vitjax.attention import registry
from vitjax.attention.base import AUX_FIELDS, Attention, AttnContext, Capabilities
from vitjax.attention import mhsa  # noqa: F401  (registers)

get = registry.get
names = registry.names
build = registry.build
