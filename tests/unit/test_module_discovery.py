"""A broken third-party module never stops afpa: it is left out with one line."""

from __future__ import annotations

import sys

import pytest

from afpa import cli
from afpa.net.intrinsics import default_registry


@pytest.fixture
def broken_package(tmp_path, monkeypatch):
    """An installed package whose afpa.modules entry point fails to import, and
    one whose entry point names something that is not a ProtocolModule."""
    info = tmp_path / "brokenmods-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenmods\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[afpa.modules]\nbroken = brokenmods_import:MODULE\nwrong = brokenmods_wrong:MODULE\n")
    (tmp_path / "brokenmods_import.py").write_text("import no_such_dependency_anywhere\n")
    (tmp_path / "brokenmods_wrong.py").write_text("MODULE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("brokenmods_import", "brokenmods_wrong"):
        sys.modules.pop(name, None)


def test_a_broken_module_is_left_out_and_the_others_load(broken_package):
    reg = default_registry()
    assert "http" in reg.modules and "broken" not in reg.modules
    assert "ModuleNotFoundError" in reg.broken["broken"] and "\n" not in reg.broken["broken"]
    assert "not a ProtocolModule" in reg.broken["wrong"]


def test_the_cli_warns_once_and_refuses_to_serve_a_broken_module(broken_package, capsys):
    assert cli.main(["tables", "list"]) == 0
    out = capsys.readouterr()
    assert "http" in out.out.split()
    assert out.err.count("protocol module 'broken' not loaded") == 1
    assert cli.main(["check", "--module", "broken"]) == 1
    err = capsys.readouterr().err
    assert "protocol module 'broken' cannot be loaded: brokenmods_import:MODULE: ModuleNotFoundError" in err
    assert "Traceback" not in err
