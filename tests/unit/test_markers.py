"""The quick loop and the full run: slow tests are marked, and still run by default."""

from __future__ import annotations

import tomllib

import pytest

from tests.conftest import REPO


def _ini() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def test_slow_marker_is_registered_and_not_deselected_by_default():
    ini = _ini()
    assert any(m.split(":")[0] == "slow" for m in ini["markers"])
    # CI and the README run plain `python -m pytest`: nothing may be left out there.
    assert "-m" not in ini.get("addopts", "").split()


def test_conformance_replay_is_marked_slow():
    from tests.integration import test_conformance

    marks = test_conformance.pytestmark
    marks = marks if isinstance(marks, list) else [marks]
    assert pytest.mark.slow.mark in [m.mark for m in marks]
