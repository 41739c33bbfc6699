"""The live machine page in a real headless browser (Debian's chromium, driven by
selenium through the distro's chromedriver, offline).

afpa runs with a locked admin and a table one of whose states raises for paths
containing "boom" (a protocol module installed the way a third-party one is, through
an entry point); the test logs in on the page, sends real HTTP traffic and watches
the counts in the page change and the failing state turn red."""

from __future__ import annotations

import shutil
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from afpa.machine import tables

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TOKEN = "page-test-token-0123456789"

PLUGIN = '''
from afpa.machine.modules import ProtocolModule, collect, state
from protocols.http.states.client import derive_miss_response


@state("docroot", "remote", "deferred", "collapsed", "sibling")
def miss_or_boom(g, conn, req):
    """derive_miss_response, but raises for a path containing "boom"."""
    if b"boom" in req.path:
        raise RuntimeError("boom (on purpose, for the machine page test)")
    return derive_miss_response(g, conn, req)


MODULE = ProtocolModule("pagetest", collect([miss_or_boom]), "", None, None, None)
'''


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not shutil.which(path):
            return f"{path} not found (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        pytest.skip(f"no headless browser for the machine page test: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="afpa-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1600,1200"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(check, what: str, timeout: float = 20.0):
    """Poll ``check()`` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # the page may be between two renders
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def fetch(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture
def boom_server(tmp_path, monkeypatch, afpa_process):
    """afpa with admin_auth = "all" and a table whose miss state raises on "boom"."""
    plugins = tmp_path / "plugins"
    (plugins / "pagetest_plugin-0.dist-info").mkdir(parents=True)
    (plugins / "pagetest_plugin.py").write_text(PLUGIN)
    (plugins / "pagetest_plugin-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pagetest-plugin\nVersion: 0\n")
    (plugins / "pagetest_plugin-0.dist-info" / "entry_points.txt").write_text(
        "[afpa.modules]\npagetest = pagetest_plugin:MODULE\n")
    monkeypatch.setenv("PYTHONPATH", str(plugins))
    table = tmp_path / "boom.toml"
    table.write_text(tables.shipped_table_path("http").read_text().replace(
        'run = "derive_miss_response"', 'run = "pagetest.miss_or_boom"'))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    return afpa_process("--table", str(table), "--admin-token-file", str(token), "--admin-auth", "all")


def state_node(driver, name: str):
    return driver.find_element("css selector", f'#graph g.state[data-state="{name}"]')


def entries(driver, name: str) -> int | None:
    value = state_node(driver, name).get_attribute("data-entries")
    return None if value is None else int(value)


def test_page_shows_live_counts_and_errors(browser, boom_server):
    p = boom_server
    admin = f"http://127.0.0.1:{p.admin_port}"
    browser.get(f"{admin}/machines/http")
    # The admin is locked: the page asks for the token before it shows anything.
    login = until(lambda: browser.find_element("id", "login").is_displayed()
                  and browser.find_element("id", "login"), "the token form")
    token_box = browser.find_element("id", "token")
    token_box.send_keys("wrong-token-0123456789")
    login.submit()
    until(lambda: "refused" in browser.find_element("id", "login-msg").text, "the wrong token refused")
    token_box.send_keys(TOKEN)
    login.submit()

    before = until(lambda: entries(browser, "derive_request") is not None and entries(browser, "derive_request") + 1,
                   "the graph with its counts") - 1
    assert "idle" in state_node(browser, "refresh_stale").get_attribute("class")
    assert "error" not in state_node(browser, "derive_miss_response").get_attribute("class")

    for _ in range(5):
        assert fetch(f"http://127.0.0.1:{p.port}/hello.txt") == 200
    until(lambda: entries(browser, "derive_request") >= before + 5, "the page to count 5 more requests")
    shown = state_node(browser, "derive_request").find_element("css selector", "text.counts").text
    assert shown.startswith(f"{entries(browser, 'derive_request')} in")
    hit = browser.find_element("css selector",
                               '#graph tspan[data-from="derive_cached_response"][data-outcome="hit"]')
    until(lambda: int(hit.get_attribute("data-count")) >= 4, "the hit transition counted")
    assert hit.text.startswith("hit ")

    assert fetch(f"http://127.0.0.1:{p.port}/boom.txt") == 500
    node = until(lambda: "error" in state_node(browser, "derive_miss_response").get_attribute("class")
                 and state_node(browser, "derive_miss_response"), "the failing state highlighted")
    assert node.get_attribute("data-errors") == "1"
    row = browser.find_element("css selector", '#states tr[data-state="derive_miss_response"]')
    assert "error" in row.get_attribute("class")
    assert "1 err" in node.find_element("css selector", "text.counts").text

    # The token is kept for the tab: the index page needs no second login, and
    # links to every machine's page.
    browser.get(f"{admin}/")
    link = until(lambda: browser.find_element("css selector", '#machines tr[data-machine="http-backend"] a'),
                 "the machine list")
    assert not browser.find_element("id", "login").is_displayed()
    http_row = browser.find_element("css selector", '#machines tr[data-machine="http"]')
    assert "error" in http_row.get_attribute("class")
    for href in ("/metrics", "/healthz", "/tables/", "/machines.json"):
        assert browser.find_elements("css selector", f'nav a[href="{href}"]')
    link.click()
    until(lambda: entries(browser, "backend_connect") == 0, "the backend machine's page")
    assert browser.find_element("id", "title").text == "machine http-backend"
