"""Fixtures of the integration tests: a real Apache httpd (see apache.py)."""

from tests.integration.apache import apache, apache_module  # noqa: F401  (fixtures, found by name)
