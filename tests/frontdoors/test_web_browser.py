"""The web front door end to end, in a real browser: Debian's headless Chromium, fenced in to
loopback, against the whole service (`Application`) and a fake open relay on 127.0.0.1.

The service runs in an event loop on a thread of its own, because selenium blocks. The fake
relay forwards the test messages it accepts to the service's canary sink, so the verdict is
"relayed", proven by delivery. With `RELAYPROBE_SCREENSHOT=docs/img/web-result.png` the first
test also saves the README's picture of the finished page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import json
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from relayprobe.app import Application
from relayprobe.fakemx import FakeMailServer, relays_everything
from relayprobe.operations.config import Endpoint, Settings
from relayprobe.operations.startup import StartupError
from relayprobe.reports.webpages import VERDICT_HEADLINES
from tests.infra.browser import Browser, assert_clean, wait_for
from tests.infra.haproxy import free_port

T = TypeVar("T")

# Upper bounds, not paces the tests rely on: a page step, a whole test (3 s of it waiting for
# relayed messages), starting and stopping the service.
WAIT_S = 10.0
TEST_WAIT_S = 30.0
START_S = 15.0
STOP_S = 15.0
CONFIRM_WAIT_S = 3.0
# A desktop window: the finished page, verdict and transcript, in one README picture.
SCREENSHOT_WINDOW = (1200, 1600)
RESULT_LINK = re.compile(r"/results/([A-Za-z0-9_-]{22})")
OTHER_SITE_HOST = "127.0.0.3"


@dataclasses.dataclass
class RunningService:
    """The whole service and the fake relay it tests, on an event loop in another thread."""

    app: Application
    relay: FakeMailServer
    loop: asyncio.AbstractEventLoop

    @property
    def origin(self) -> str:
        web = self.app.web_addresses[0]
        return f"http://{web.host}:{web.port}"

    def call(self, function: Callable[[], T]) -> T:
        """`function()` on the service's loop, where its state may be read safely."""

        async def call() -> T:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(WAIT_S)

    def tests_started(self) -> float | None:
        return self.call(
            lambda: self.app.metrics.registry.get_sample_value("relayprobe_tests_started_total")
        )


async def start_service(state_dir: Path) -> tuple[Application, FakeMailServer]:
    """The service with its web front door at its own public URL, testing a fake open relay."""
    relay = FakeMailServer(relay=relays_everything)
    relay_port = await relay.start()
    try:
        app = await start_application(state_dir, relay_port)
    except BaseException:
        await relay.stop()
        raise
    # The relay's "queue" delivers to the canary sink, known only now that the service runs.
    assert app.sink_address is not None
    relay.forward_to = (app.sink_address.host, app.sink_address.port)
    return app, relay


async def start_application(state_dir: Path, relay_port: int, *, attempts: int = 3) -> Application:
    """The service, on a web port chosen beforehand: its public URL must name it. The port is
    free when chosen; should another process take it before the bind, another one is tried."""
    while True:
        attempts -= 1
        web = Endpoint("127.0.0.1", free_port("127.0.0.1"))
        settings = Settings(
            listen=(Endpoint("127.0.0.1", 0),),
            web_listen=(web,),
            public_url=f"http://{web.host}:{web.port}",
            sink_listen=Endpoint("127.0.0.1", 0),
            confirm=True,
            confirm_wait=CONFIRM_WAIT_S,
            target_port=relay_port,
            reply_timeout=5.0,
            history=True,
            state_dir=str(state_dir),
        )
        app = Application(settings)
        try:
            await app.start()
        except StartupError as exc:
            if exc.errno != errno.EADDRINUSE or attempts == 0:
                raise
        else:
            return app


async def stop_service(app: Application, relay: FakeMailServer) -> None:
    try:
        await app.shutdown()
    finally:
        await relay.stop()


@pytest.fixture
def service(tmp_path: Path) -> Iterator[RunningService]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="relayprobe-service", daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout)

    try:
        app, relay = run(start_service(tmp_path / "state"), START_S)
        try:
            yield RunningService(app, relay, loop)
        finally:
            run(stop_service(app, relay), STOP_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_S)
        assert not thread.is_alive(), "the service's event loop did not stop"
        loop.close()


@dataclasses.dataclass(frozen=True)
class OtherSite:
    """A static site on another loopback address: another origin, and another site."""

    origin: str
    root: Path


@pytest.fixture
def other_site(tmp_path: Path) -> Iterator[OtherSite]:
    root = tmp_path / "other-site"
    root.mkdir()
    server = ThreadingHTTPServer(
        (OTHER_SITE_HOST, 0), functools.partial(SimpleHTTPRequestHandler, directory=root)
    )
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield OtherSite(f"http://{OTHER_SITE_HOST}:{server.server_address[1]}", root)
    server.shutdown()
    server.server_close()
    thread.join(WAIT_S)


def stored_json(url: str) -> dict[str, Any] | None:
    """The JSON at `url`, or None while it is 404 (the history writer has not saved it yet)."""
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as response:
            assert response.headers["Content-Type"] == "application/json"
            found: dict[str, Any] = json.load(response)
            return found
    except urllib.error.HTTPError as exc:
        if exc.code != HTTPStatus.NOT_FOUND:
            raise
        return None


def text_content(driver: WebDriver, element_id: str) -> str:
    """All the text of an element, also what it has scrolled out of view."""
    text = driver.find_element(By.ID, element_id).get_property("textContent")
    assert isinstance(text, str)
    return text


