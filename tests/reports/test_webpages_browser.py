"""The web pages in a real browser: Debian's headless Chromium, fenced in to loopback.

A stand-in for the front door on 127.0.0.1 serves the pages with their Content-Security-Policy
and answers `POST /test` with a canned NDJSON stream, held half-way until the test has looked
at the page mid-test. (The end-to-end test against the real service is the front door's.)
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from relayprobe.relaytest.events import Outcome, ProbeFinished, Summary
from relayprobe.reports.render import json_result
from relayprobe.reports.webpages import (
    CONTENT_TYPE,
    OUTCOME_WORDS,
    VERDICT_HEADLINES,
    content_security_policy,
    landing_page,
    new_nonce,
    result_page,
)
from tests.infra.browser import Browser, assert_clean, wait_for

# An upper bound for what the page does at once, not a pace the test relies on.
WAIT_S = 10.0
RESULT_PATH = "/results/Zx3vQ9bT0yK2mW8sL4nR1a"
HOSTILE_LINES = (
    "<<< 250-<script>window.pwned = 1</script>",
    "<<< 250-</pre><img src=x>",
    """<<< 250 "quoted" & 'single' &amp; <b>bold</b>""",
)
PROBES = (
    ProbeFinished("Test 1", "<a@x>", "<nobody@relaytest.invalid>", Outcome.REJECTED, "554 no"),
    ProbeFinished("Test 2", "<a@x>", "<nobody@relaytest.invalid>", Outcome.DEFERRED, "454 later"),
    ProbeFinished("Test 3", "<a@x>", "<nobody@relaytest.invalid>", Outcome.ACCEPTED, "250 Ok"),
    ProbeFinished("Test 4", "<a@x>", "<nobody@relaytest.invalid>", Outcome.RELAYED, "250 Ok"),
    ProbeFinished("Test 5", "<a@x>", "<nobody@relaytest.invalid>", Outcome.ERROR, ""),
)
SUMMARY = Summary(
    target="127.0.0.1",
    host="mx.customer.example",
    banner="220 mx.customer.example ESMTP <b>Postfix</b>",
    verdict="relayed",
    lines=(
        "Tested host banner: 220 mx.customer.example ESMTP <b>Postfix</b>",
        "System appeared to accept 2 relay attempts",
        "Relay confirmed: 1 of 2 test messages arrived (Test 4)",
        "Note: this is an open relay: it passed test messages on to a third party's domain",
    ),
    probes=PROBES,
    started_at=1_700_000_000.0,
    duration_s=31.5,
)


HEAD_LINES = (
    "Connecting to 127.0.0.1 ...",
    "<<< 220 mx.customer.example ESMTP <b>Postfix</b>",
    *HOSTILE_LINES,
)


def probe_lines(probe: ProbeFinished) -> list[str]:
    reply = f"<<< {probe.reply}" if probe.reply else ":no reply within 30 s; giving up"
    return [f":Relay test: #{probe.name}", f">>> RCPT TO:{probe.rcpt_to}", reply]


def transcript_lines() -> list[str]:
    lines = list(HEAD_LINES)
    for probe in PROBES:
        lines += probe_lines(probe)
    return lines + list(SUMMARY.lines)


def stored_result(origin: str) -> dict[str, Any]:
    result = json_result(SUMMARY, transcript_lines())
    return {"id": RESULT_PATH.rsplit("/", 1)[1], "url": origin + RESULT_PATH, **result}


def line_events(lines: Iterable[str]) -> list[dict[str, Any]]:
    return [{"type": "line", "text": line} for line in lines]


def ndjson_events(origin: str) -> list[dict[str, Any]]:
    """The stream of a whole test: lines, a probe event after each probe's lines, the result.

    As in the service, a probe event says `accepted` for a probe the result calls `relayed`.
    """
    events = line_events(HEAD_LINES)
    for probe in PROBES:
        events += line_events(probe_lines(probe))
        live = Outcome.ACCEPTED if probe.outcome is Outcome.RELAYED else probe.outcome
        events.append({"type": "probe", "name": probe.name, "outcome": live.value})
    events += line_events(SUMMARY.lines)
    events.append({"type": "result", "result": stored_result(origin)})
    return events


class FrontDoorStandIn(ThreadingHTTPServer):
    """Pages at their paths, and `POST /test` streaming `head`, then `tail` once released."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StandInHandler)
        self.pages: dict[str, Callable[[str], bytes]] = {}
        self.head: list[dict[str, Any]] = []
        self.tail: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.refusal: tuple[HTTPStatus, str] | None = None
        self.test_requests: list[dict[str, str]] = []
        self.without_csp: set[str] = set()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StandInHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FrontDoorStandIn

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests assert what matters."""

    def _plain(self, status: HTTPStatus, line: str) -> None:
        body = (line + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = (json.dumps(event) + "\n").encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def do_GET(self) -> None:
        page = self.server.pages.get(self.path)
        if page is None:
            self._plain(HTTPStatus.NOT_FOUND, "Not found")
            return
        nonce = new_nonce()
        body = page(nonce)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", CONTENT_TYPE)
        if self.path not in self.server.without_csp:
            self.send_header("Content-Security-Policy", content_security_policy(nonce))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.server.test_requests.append({k.lower(): v for k, v in self.headers.items()})
        if self.path != "/test":
            self._plain(HTTPStatus.NOT_FOUND, "Not found")
            return
        if self.server.refusal is not None:
            self._plain(*self.server.refusal)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in self.server.head:
            self._chunk(event)
        if self.server.release.wait(WAIT_S):
            for event in self.server.tail:
                self._chunk(event)
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def front_door() -> Iterator[FrontDoorStandIn]:
    server = FrontDoorStandIn()
    origin = server.origin
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.pages["/"] = lambda nonce: landing_page(
        caller="127.0.0.1",
        admission="You can test this address now.",
        commands=["telnet relay-test.isp.example", "curl -N http://relay-test.isp.example/"],
        service_name="relay-test.isp.example",
        nonce=nonce,
    )
    server.pages[RESULT_PATH] = lambda nonce: result_page(stored_result(origin), nonce=nonce)
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(WAIT_S)


def press_tab_until_focused(driver: WebDriver, element_id: str) -> None:
    """Move the keyboard focus to `element_id` as a keyboard user would: with Tab."""
    for _ in range(30):
        if driver.execute_script("return document.activeElement.id") == element_id:
            return
        ActionChains(driver).send_keys(Keys.TAB).perform()
    pytest.fail(f"Tab never reached #{element_id}")


def test_landing_page_runs_the_test_live_and_shows_the_verdict(
    browser: Browser, front_door: FrontDoorStandIn, tmp_path: Path
) -> None:
    events = ndjson_events(front_door.origin)
    # Held after the probe that the result will call relayed.
    held = events.index({"type": "probe", "name": "Test 4", "outcome": "accepted"}) + 1
    front_door.head, front_door.tail = events[:held], events[held:]
    driver = browser.driver
    driver.get(front_door.origin + "/")
    button = driver.find_element(By.ID, "start")
    assert button.text == "Test 127.0.0.1 now"

    press_tab_until_focused(driver, "start")
    ActionChains(driver).send_keys(Keys.SPACE).perform()

    # Mid-test: what streamed so far is on the page, the button waits for the end.
    transcript = driver.find_element(By.ID, "transcript")
    wait_for(driver, lambda _: "Test 4: accepted" in transcript.text)
    assert not button.is_enabled()
    assert not driver.find_element(By.ID, "verdict").is_displayed()
    assert driver.find_element(By.ID, "status").text == "Testing 127.0.0.1 ..."

    front_door.release.set()
    verdict = driver.find_element(By.ID, "verdict")
    wait_for(driver, lambda _: verdict.is_displayed())

    assert verdict.get_attribute("class") == "verdict verdict-relayed"
    headline = driver.find_element(By.ID, "verdict-headline")
    assert headline.text == VERDICT_HEADLINES["relayed"]
    assert driver.switch_to.active_element == headline
    assert driver.find_element(By.ID, "status").text == (
        "Test finished: " + VERDICT_HEADLINES["relayed"]
    )
    assert driver.find_element(By.ID, "verdict-summary").text.split("\n") == list(SUMMARY.lines)
    assert button.is_enabled()
    # The transcript is the stream's lines, as text, each probe's outcome after its lines,
    # as the result has it.
    shown = transcript.text.split("\n")
    marks = [f"{probe.name}: {OUTCOME_WORDS[probe.outcome]}" for probe in PROBES]
    assert [line for line in shown if line not in marks] == transcript_lines()
    assert [
        (mark.text, mark.get_attribute("class"))
        for mark in transcript.find_elements(By.CSS_SELECTOR, ".outcome")
    ] == [
        (text, f"outcome outcome-{probe.outcome.value}")
        for text, probe in zip(marks, PROBES, strict=True)
    ]
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.execute_script("return window.pwned") is None

    # The POST was same-origin, without a body, asking for NDJSON.
    (request,) = front_door.test_requests
    assert request["accept"] == "application/x-ndjson"
    assert request["origin"] == front_door.origin
    assert request["sec-fetch-site"] == "same-origin"
    assert request.get("content-length", "0") == "0"
    assert_clean(browser)
    screenshot = tmp_path / "web-result.png"
    browser.save_screenshot(screenshot)
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    link = driver.find_element(By.ID, "full-result-link")
    assert link.get_attribute("href") == front_door.origin + RESULT_PATH
    link.click()
    wait_for(driver, lambda d: d.current_url == front_door.origin + RESULT_PATH)
    assert driver.find_element(By.TAG_NAME, "h1").text == VERDICT_HEADLINES["relayed"]
    assert_clean(browser)


@pytest.mark.parametrize(
    ("refusal", "status"),
    [
        (
            (HTTPStatus.TOO_MANY_REQUESTS, "Too many tests from your address; try again in 42 s"),
            "Not tested: Too many tests from your address; try again in 42 s"
            " (HTTP 429 Too Many Requests)",
        ),
        (
            (HTTPStatus.FORBIDDEN, "This service tests only customer networks"),
            "Not tested: This service tests only customer networks (HTTP 403 Forbidden)",
        ),
        (None, "The test ended early: the connection closed before the result came."),
    ],
)
def test_landing_page_shows_a_refusal_or_a_broken_stream(
    browser: Browser,
    front_door: FrontDoorStandIn,
    refusal: tuple[HTTPStatus, str] | None,
    status: str,
) -> None:
    front_door.refusal = refusal
    front_door.head = [{"type": "line", "text": "Connecting to 127.0.0.1 ..."}]
    front_door.release.set()
    driver = browser.driver
    driver.get(front_door.origin + "/")
    button = driver.find_element(By.ID, "start")
    button.click()
    wait_for(driver, lambda d: d.find_element(By.ID, "status").text == status)
    wait_for(driver, lambda _: button.is_enabled())
    assert driver.switch_to.active_element == button
    assert not driver.find_element(By.ID, "verdict").is_displayed()
    # Chromium logs a refused request as a failed load; nothing else may be logged.
    errors = browser.console_errors()
    if refusal is None:
        assert errors == []
    else:
        assert len(errors) == 1
        assert f"{front_door.origin}/test" in errors[0]
        assert f"status of {refusal[0].value}" in errors[0]
    assert browser.off_loopback() == []


def test_result_page_shows_hostile_text_as_text(
    browser: Browser, front_door: FrontDoorStandIn
) -> None:
    driver = browser.driver
    driver.get(front_door.origin + RESULT_PATH)
    assert driver.find_element(By.ID, "transcript").text.split("\n") == transcript_lines()
    assert driver.find_element(By.CSS_SELECTOR, ".verdict pre").text.split("\n") == list(
        SUMMARY.lines
    )
    outcomes = driver.find_elements(By.CSS_SELECTOR, "tbody .outcome")
    assert [mark.text for mark in outcomes] == [OUTCOME_WORDS[p.outcome] for p in PROBES]
    assert driver.find_elements(By.TAG_NAME, "img") == []
    assert driver.find_elements(By.TAG_NAME, "b") == []
    assert driver.find_elements(By.TAG_NAME, "script") == []
    assert driver.execute_script("return window.pwned") is None
    assert_clean(browser)


@pytest.mark.parametrize("path", ["/", RESULT_PATH])
def test_pages_fit_a_phone_screen(
    browser: Browser, front_door: FrontDoorStandIn, path: str
) -> None:
    long_line = "<<< 250 " + "x" * 500
    result = stored_result(front_door.origin)
    result["transcript"].append(long_line)
    front_door.pages[RESULT_PATH] = lambda nonce: result_page(result, nonce=nonce)
    front_door.pages["/"] = lambda nonce: landing_page(
        caller="2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
        admission="You can test this address now.",
        commands=["curl -N http://relay-test.isp.example/" + "x" * 200],
        service_name="relay-test.isp.example",
        nonce=nonce,
    )
    driver = browser.driver
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True},
    )
    driver.get(front_door.origin + path)
    # The page itself never scrolls sideways; long lines scroll inside their own box.
    assert driver.execute_script("return window.innerWidth") == 360
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 360
    assert_clean(browser)


def test_the_checks_catch_csp_violations_and_requests_off_loopback(
    browser: Browser, front_door: FrontDoorStandIn
) -> None:
    """The logs and the fence work: a page that breaks the rules is caught."""
    front_door.pages["/bad"] = lambda nonce: (
        b'<!DOCTYPE html><html lang="en"><title>bad</title>'
        b'<p style="color: red">inline style</p><script>document.title = "ran"</script>'
        b'<img src="http://192.0.2.1/pixel.png" alt="">'
    )
    driver = browser.driver
    driver.get(front_door.origin + "/bad")
    assert driver.title == "bad"
    errors = browser.console_errors()
    assert sum("Content Security Policy" in error for error in errors) >= 2
    # Logged although the CSP stopped it: an attempt is caught too.
    assert browser.off_loopback() == ["http://192.0.2.1/pixel.png"]

    # Without a CSP, the fence stops the request inside this machine.
    front_door.pages["/unfenced"] = lambda nonce: (
        b'<!DOCTYPE html><html lang="en"><title>unfenced</title><script>'
        b'fetch("http://192.0.2.1/").catch(() => { document.title = "fenced"; });'
        b"</script>"
    )
    front_door.without_csp.add("/unfenced")
    driver.get(front_door.origin + "/unfenced")
    wait_for(driver, lambda d: d.title == "fenced")
    assert browser.off_loopback()[-1] == "http://192.0.2.1/"
    assert any(
        "http://192.0.2.1/" in error and "ERR_PROXY_CONNECTION_FAILED" in error
        for error in browser.console_errors()
    )
