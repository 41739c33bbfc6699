"""A third-party protocol module, installed from its own package, run by afpa.

``examples/afpa-quotes`` is built and installed with pip into a scratch
directory (never into this environment); afpa finds it through the
``afpa.modules`` entry point alone, serves it on a real loopback socket and
finds its table in its package.  Offline: no build isolation, no index.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tomllib

import pytest

from tests.conftest import REPO, free_port, wait_port

pytestmark = pytest.mark.integration

EXAMPLE = REPO / "examples" / "afpa-quotes"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example installed into a fresh target directory: its path, for PYTHONPATH."""
    base = tmp_path_factory.mktemp("kit")
    # Built from a copy: a build writes build/ and *.egg-info next to its sources.
    src = shutil.copytree(EXAMPLE, base / "src", ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                              "__pycache__"))
    target = base / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--root-user-action=ignore", "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


def env_with(target) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}


def afpa(target, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "afpa", *args], cwd=REPO, env=env_with(target),
                          capture_output=True, text=True, timeout=60)


def test_the_installed_module_is_served_through_its_entry_point(installed, tmp_path):
    quotes = tmp_path / "quotes"
    quotes.mkdir()
    (quotes / "knuth.txt").write_text("Premature optimization is the root of all evil.\n")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "afpa", "serve", "--module", "quotes", "--listen", f"127.0.0.1:{port}",
         "--quotes-dir", str(quotes), "--quote-ttl", "300"],
        cwd=REPO, env=env_with(installed), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            lines = s.makefile("rb")
            assert lines.readline() == b"+OK quotes ready\r\n"  # the server spoke first

            def ask(line: bytes) -> bytes:
                s.sendall(line)
                return lines.readline()

            assert ask(b"GET turing\r\n") == b"-ERR no quote for turing\r\n"
            assert ask(b"GET knuth\r\n") == b"+OK Premature optimization is the root of all evil.\r\n"
            # Changed on disk, still answered from the cache.
            (quotes / "knuth.txt").write_text("changed\n")
            assert ask(b"GET knuth\r\n") == b"+OK Premature optimization is the root of all evil.\r\n"
            assert ask(b"FETCH knuth\r\n") == b"-ERR bad command (GET <key> or QUIT)\r\n"
            assert ask(b"QUIT\r\n") == b"+OK bye\r\n"
            assert lines.read() == b""  # and closed
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert b"quotes.toml" in err  # the startup log names the table it found in the package


def test_afpa_tables_and_check_find_the_module_table(installed, tmp_path):
    shipped = (installed / "afpa_quotes" / "tables" / "quotes.toml").read_text()
    assert "quotes" in afpa(installed, "tables", "list").stdout.split()
    shown = afpa(installed, "tables", "show", "quotes")
    assert shown.returncode == 0 and shown.stdout == shipped
    checked = afpa(installed, "tables", "check", "quotes")
    assert checked.returncode == 0 and checked.stdout == "quotes: ok\n"
    graph = afpa(installed, "tables", "graph", "quotes")
    assert graph.returncode == 0 and "read_quote" in graph.stdout
    ok = afpa(installed, "check", "--module", "quotes", "--quotes-dir", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    bad = afpa(installed, "check", "--module", "quotes", "--quotes-dir", str(tmp_path / "nowhere"))
    assert bad.returncode == 1 and "--quotes-dir: not a directory" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_example_passes_its_own_socket_free_tests_when_installed(installed):
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          cwd=REPO, env=env_with(installed), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    where = subprocess.run([sys.executable, "-c", "import afpa_quotes; print(afpa_quotes.__file__)"],
                           cwd=REPO, env=env_with(installed), capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(installed))


def test_afpa_itself_does_not_package_the_example():
    """``pip install -e .`` of afpa finds afpa's packages only: the example is
    its own distribution, reached only once installed."""
    from setuptools import find_packages

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = project["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(REPO), include=find.get("include", ("*",)), exclude=find.get("exclude", ()))
    assert packages and not [p for p in packages if p.startswith(("examples", "afpa_quotes", "tests"))]
    assert "quotes" not in project["project"]["entry-points"]["afpa.modules"]
    plain = subprocess.run([sys.executable, "-c", "import afpa_quotes"], cwd=REPO, capture_output=True,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=60)
    assert plain.returncode != 0  # not importable from afpa's own tree
