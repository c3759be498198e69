"""Debian's Chromium, headless, driven by selenium and fenced in to loopback.

`headless_chromium()` starts /usr/bin/chromium through /usr/bin/chromedriver (a driver path is
given, so selenium-manager never runs and nothing is downloaded) and yields a `Browser`: the
selenium driver, plus what the page logged to its console and every URL it requested.

The fence: every request goes through a proxy at a loopback port that refuses connections (a
socket bound for the browser's lifetime and never listening), and host names other than
localhost resolve to nothing. Chromium sends loopback requests directly (it never proxies
them), so pages on 127.0.0.0/8 and ::1 load, and any other request fails on this machine.
`Browser.off_loopback()` names such requests, so a test can assert that a page made none.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import socket
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW_SIZE = (1280, 1024)

# Schemes whose URLs name no host: the page's own data: favicon, blobs, about:blank.
_HOSTLESS_SCHEMES = frozenset({"data", "blob", "about"})


def chromium_available() -> str | None:
    """Why browser tests must skip, or None when they can run."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not path.exists():
            return f"{path} is missing (run .ci/system-packages as root)"
    return None


def is_loopback_url(url: str) -> bool:
    """Whether fetching `url` stays on this machine."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in _HOSTLESS_SCHEMES:
        return True
    host = parsed.hostname
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Browser:
    """A headless Chromium: its driver and what its pages logged and requested so far."""

    driver: webdriver.Chrome
    console: list[dict[str, Any]] = field(default_factory=list)
    """Console and network messages, each {"level", "message", "source", "timestamp"}."""
    requested: list[str] = field(default_factory=list)
    """The URL of every request pages made (Network.requestWillBeSent), in order."""

    def collect(self) -> None:
        """Move the driver's buffered logs (which reading empties) into `console`/`requested`."""
        # Selenium leaves get_log untyped: it returns a list of dicts.
        self.console.extend(self.driver.get_log("browser"))  # type: ignore[no-untyped-call]
        for entry in self.driver.get_log("performance"):  # type: ignore[no-untyped-call]
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                self.requested.append(message["params"]["request"]["url"])

    def console_errors(self) -> list[str]:
        """The messages logged as errors: script errors, failed loads, CSP violations."""
        self.collect()
        return [entry["message"] for entry in self.console if entry["level"] == "SEVERE"]

    def off_loopback(self) -> list[str]:
        """Requested URLs that would have left the machine, had the fence not stopped them."""
        self.collect()
        return [url for url in self.requested if not is_loopback_url(url)]

    def save_screenshot(self, path: Path) -> None:
        """A PNG of the whole page, not only the part in the window."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        path.write_bytes(base64.b64decode(shot["data"]))


def chromium_options(proxy_port: int) -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        # The pages are the tests' own; CI containers lack the namespaces the sandbox needs.
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
        f"--proxy-server=http://127.0.0.1:{proxy_port}",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.* , EXCLUDE ::1",
        # Quiet the browser's own traffic; the fence stops what remains.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    options.add_experimental_option("perfLoggingPrefs", {"enableNetwork": True})
    return options


@contextlib.contextmanager
def headless_chromium() -> Iterator[Browser]:
    """A fenced headless Chromium for the block; quit afterwards."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as dead_proxy:
        dead_proxy.bind(("127.0.0.1", 0))
        driver = webdriver.Chrome(
            service=Service(str(CHROMEDRIVER)),
            options=chromium_options(dead_proxy.getsockname()[1]),
        )
        try:
            yield Browser(driver)
        finally:
            driver.quit()


def wait_for(
    driver: WebDriver, condition: Callable[[WebDriver], Any], *, timeout_s: float = 10.0
) -> Any:
    """What `condition` returns once it is truthy; fails the test after `timeout_s`."""
    return WebDriverWait(driver, timeout_s).until(condition)


def assert_clean(browser: Browser) -> None:
    """No script error or CSP violation was logged, and no request left loopback."""
    assert browser.console_errors() == []
    assert browser.off_loopback() == []
    assert browser.requested, "the performance log recorded no request at all"
