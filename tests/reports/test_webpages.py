from __future__ import annotations

import re
import urllib.parse
from html.parser import HTMLParser
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe.relaytest.events import (
    Certificate,
    Outcome,
    ProbeFinished,
    Summary,
    TlsReport,
    TlsStarted,
)
from relayprobe.reports import webpages
from relayprobe.reports.render import json_result
from relayprobe.reports.webpages import (
    OUTCOME_COLOURS,
    OUTCOME_WORDS,
    VERDICT_COLOURS,
    VERDICT_HEADLINES,
    content_security_policy,
    landing_page,
    new_nonce,
    result_page,
)

NONCE = "q0Bt5kX2_fJ-8wZc3LmN7a"
VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "source", "wbr"})
HOSTILE = (
    "<script>alert(1)</script>",
    "</pre><img src=x onerror=alert(1)>",
    '" onmouseover="alert(1)" x=\'',
    "&amp; &lt; &#60; &",
    "]]><!-- -->",
    "</style></script></title></textarea>",
    "javascript:alert(1)",
)
hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40),
)


class Page(HTMLParser):
    """A page as html.parser reads it: its elements, its text, the text of each element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.by_id: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    @classmethod
    def of(cls, page: bytes) -> Page:
        parsed = cls()
        parsed.feed(page.decode())
        parsed.close()
        return parsed

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        assert len(attributes) == len(attrs), f"a repeated attribute in <{tag}>"
        self.elements.append((tag, attributes))
        if tag not in VOID:
            element_id = attributes.get("id")
            self._open.append((tag, element_id))
            if element_id is not None:
                self.by_id[element_id] = ""

    def handle_endtag(self, tag: str) -> None:
        assert self._open and self._open[-1][0] == tag, f"</{tag}> closes {self._open[-1:]}"
        self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1][0] in ("script", "style"):
            return
        self.text.append(data)
        for _, element_id in self._open:
            if element_id is not None:
                self.by_id[element_id] += data

    def shape(self) -> list[tuple[str, list[str]]]:
        """The elements with their attribute names: what hostile data must not change."""
        return [(tag, sorted(attributes)) for tag, attributes in self.elements]

    def all_text(self) -> str:
        return "".join(self.text)

    def pre_lines(self, element_id: str) -> list[str]:
        # Browsers drop the newline right after <pre>; html.parser keeps it.
        return self.by_id[element_id].removeprefix("\n").split("\n")

    def with_class(self, name: str) -> list[dict[str, str | None]]:
        return [a for _, a in self.elements if name in (a.get("class") or "").split()]


def landing(**changes: Any) -> bytes:
    arguments: dict[str, Any] = {
        "caller": "192.0.2.4",
        "admission": "You can test this address now.",
        "commands": ["telnet relay-test.isp.example", "curl -N http://relay-test.isp.example/"],
        "service_name": "relay-test.isp.example",
        "nonce": NONCE,
        **changes,
    }
    return landing_page(**arguments)


CERTIFICATE = Certificate(
    subject="CN=mx.example.net",
    issuer="CN=mx.example.net",
    not_after="2027-03-01",
    self_signed=True,
)
SUMMARY = Summary(
    target="192.0.2.4",
    host="mx.example.net",
    banner="220 mx.example.net ESMTP",
    verdict="accepted",
    lines=(
        "Tested host banner: 220 mx.example.net ESMTP",
        "System appeared to accept 1 relay attempts",
    ),
    probes=tuple(
        ProbeFinished(f"Test {n}", "<a@example.net>", "<b@relaytest.invalid>", outcome, "250 Ok")
        for n, outcome in enumerate(Outcome, start=1)
    ),
    started_at=1_700_000_000.25,
    duration_s=1.23456,
    tls=TlsReport(
        offered=True,
        required=True,
        used=TlsStarted("TLSv1.3", "TLS_AES_256_GCM_SHA384", CERTIFICATE),
    ),
)
TRANSCRIPT = ["Connecting to 192.0.2.4 ...", "<<< 220 mx.example.net ESMTP", *SUMMARY.lines]


def stored(**changes: Any) -> dict[str, Any]:
    result = {"id": "Zx3vQ9bT0yK2mW8sL4nR1a", "url": None, **json_result(SUMMARY, TRANSCRIPT)}
    result.update(changes)
    return result


def hostile_result(value: str, lines: list[str]) -> dict[str, Any]:
    """A stored result with `value` in every string a tested server or the store could set."""
    fields = ("id", "url", "target", "host", "banner", "verdict")
    result = stored(**dict.fromkeys(fields, value), summary=lines, transcript=lines)
    result["tls"]["version"] = result["tls"]["cipher"] = value
    result["tls"]["certificate"] = {
        "subject": value,
        "issuer": value,
        "not_after": value,
        "self_signed": False,
    }
    result["probes"] = [
        {**probe, "name": value, "mail_from": value, "rcpt_to": value, "reply": value}
        for probe in result["probes"]
    ] + [{**result["probes"][0], "outcome": value}]
    return result


PAGES = {
    "landing": landing(),
    "result": result_page(stored(url="https://x.example/r"), nonce=NONCE),
}


@pytest.mark.parametrize("name", PAGES)
def test_page_is_self_contained_and_fits_the_csp(name: str) -> None:
    page = Page.of(PAGES[name])
    tags = [tag for tag, _ in page.elements]
    assert tags[0] == "html" and page.elements[0][1] == {"lang": "en"}
    assert ("meta", {"charset": "utf-8"}) in page.elements
    assert ("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}) in (
        page.elements
    )
    assert tags.count("main") == 1
    assert tags.count("h1") == 1
    scripts_and_styles = [(t, a) for t, a in page.elements if t in ("script", "style")]
    assert scripts_and_styles
    for tag, attributes in scripts_and_styles:
        assert attributes == {"nonce": NONCE}, f"<{tag}> needs exactly the nonce"
    for tag, attributes in page.elements:
        assert tag not in ("iframe", "object", "embed", "form", "base", "img")
        for attribute, value in attributes.items():
            assert not attribute.startswith("on"), f"inline handler on <{tag}>"
            assert attribute != "style", f"style= attribute on <{tag}>"
            if attribute in ("href", "src", "action"):
                assert value is not None
                parsed = urllib.parse.urlsplit(value)
                # The same origin, a fragment, or the empty data: favicon: nothing external.
                assert parsed.netloc == "" and parsed.scheme in ("", "data"), value


def test_page_styles_and_scripts_load_nothing() -> None:
    # Fonts, images and imports are the ways CSS fetches; the script fetches only /test.
    for css_or_js in (webpages._STYLE, webpages._LANDING_SCRIPT):
        assert not re.search(r"url\(|@import|https?://", css_or_js)
    assert webpages._LANDING_SCRIPT.count("fetch(") == 1
    assert 'fetch("/test"' in webpages._LANDING_SCRIPT


def test_script_never_parses_data_as_html() -> None:
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "srcdoc",
    ):
        assert sink not in webpages._LANDING_SCRIPT


def test_content_security_policy_allows_only_the_pages_own_code() -> None:
    policy = content_security_policy(NONCE)
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == directives["style-src"] == f"'nonce-{NONCE}'"
    assert directives["connect-src"] == "'self'"
    assert directives["img-src"] == "data:"
    assert directives["frame-ancestors"] == directives["base-uri"] == "'none'"
    assert directives["form-action"] == "'none'"
    assert directives["require-trusted-types-for"] == "'script'"
    assert "unsafe" not in policy


@pytest.mark.parametrize(
    "nonce", ["", "short", "q0Bt5kX2 fJ-8wZc3LmN7a", "q0Bt5kX2fJ8wZc3LmN7aaa'; script-src *"]
)
def test_a_nonce_that_could_break_the_header_or_the_page_is_refused(nonce: str) -> None:
    with pytest.raises(ValueError, match="nonce"):
        content_security_policy(nonce)
    with pytest.raises(ValueError, match="nonce"):
        landing(nonce=nonce)
    with pytest.raises(ValueError, match="nonce"):
        result_page(stored(), nonce=nonce)


def test_new_nonce_is_fresh_and_accepted() -> None:
    nonces = {new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    for nonce in nonces:
        assert f"'nonce-{nonce}'" in content_security_policy(nonce)


def test_landing_page_says_what_the_service_does_for_whom() -> None:
    page = Page.of(landing(admission="This address was tested a minute ago; try again in 42 s."))
    text = " ".join(page.all_text().split())
    assert "open relay" in text
    assert "port 25 of the address your connection comes from" in text
    assert "You are connecting from 192.0.2.4." in text
    assert page.by_id["admission"] == "This address was tested a minute ago; try again in 42 s."
    assert [a for t, a in page.elements if t == "button"] == [
        {
            "type": "button",
            "id": "start",
            "data-address": "192.0.2.4",
            "aria-describedby": "admission",
        }
    ]
    assert page.by_id["start"] == "Test 192.0.2.4 now"
    assert "telnet relay-test.isp.example" in text
    assert "curl -N http://relay-test.isp.example/" in text
    # The live parts: a polite status region, the verdict and transcript the script fills.
    status = next(a for t, a in page.elements if a.get("id") == "status")
    assert status["role"] == "status"
    assert page.by_id["status"] == ""
    for hidden in ("verdict", "transcript", "full-result"):
        assert "hidden" in next(a for _, a in page.elements if a.get("id") == hidden)


@given(value=hostile_text, commands=st.lists(hostile_text, max_size=3))
def test_landing_page_shows_hostile_values_as_text(value: str, commands: list[str]) -> None:
    def page_with(value: str, commands: list[str]) -> Page:
        return Page.of(
            landing(caller=value, admission=value, commands=commands, service_name=value)
        )

    page = page_with(value, commands)
    assert page.shape() == page_with("x", ["x"] * len(commands)).shape()
    text = page.all_text()
    assert f"Test {value} now" in text
    assert page.by_id["admission"] == value
    for command in commands:
        assert f"\n{command}" in text


@given(value=hostile_text, lines=st.lists(hostile_text, min_size=1, max_size=4))
def test_result_page_shows_hostile_values_as_text(value: str, lines: list[str]) -> None:
    page = Page.of(result_page(hostile_result(value, lines), nonce=NONCE))
    assert (
        page.shape()
        == Page.of(result_page(hostile_result("x", ["x"] * len(lines)), nonce=NONCE)).shape()
    )
    assert page.pre_lines("transcript") == lines
    assert page.by_id["verdict-headline"] == VERDICT_HEADLINES.get(value, f"Verdict: {value}")
    assert page.all_text().count(value) >= 10
    (json_link,) = [a["href"] for t, a in page.elements if t == "a"]
    assert json_link == urllib.parse.quote(value, safe="") + ".json"


def test_result_page_keeps_a_first_empty_transcript_line() -> None:
    page = Page.of(result_page(stored(transcript=["", "<<< 220 x"]), nonce=NONCE))
    assert page.pre_lines("transcript") == ["", "<<< 220 x"]


def test_result_page_shows_the_verdict_and_the_facts() -> None:
    page = Page.of(
        result_page(stored(url="https://relay-test.isp.example/results/Zx3v"), nonce=NONCE)
    )
    (verdict,) = page.with_class("verdict")
    assert verdict["class"] == "verdict verdict-accepted"
    (h1,) = [a for t, a in page.elements if t == "h1"]
    assert page.by_id[h1["id"]] == VERDICT_HEADLINES["accepted"]
    text = page.all_text()
    for fact in (
        "Tested address192.0.2.4",
        "Hostmx.example.net",
        "Banner220 mx.example.net ESMTP",
        "Tested at2023-11-14 22:13:20 UTC",
        "Duration1.235 s",
        "TLSTLS 1.3, TLS_AES_256_GCM_SHA384, certificate CN=mx.example.net, self-signed, "
        "expires 2027-03-01 (the server requires it)",
        "Delivery confirmation1 of 2 accepted probes proven relayed",
        "Link to this resulthttps://relay-test.isp.example/results/Zx3v",
    ):
        assert fact in text
    assert ("time", {"datetime": "2023-11-14T22:13:20.250000+00:00"}) in page.elements
    assert page.pre_lines("transcript") == TRANSCRIPT
    assert ("a", {"href": "Zx3vQ9bT0yK2mW8sL4nR1a.json"}) in page.elements
    assert ("meta", {"name": "robots", "content": "noindex"}) in page.elements
    assert ("meta", {"name": "referrer", "content": "no-referrer"}) in page.elements


@pytest.mark.parametrize(
    ("tls", "shown"),
    [
        (
            {"offered": False, "required": False, "used": False},
            "not used: the server does not offer STARTTLS",
        ),
        (
            {"offered": True, "required": False, "used": False},
            "not used: the server offers STARTTLS; the probes ran in plaintext",
        ),
        (
            {"offered": True, "required": True, "used": False},
            "not used, although the server requires it",
        ),
        (
            {
                "offered": True,
                "required": False,
                "used": True,
                "version": "TLS 1.2",
                "cipher": "ECDHE-RSA-AES128-GCM-SHA256",
                "certificate": None,
            },
            "TLS 1.2, ECDHE-RSA-AES128-GCM-SHA256, no certificate shown",
        ),
    ],
)
def test_result_page_says_how_tls_went(tls: dict[str, Any], shown: str) -> None:
    text = Page.of(result_page(stored(tls=tls), nonce=NONCE)).all_text()
    assert f"TLS{shown}\n" in text


def test_result_page_without_id_url_banner_or_accepted_probe() -> None:
    page = Page.of(
        result_page(stored(id=None, url=None, banner=None, accepted=0, relayed=0), nonce=NONCE)
    )
    text = page.all_text()
    assert [t for t, _ in page.elements if t == "a"] == []
    assert "Link to this result" not in text
    assert "Bannernone" in text
    assert "Delivery confirmationnothing to confirm: no probe was accepted" in text


def test_result_page_shows_an_unreadable_time_as_it_is() -> None:
    text = Page.of(result_page(stored(started_at="<b>yesterday</b>"), nonce=NONCE)).all_text()
    assert "Tested at<b>yesterday</b>" in text


@pytest.mark.parametrize("verdict", [*VERDICT_HEADLINES, "unheard-of"])
def test_every_verdict_has_a_headline_and_a_colour(verdict: str) -> None:
    page = Page.of(result_page(stored(verdict=verdict), nonce=NONCE))
    (block,) = page.with_class("verdict")
    colour = verdict if verdict in VERDICT_HEADLINES else "incomplete"
    assert block["class"] == f"verdict verdict-{colour}"
    assert f".verdict-{colour} {{" in webpages._STYLE
    (h1,) = [a for t, a in page.elements if t == "h1"]
    assert page.by_id[h1["id"]] == VERDICT_HEADLINES.get(verdict, f"Verdict: {verdict}")


def test_the_verdicts_are_those_the_engine_gives() -> None:
    assert (
        set(VERDICT_HEADLINES)
        == set(VERDICT_COLOURS)
        == {
            "relayed",
            "accepted",
            "rejected",
            "incomplete",
        }
    )


def test_every_outcome_has_a_word_and_a_class() -> None:
    assert set(OUTCOME_WORDS) == {outcome.value for outcome in Outcome}
    assert len(set(OUTCOME_WORDS.values())) == len(Outcome)
    assert set(OUTCOME_COLOURS) == {*OUTCOME_WORDS, "unknown"}
    for name in OUTCOME_COLOURS:
        assert f".outcome-{name} {{" in webpages._STYLE
    page = Page.of(result_page(stored(), nonce=NONCE))
    marks = page.with_class("outcome")
    assert [mark["class"] for mark in marks] == [f"outcome outcome-{o.value}" for o in Outcome]
    words = re.findall(
        r'<span class="outcome [^"]+">([^<]*)</span>', result_page(stored(), nonce=NONCE).decode()
    )
    assert words == [OUTCOME_WORDS[o.value] for o in Outcome]


def test_an_unknown_outcome_is_shown_by_its_name() -> None:
    result = stored()
    result["probes"] = [{**result["probes"][0], "outcome": "<i>new</i>"}]
    page = result_page(result, nonce=NONCE).decode()
    assert '<span class="outcome outcome-unknown">&lt;i&gt;new&lt;/i&gt;</span>' in page


def _luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(foreground: str, background: str) -> float:
    """The WCAG 2 contrast ratio of two #rrggbb colours."""
    lighter, darker = sorted((_luminance(foreground), _luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def test_contrast_ratio_matches_wcag_examples() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert contrast("#ffffff", "#ffffff") == 1


def test_colours_meet_wcag_aa() -> None:
    # Text is 4.5:1 against what it is drawn on; the focus ring 3:1 against the page.
    pairs = [
        *OUTCOME_COLOURS.values(),
        *VERDICT_COLOURS.values(),
        webpages.BUTTON,
        webpages.BUTTON_DISABLED,
    ]
    for pair in pairs:
        assert contrast(pair.foreground, pair.background) >= 4.5, pair
    backgrounds = [webpages.PAGE, webpages.CODE, *(c.background for c in VERDICT_COLOURS.values())]
    for background in backgrounds:
        for foreground in (webpages.TEXT, webpages.LINK):
            assert contrast(foreground, background) >= 4.5, (foreground, background)
    assert contrast(webpages.MUTED, webpages.PAGE) >= 4.5
    assert contrast(webpages.FOCUS, webpages.PAGE) >= 3
