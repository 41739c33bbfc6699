"""A real Apache httpd (Debian's ``apache2``) on 127.0.0.1, owned by the tests.

The server runs from a config written entirely by this module into a private
temp dir (it never reads ``/etc/apache2`` and writes nothing to ``/var/log`` or
``/var/run``).  It runs in the foreground (``-DFOREGROUND``) as a child process
in its own session, so ``stop()`` can take down the whole process group.

Layout of ``root`` (``tempfile.mkdtemp`` under /tmp, chmod 0755 so the
unprivileged ``User`` — www-data when running as root — can traverse it)::

    httpd.conf   mime.types   httpd.pid   error.log   access.log   run/
    htdocs/static.txt      known body, see STATIC_BODY
    htdocs/cacheable.txt   served with "Cache-Control: max-age=60"
    (text types are gzipped for clients that accept it: Debian's default mod_deflate)
    htdocs/ws/index.html   an ordinary directory with an index
    cgi-bin/dynamic.sh     Cache-Control: no-store, unique body per call

Usage::

    from tests.integration.apache import apache, apache_module  # fixtures

    def test_x(apache):
        urllib.request.urlopen(apache.url("/static.txt"))
        apache.wait_access_log(1, contains="/static.txt")
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

MODULE_DIR = Path("/usr/lib/apache2/modules")
SKIP_REASON = "apache2 is not installed; CI installs it with apt-get install -y apache2"

STATIC_BODY = b"static file served by apache\n"
CACHEABLE_BODY = b"cacheable file, max-age=60\n"
WS_BODY = b"<p>ws index</p>\n"

# Minimal module set.  log_config and unixd are compiled into Debian's apache2
# (see ``apache2 -l``); they are loaded only where they are not built in.
MODULES = [
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("mime_module", "mod_mime.so"),
    ("dir_module", "mod_dir.so"),
    ("alias_module", "mod_alias.so"),
    ("cgid_module", "mod_cgid.so"),
    ("env_module", "mod_env.so"),
    ("headers_module", "mod_headers.so"),
    ("filter_module", "mod_filter.so"),
    ("deflate_module", "mod_deflate.so"),
    ("rewrite_module", "mod_rewrite.so"),
    ("log_config_module", "mod_log_config.so"),
    ("unixd_module", "mod_unixd.so"),
]

# Combined log format plus the response time in microseconds.
LOG_FORMAT = r'%h %l %u %t \"%r\" %>s %b \"%{Referer}i\" \"%{User-Agent}i\" %D'

CGI_SCRIPT = """#!/bin/sh
printf 'Content-Type: text/plain\\r\\n'
printf 'Cache-Control: no-store\\r\\n'
printf '\\r\\n'
printf 'pid=%s time=%s query=%s\\n' "$$" "$(date +%s%N)" "$QUERY_STRING"
"""

MIME_TYPES = """text/plain\ttxt
text/html\thtml htm
text/css\tcss
application/javascript\tjs
application/json\tjson
image/png\tpng
image/jpeg\tjpg jpeg
image/gif\tgif
"""


def apache_binary() -> str | None:
    found = shutil.which("apache2")
    if found:
        return found
    if os.access("/usr/sbin/apache2", os.X_OK):
        return "/usr/sbin/apache2"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_user_group() -> tuple[str, str]:
    """Apache refuses to serve as root: pick an unprivileged account if we are root."""
    if os.geteuid() != 0:
        # Not root: setuid is impossible anyway, so name ourselves.
        return pwd.getpwuid(os.geteuid()).pw_name, grp.getgrgid(os.getegid()).gr_name
    for user in ("www-data", "nobody", "daemon"):
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            continue
        return user, grp.getgrgid(pw.pw_gid).gr_name
    raise RuntimeError("no unprivileged user (www-data/nobody/daemon) to run apache2 as")


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie-reaped) processes whose process group is ``pgid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the ")" closing comm: state ppid pgrp ...
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


class ApacheServer:
    """Apache httpd on ``127.0.0.1:<port>`` with a private config and docroot."""

    def __init__(self, port: int | None = None, extra_config: str = ""):
        self.binary = apache_binary()
        if self.binary is None:
            raise RuntimeError(SKIP_REASON)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.root = Path(tempfile.mkdtemp(prefix="afpa-apache-", dir="/tmp"))
        self.root.chmod(0o755)
        self.htdocs = self.root / "htdocs"
        self.cgi_bin = self.root / "cgi-bin"
        self.run_dir = self.root / "run"
        self.conf_path = self.root / "httpd.conf"
        self.pid_file = self.root / "httpd.pid"
        self.error_log = self.root / "error.log"
        self.access_log = self.root / "access.log"
        self.user, self.group = _run_user_group()
        self.proc: subprocess.Popen | None = None
        self._stderr = None
        self._populate()
        self.write_config()

    # -- content ---------------------------------------------------------
    def _populate(self) -> None:
        for d in (self.htdocs, self.cgi_bin, self.run_dir, self.htdocs / "ws"):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        self.write_file("static.txt", STATIC_BODY)
        self.write_file("cacheable.txt", CACHEABLE_BODY)
        self.write_file("ws/index.html", WS_BODY)
        script = self.cgi_bin / "dynamic.sh"
        script.write_text(CGI_SCRIPT)
        script.chmod(0o755)
        (self.root / "mime.types").write_text(MIME_TYPES)

    def write_file(self, rel: str, data: bytes | str) -> Path:
        """Create/replace ``htdocs/<rel>`` readable by the apache user."""
        path = self.htdocs / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o755)
        if isinstance(data, str):
            data = data.encode()
        path.write_bytes(data)
        path.chmod(0o644)
        return path

    def config_text(self) -> str:
        r = self.root
        load = []
        for name, so in MODULES:
            if (MODULE_DIR / so).exists():
                load.append(f"<IfModule !{name}>\n    LoadModule {name} {MODULE_DIR / so}\n</IfModule>")
        loads = "\n".join(load)
        return f"""# Written by tests/integration/apache.py -- self-contained, no /etc/apache2.
