"""Fixtures of the integration tests: a real Apache httpd (see apache.py) and
scriptable backends (see backends.py)."""

import pytest

from tests.integration.apache import apache, apache_module  # noqa: F401  (fixtures, found by name)
from tests.integration.backends import RawBackend


@pytest.fixture
def backend():
    """``backend(respond)`` starts a RawBackend; every one is closed afterwards."""
    made = []

    def make(respond):
        b = RawBackend(respond)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
