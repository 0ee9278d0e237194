"""The live dashboard of ``fedctl serve --metrics-bind``, loaded in a real headless Chromium (Debian's chromium and
chromium-driver, driven by selenium) while real ``fedctl join`` processes train: the round counter advances, the
workers table lists the workers, the accuracy chart has points, the page fits a phone, and a token-guarded
listener lets the browser in through ``/?token=``. Screenshots land in the test's output directory (and in
``$FEDCTL_SCREENSHOT_DIR`` when set: that is how docs/img/dashboard.png is made)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import LOOPBACK_ANY, Launcher, Proc
from test_metrics import free_port, join

pytestmark = pytest.mark.timeout(300)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (`make browser` installs them; it needs root "
           "and apt-get)")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def round_shown(driver: Any) -> int:
    text = driver.find_element("id", "round").text  # "12 / 50"
    head = text.split("/")[0].strip()
    return int(head) if head.isdigit() else -1


def screenshot(driver: Any, out: Path, name: str) -> Path:
    path = out / name
    assert driver.save_screenshot(str(path)), f"no screenshot {path}"
    where = os.environ.get("FEDCTL_SCREENSHOT_DIR")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(where) / name)
    return path


@needs_browser
def test_the_dashboard_shows_a_live_run(spawn: Launcher, partition_dir: Path, tmp_path: Path,
                                        browser: Any) -> None:
    token = "dashboard-token-of-enough-length"
    (tmp_path / "token").write_text(token + "\n")
    state, port = tmp_path / "state", free_port()
    broker = spawn("serve", "serve", "--bind", LOOPBACK_ANY, "--state-dir", str(state), "--rounds", "14",
                   "--min-workers", "2", "--eval-data", "test", "--data-dir", str(partition_dir),
                   "--metrics-bind", f"127.0.0.1:{port}", "--metrics-token", str(tmp_path / "token"))
    endpoint = broker.wait_endpoint()
    site = f"http://127.0.0.1:{port}"
    workers: list[Proc] = [join(spawn, endpoint, partition_dir, i) for i in (0, 1)]

    # Without the token the page is refused; opened once with it, the cookie lets the page and its stream in.
    browser.get(site + "/")
    assert "401" in browser.page_source
    browser.get(f"{site}/?token={token}")
    assert browser.current_url == site + "/", "the token leaves the address bar"
    wait_for(lambda: browser.find_element("id", "conn").text.strip() == "live", 30, "the stream to connect")

    first = wait_for(lambda: round_shown(browser) >= 1 and round_shown(browser), 120, "a first round")
    wait_for(lambda: round_shown(browser) > max(first, 4), 120, "the round counter to advance")
    rows = wait_for(lambda: browser.find_elements("css selector", "#workers tbody tr") if len(
        browser.find_elements("css selector", "#workers tbody tr")) == 2 else None, 30, "two workers in the table")
    ids = sorted(row.find_elements("css selector", "td")[0].text for row in rows)
    assert ids == [f"shard{i}@{socket.gethostname()}" for i in (0, 1)], ids
    points = wait_for(lambda: int(browser.find_element("id", "accuracy-chart").get_attribute("data-points") or 0),
                      30, "points in the accuracy chart")
    assert points >= first
    events = browser.find_element("id", "events").text
    assert "join" in events, events
    accuracy = browser.find_element("id", "accuracy").text
    assert accuracy[:2] == "0." and 0 < float(accuracy) <= 1, accuracy
    # the page shows what the broker says: its status endpoint, read with the same cookie-less bearer header
    request = urllib.request.Request(site + "/api/status", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        status = json.loads(reply.read())
    assert status["workers_connected"] == 2 and {w["worker"] for w in status["workers"]} == set(ids)
    assert {w["device"] for w in status["workers"]} == {"cpu"} and {w["address"] for w in status["workers"]} == {
        "127.0.0.1"}
    assert abs(status["round"] - round_shown(browser)) <= 2
    wide = screenshot(browser, tmp_path, "dashboard.png")

    # a phone: nothing wider than the screen, the table scrolls inside its own box
    browser.set_window_size(390, 844)
    time.sleep(1.5)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen"
    phone = screenshot(browser, tmp_path, "dashboard-phone.png")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]]
    assert not severe, severe

    codes = {p.name: p.wait(180) for p in [broker, *workers]}
    assert all(c == 0 for c in codes.values()), "\n\n".join(p.describe() for p in [broker, *workers])
    for shot in (wide, phone):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