ServerRoot "{r}"
DefaultRuntimeDir "{self.run_dir}"
PidFile "{self.pid_file}"
Mutex file:{self.run_dir} default
Listen 127.0.0.1:{self.port}
ServerName 127.0.0.1:{self.port}

{loads}

User {self.user}
Group {self.group}

ScriptSock "{self.run_dir}/cgisock"

StartServers 1
ServerLimit 4
ThreadsPerChild 25
MaxRequestWorkers 100
MinSpareThreads 5
MaxSpareThreads 75
Timeout 30
KeepAlive On
MaxKeepAliveRequests 1000
KeepAliveTimeout 5
HostnameLookups Off
ServerTokens Prod
ServerSignature Off
TraceEnable Off
EnableSendfile Off

ErrorLog "{self.error_log}"
LogLevel warn
BufferedLogs Off
LogFormat "{LOG_FORMAT}" afpa
CustomLog "{self.access_log}" afpa

TypesConfig "{r}/mime.types"
DefaultType none
DirectoryIndex index.html

<Directory />
    AllowOverride None
    Require all denied
</Directory>

DocumentRoot "{self.htdocs}"
<Directory "{self.htdocs}">
    Options FollowSymLinks
    AllowOverride None
    Require all granted
</Directory>

# Debian's default mod_deflate setup (mods-enabled/deflate.conf): compressible
# types are gzipped for clients that accept it, and every such response says
# "Vary: Accept-Encoding".
<IfModule mod_deflate.c>
<IfModule mod_filter.c>
    AddOutputFilterByType DEFLATE text/html text/plain text/xml text/css text/javascript
    AddOutputFilterByType DEFLATE application/x-javascript application/javascript application/ecmascript
    AddOutputFilterByType DEFLATE application/rss+xml application/wasm application/xml
