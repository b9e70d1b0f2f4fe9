"""Token reduction: every reducer is reachable by name through `registry`."""
from vitjax.tokens import registry
from vitjax.tokens.base import Reducer, TokenState, initial_state, take_state, take_tokens
from vitjax.tokens import identity  # noqa: F401  (registers)

get = registry.get
names = registry.names
