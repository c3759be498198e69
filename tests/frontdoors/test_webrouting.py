"""Routing of the public web front door, from headers alone: who gets a test, who a page."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe.frontdoors.webrouting import (
    Action,
    Format,
    choose_format,
    forwarded_caller,
    media_quality,
    route,
)

CHROME_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
    "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7"
)
FIREFOX_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


def routed(method: str = "GET", path: str = "/", **headers: str | None) -> tuple[Action, Format]:
    chosen = route(
        method=method,
        path=path,
        accept=headers.get("accept"),
        query_format=headers.get("format"),
        sec_fetch_site=headers.get("sec_fetch_site"),
        origin=headers.get("origin"),
        host=headers.get("host", "relay-test.example"),
    )
    return chosen.action, chosen.format


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, Format.TEXT),  # curl without -H
        ("*/*", Format.TEXT),  # curl, wget
        ("text/plain", Format.TEXT),
        (CHROME_ACCEPT, Format.HTML),
        (FIREFOX_ACCEPT, Format.HTML),
        ("text/html;q=0.5, text/plain", Format.TEXT),
        ("application/x-ndjson", Format.NDJSON),
        ("application/x-ndjson;q=0", Format.TEXT),
    ],
)
def test_the_format_follows_what_the_client_prefers(accept: str | None, expected: Format) -> None:
    assert choose_format(accept, None) is expected


def test_the_query_names_the_format_whatever_accept_says() -> None:
    assert choose_format(CHROME_ACCEPT, "ndjson") is Format.NDJSON
    assert choose_format("*/*", "html") is Format.HTML
    assert choose_format("*/*", "bogus") is Format.TEXT


def test_media_quality_takes_the_most_specific_match() -> None:
    assert media_quality("text/*;q=0.3, text/html;q=0.7, */*;q=0.1", "text/html") == 0.7
    assert media_quality("text/*;q=0.3, */*;q=0.1", "text/plain") == 0.3
    assert media_quality("image/png", "text/plain") == 0.0
    assert media_quality("text/plain;q=bogus", "text/plain") == 0.0


@given(st.text(max_size=300))
def test_any_accept_header_gives_a_format(accept: str) -> None:
    assert choose_format(accept, None) in tuple(Format)


def test_curl_gets_a_test_and_a_browser_a_page() -> None:
    assert routed(accept="*/*") == (Action.RUN_TEST, Format.TEXT)
    assert routed(accept=CHROME_ACCEPT, sec_fetch_site="none") == (
        Action.LANDING_PAGE,
        Format.HTML,
    )


@pytest.mark.parametrize("site", ["cross-site", "same-site", "CROSS-SITE"])
def test_a_get_a_browser_sends_cross_site_starts_no_test(site: str) -> None:
    # <img src="http://relay-test.example/"> on another site: Accept image/*, cross-site.
    assert routed(accept="image/avif,image/webp,*/*", sec_fetch_site=site)[0] is Action.CROSS_SITE


def test_a_same_origin_post_starts_a_test() -> None:
    assert routed("POST", "/test", accept="application/x-ndjson", sec_fetch_site="same-origin") == (
        Action.RUN_TEST,
        Format.NDJSON,
    )
    # An older browser: Origin and no Sec-Fetch-Site.
    assert routed(
        "POST", "/test", accept="application/x-ndjson", origin="http://relay-test.example"
    ) == (Action.RUN_TEST, Format.NDJSON)


@pytest.mark.parametrize(
    "headers",
    [
        {"sec_fetch_site": "cross-site", "origin": "https://evil.example"},
        {"sec_fetch_site": "same-site", "origin": "https://www.relay-test.example"},
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {},  # a form posted by a script with neither header
    ],
)
def test_a_post_from_anywhere_else_starts_no_test(headers: dict[str, str]) -> None:
    assert routed("POST", "/test", **headers)[0] is Action.CROSS_SITE


def test_methods_paths_and_results() -> None:
    assert routed("POST", "/")[0] is Action.METHOD_NOT_ALLOWED
    assert routed("GET", "/test")[0] is Action.METHOD_NOT_ALLOWED
    assert routed("GET", "/nope")[0] is Action.NOT_FOUND
    assert routed("GET", "/results/../etc")[0] is Action.NOT_FOUND
    page = route(
        method="GET",
        path="/results/AbC_-9",
        accept=None,
        query_format=None,
        sec_fetch_site=None,
        origin=None,
        host=None,
    )
    assert (page.action, page.result_id) == (Action.RESULT_PAGE, "AbC_-9")
    assert routed("GET", "/results/AbC_-9.json")[0] is Action.RESULT_JSON
    assert routed("HEAD", "/")[0] is Action.RUN_TEST


TRUSTED = (ipaddress.ip_network("10.0.0.0/8"),)


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy() -> None:
    proxy, stranger = ipaddress.ip_address("10.0.0.5"), ipaddress.ip_address("192.0.2.7")
    assert str(forwarded_caller(proxy, "198.51.100.1", TRUSTED)) == "198.51.100.1"
    assert forwarded_caller(stranger, "198.51.100.1", TRUSTED) == stranger
    # A client's own forged entry comes first; the trusted proxy appended the real one.
    assert str(forwarded_caller(proxy, "203.0.113.9, 198.51.100.1", TRUSTED)) == "198.51.100.1"
    # Past a chain of trusted proxies, to the first address they did not add.
    assert str(forwarded_caller(proxy, "198.51.100.1, 10.0.0.9", TRUSTED)) == "198.51.100.1"
    # The trusted proxy's own hop unreadable: nobody to test, and never the proxy itself.
    assert forwarded_caller(proxy, "not an address", TRUSTED) is None
    assert forwarded_caller(proxy, "198.51.100.1, unknown", TRUSTED) is None
    assert forwarded_caller(stranger, "not an address", TRUSTED) == stranger
    assert str(forwarded_caller(proxy, "::ffff:198.51.100.1", TRUSTED)) == "198.51.100.1"
    assert forwarded_caller(proxy, None, TRUSTED) == proxy