</IfModule>
</IfModule>

<Files "cacheable.txt">
    Header set Cache-Control "max-age=60"
</Files>

ScriptAlias /cgi-bin/ "{self.cgi_bin}/"
<Directory "{self.cgi_bin}">
    Options +ExecCGI
    AllowOverride None
    Require all granted
</Directory>

{self.extra_config}
"""

    def write_config(self) -> None:
        self.conf_path.write_text(self.config_text())

    # -- lifecycle -------------------------------------------------------
    def _cmd(self, *args: str) -> list[str]:
        return [self.binary, "-d", str(self.root), "-f", str(self.conf_path), *args]

    def check_config(self) -> None:
        res = subprocess.run(self._cmd("-t"), capture_output=True, text=True, timeout=30, env=self._env())
        if res.returncode != 0:
            raise RuntimeError(f"apache2 -t failed:\n{res.stdout}{res.stderr}\n--- config ---\n{self.config_text()}")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APACHE_")}
        env["LANG"] = "C"
        return env

    def start(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("apache already running")
        self.write_config()
        self.pid_file.unlink(missing_ok=True)  # stale after a SIGKILLed run
        self._stderr = open(self.root / "stderr.log", "ab")
        self.proc = subprocess.Popen(
            self._cmd("-DFOREGROUND"),
            stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
            start_new_session=True, env=self._env(), cwd=self.root,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"apache2 exited with {code} during startup\n{self.diagnostics()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                if self.pid_file.exists():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"apache2 did not accept on 127.0.0.1:{self.port} within {timeout}s\n"
                                   f"{self.diagnostics()}")
            time.sleep(0.05)

    def stop(self, grace: float = 3.0, timeout: float = 10.0) -> None:
        """Stop apache and every process it started; idempotent.

        SIGTERM to the parent (it stops its children and removes the pidfile).
        Apache waits ~10 s for a worker stuck in a CGI and leaves the CGI
        itself running, so after ``grace`` seconds the whole process group is
        SIGKILLed; survivors of a clean parent exit (orphaned CGIs) are killed
        at once.  Raises if anything in the group outlives ``timeout``.
        """
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session=True: the parent leads its group
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(pgid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        if _group_pids(pgid):
            self._signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while _group_pids(pgid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"apache processes survived stop: {_group_pids(pgid)}")
            time.sleep(0.05)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _signal_group(self, pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        """Stop and delete the temp dir."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "ApacheServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # -- inspection ------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str = "/") -> str:
        if not path.startswith("/"):
            path = "/" + path
        return self.base_url + path

    def access_log_lines(self, contains: str | None = None) -> list[str]:
        """Re-read the access log now (optionally only lines containing ``contains``).

        Apache writes the line *after* the response went out, so right after a
        response the line may not be there yet (~1% of the time): prefer
        :meth:`wait_access_log` when asserting on requests just made.
        """
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if contains is None or contains in line]

    def wait_access_log(self, count: int = 1, contains: str | None = None,
                        timeout: float = 5.0, settle: float = 0.2) -> list[str]:
        """Wait until at least ``count`` (matching) lines are logged, then ``settle``
        seconds more so that "exactly N" assertions see any extra line; return them."""
        deadline = time.monotonic() + timeout
        while len(self.access_log_lines(contains)) < count:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if settle:
            time.sleep(settle)
        return self.access_log_lines(contains)

    def error_log_text(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def diagnostics(self) -> str:
        stderr = self.root / "stderr.log"
        out = stderr.read_text(errors="replace") if stderr.exists() else ""
        return f"--- stderr ---\n{out}\n--- error.log ---\n{self.error_log_text()}"


def _require_apache() -> None:
    if apache_binary() is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture
def apache():
    """A fresh Apache per test (function scope)."""
    _require_apache()
    server = ApacheServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def apache_module():
    """One Apache shared by a test module."""
    _require_apache()
    server = ApacheServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