def save_screenshot(browser: Browser, tmp_path: Path) -> None:
    """Into the test's tmp_path always; also where RELAYPROBE_SCREENSHOT says, when it does."""
    paths = [tmp_path / "web-result.png"]
    if target := os.environ.get("RELAYPROBE_SCREENSHOT"):
        paths.append(Path(target))
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(path)
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_browser_runs_a_test_and_follows_its_full_result(
    browser: Browser, service: RunningService, tmp_path: Path
) -> None:
    driver = browser.driver
    driver.set_window_size(*SCREENSHOT_WINDOW)
    origin = service.origin
    driver.get(origin + "/")
    assert driver.find_element(By.CSS_SELECTOR, "strong.address").text == "127.0.0.1"
    assert driver.find_element(By.ID, "admission").text == "You can test this address now."
    commands = [item.text for item in driver.find_elements(By.CSS_SELECTOR, ".commands li")]
    assert commands == ["telnet 127.0.0.1", f"curl -N {origin}/"]
    assert service.tests_started() == 0

    button = driver.find_element(By.ID, "start")
    assert button.text == "Test 127.0.0.1 now"
    button.send_keys(Keys.ENTER)

    verdict = driver.find_element(By.ID, "verdict")
    WebDriverWait(driver, TEST_WAIT_S).until(lambda _: verdict.is_displayed())
    headline = VERDICT_HEADLINES["relayed"]
    assert driver.find_element(By.ID, "verdict-headline").text == headline
    assert verdict.get_attribute("class") == "verdict verdict-relayed"
    assert driver.find_element(By.ID, "status").text == f"Test finished: {headline}"
    # textContent: the transcript scrolls, and its top is out of view by now.
    lines = text_content(driver, "transcript").split("\n")
    assert any(line.startswith(">>> RCPT TO:") for line in lines)
    assert any(line.startswith(":Relayed: ") for line in lines)
    link = driver.find_element(By.ID, "full-result-link").get_attribute("href")
    assert link is not None
    match = RESULT_LINK.fullmatch(link.removeprefix(origin))
    assert match is not None, link
    result_id = match.group(1)
    assert f"Full result: {link}" in lines
    assert service.tests_started() == 1
    assert_clean(browser)
    save_screenshot(browser, tmp_path)

    # The history writer saves on a thread of its own: the result is stored soon, not at once.
    stored = wait_for(driver, lambda _: stored_json(f"{link}.json"))
    assert stored is not None
    assert stored["verdict"] == "relayed"
    assert stored["id"] == result_id
    assert stored["relayed"] >= 1

    driver.find_element(By.ID, "full-result-link").click()
    wait_for(driver, lambda d: d.current_url == link)
    assert driver.find_element(By.ID, "verdict-headline").text == headline
    assert text_content(driver, "transcript").split("\n") == stored["transcript"]
    assert_clean(browser)


# Every way another site's page could make the browser call the service, each reporting how
# it ended: a CORS fetch is refused (or sees 403), an opaque one sees the service answer.
CROSS_SITE_SCRIPT = """
const target = %s;
const image = new Promise((resolve) => {
  const pixel = new Image();
  pixel.onload = () => resolve("image loaded");
  pixel.onerror = () => resolve("image failed");
  pixel.src = target + "/";
  document.body.append(pixel);
});
const ended = (request, name) =>
  request.then((response) => name + " " + (response.type === "opaque" ? "opaque" : response.status),
               () => name + " refused");
Promise.all([
  ended(fetch(target + "/test", { method: "POST" }), "cors"),
  ended(fetch(target + "/test", { method: "POST", mode: "no-cors" }), "no-cors post"),
  ended(fetch(target + "/", { mode: "no-cors" }), "no-cors get"),
  image,
]).then((outcomes) => {
  document.getElementById("outcomes").textContent = JSON.stringify(outcomes);
  document.title = "done";
});
"""


def test_a_cross_site_page_cannot_start_a_test(
    browser: Browser, service: RunningService, other_site: OtherSite
) -> None:
    origin = service.origin
    script = CROSS_SITE_SCRIPT % json.dumps(origin)
    (other_site.root / "index.html").write_text(
        '<!DOCTYPE html><html lang="en"><link rel="icon" href="data:,"><title>elsewhere</title>'
        f'<p id="outcomes"></p><script>{script}</script>'
    )
    driver = browser.driver
    driver.get(other_site.origin + "/")
    wait_for(driver, lambda d: d.title == "done")

    cors, *opaque = json.loads(driver.find_element(By.ID, "outcomes").text)
    assert cors in ("cors refused", "cors 403")
    # The service answered: an opaque response is an HTTP answer, where a network error rejects.
    assert opaque == ["no-cors post opaque", "no-cors get opaque", "image failed"]
    assert service.tests_started() == 0
    assert service.call(lambda: len(service.app.core.running)) == 0
    # What the browser logged is the refusals of the service, and nothing left loopback.
    errors = browser.console_errors()
    assert errors
    assert all(origin in error for error in errors), errors
    assert browser.off_loopback() == []
    requested = browser.requested
    assert requested.count(f"{origin}/test") == 2
    assert requested.count(f"{origin}/") == 2

    # Nothing was charged either: the caller may still test, as its own page says.
    driver.get(origin + "/")
    assert driver.find_element(By.ID, "admission").text == "You can test this address now."
    assert service.tests_started() == 0
