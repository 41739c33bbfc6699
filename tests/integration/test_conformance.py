"""The shared HTTP/1.1 conformance corpus replayed through afpa (reverse-proxy mode).

The corpus and its harness live in ../shared/conformance/http1/ and are read
from there, never copied.  afpa's bar: every case passes, and no request is
smuggled to the backend.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port, wait_port

# Minutes long: left out of the quick loop (-m "not slow"), run by CI and plain pytest.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

CORPUS = REPO.parent / "shared" / "conformance" / "http1"


def test_replay_corpus(tmp_path):
    cases, replay = CORPUS / "cases.jsonl", CORPUS / "replay.py"
    if not cases.exists() or not replay.exists():
        pytest.skip(f"conformance corpus not found at {CORPUS} (it comes with the shared/ folder beside the checkout)")
    proxy_port, backend_port = free_port(), free_port()
    afpa = subprocess.Popen([sys.executable, "-m", "afpa", "serve", "--backend", f"http://127.0.0.1:{backend_port}",
                             "--listen", f"127.0.0.1:{proxy_port}", "--quiet"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(proxy_port, afpa)
        out = tmp_path / "replay.jsonl"
        run = subprocess.run([sys.executable, str(replay), "--cases", str(cases), "--proxy", f"127.0.0.1:{proxy_port}",
                              "--backend-port", str(backend_port), "--out", str(out)],
                             capture_output=True, text=True, timeout=1200)
    finally:
        afpa.terminate()
        afpa.communicate(timeout=10)
    summary = [line for line in run.stdout.splitlines() if line.startswith("SUMMARY")]
    assert summary, run.stdout[-2000:] + run.stderr[-2000:]
    passed = int(re.search(r"'PASS': (\d+)", summary[0]).group(1))
    failed = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    total = sum(1 for line in cases.read_text().splitlines() if line.strip())
    print(f"conformance: {passed}/{total}")
    assert "smuggle" not in summary[0], summary[0]
    assert not failed, "\n".join(failed)
    assert passed == total
