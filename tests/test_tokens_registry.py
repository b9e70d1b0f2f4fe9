"""Registry-driven: every reducer has a reference test and takes exactly its declared options."""
import pytest

from vitjax import tokens
from vitjax.tokens.base import REQUIRED, Layout

import test_tokens_evit
import test_tokens_learned
import test_tokens_merge

REFERENCE_CASES = {**test_tokens_evit.REFERENCE_CASES, **test_tokens_learned.REFERENCE_CASES,
                   **test_tokens_merge.REFERENCE_CASES}
LAYOUT = Layout(depth=12, num_patches=196, num_prefix=1)


def test_every_reducer_has_a_reference_case():
  missing = sorted(set(tokens.names()) - set(REFERENCE_CASES))
  assert not missing, f"registered reducers without a reference test: {missing}"
  assert all(callable(t) and t.__name__.startswith("test_") for t in REFERENCE_CASES.values())


def required(cls) -> dict:
  """The options a reducer cannot plan without (a keep rate is its only required kind)."""
  return {k: 0.5 for k, v in cls.options.items() if v is REQUIRED}


@pytest.mark.parametrize("name", tokens.names())
def test_unknown_option_fails_in_one_line_naming_the_valid_ones(name):
  cls = tokens.get(name).cls
  with pytest.raises(ValueError) as err:
    cls.plan({**required(cls), "no_such_option": 1}, LAYOUT)
  message = str(err.value)
  assert "\n" not in message and "no_such_option" in message and "valid options" in message
  assert all(repr(k) in message for k in cls.options), message


@pytest.mark.parametrize("name", tokens.names())
def test_every_declared_option_is_accepted_with_its_default(name):
  cls = tokens.get(name).cls
  base = cls.plan(required(cls), LAYOUT)
  defaults = {k: v for k, v in cls.options.items() if v is not REQUIRED}
  for key, value in defaults.items():
    assert cls.plan({**required(cls), key: value}, LAYOUT) == base, key
  assert cls.plan({**required(cls), **defaults}, LAYOUT) == base
