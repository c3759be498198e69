"""The pages a browser gets from the web front door: the landing page and a stored result. Pure.

Each page is one self-contained HTML document (inline CSS and JavaScript, no external fonts,
scripts or images) that works under `content_security_policy(nonce)`: its <style> and <script>
carry the response's nonce, there are no inline event handlers and no `style=` attributes, and
the script builds the DOM with textContent only, so Trusted Types can forbid HTML sinks.
Every value from a test result or transcript is hostile: the server escapes it with
html.escape; the script never parses it as HTML.

NDJSON_SCHEMA: the stream of `POST /test` with `Accept: application/x-ndjson`
---------------------------------------------------------------------------
The response is `200` with `Content-Type: application/x-ndjson`, one JSON object per line
(UTF-8, each line ends with `\\n`), written as the test runs. Every object has a `type`:

- `{"type": "line", "text": "<<< 250 2.1.0 Ok"}`: one transcript line, exactly as the telnet
  front door shows it, without its line ending. Every transcript line comes as one such object,
  in order, the summary block included.
- `{"type": "probe", "name": "Test 8", "outcome": "rejected"}`: a probe has finished, after its
  lines. `outcome` is `rejected` (5xx), `deferred` (4xx), `accepted` (2xx to RCPT TO) or
  `error` (no usable reply). Whether an accepted probe's test message arrived is known only
  later (a `:Relayed: ...` line): the result's `probes` then say `relayed` for it. A reader
  takes any other outcome word as it comes.
- `{"type": "result", "result": {...}}`: the last object. `result` is the JSON result of
  `relayprobe check --json` (`render.json_result`: verdict, counts, TLS, probes, summary,
  transcript) plus `id` (the stored result's id, or null when no history keeps it) and `url`
  (the full address of the result page, or null without `--public-url` and history).

A reader ignores objects of any other `type`, so that later versions can add some. A stream
that ends without a `result` object ended early (the service shut down, or the connection
broke). A test that cannot start is not a stream: it is an HTTP status (403 not an address the
service may test, 429 too soon, with `Retry-After`, 503 too busy) with one line of
`text/plain` saying why.
"""

from __future__ import annotations

import datetime
import html
import json
import re
import secrets
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relayprobe.relaytest.events import Certificate, Outcome, TlsStarted
from relayprobe.reports.render import tls_line

CONTENT_TYPE = "text/html; charset=utf-8"

# 16 random bytes: 128 bits, the CSP spec's recommended minimum for a nonce.
NONCE_BYTES = 16
# The base64 (or base64url) value that the CSP grammar allows in 'nonce-...', 128 bits or more.
_NONCE = re.compile(r"[A-Za-z0-9+/_-]{22,}={0,2}")

# What each probe outcome is called on a page; colour is never the only cue.
OUTCOME_WORDS: Mapping[str, str] = {
    Outcome.REJECTED.value: "rejected",
    Outcome.DEFERRED.value: "deferred (4xx)",
    Outcome.ACCEPTED.value: "accepted",
    Outcome.RELAYED.value: "relayed",
    Outcome.ERROR.value: "no reply",
}

# The verdicts of verdict.verdict, as a page's headline.
VERDICT_HEADLINES: Mapping[str, str] = {
    "relayed": "Open relay: relaying proven by delivery",
    "accepted": "Relay attempts accepted: relaying not proven",
    "rejected": "Relay attempts rejected",
    "incomplete": "Test incomplete",
}


@dataclass(frozen=True, slots=True)
class Colours:
    """A text colour and the background it is shown on."""

    foreground: str
    background: str


# Every pair below, and TEXT, LINK and FOCUS on each background a page has, meets WCAG AA
# (4.5:1 for text, 3:1 for the focus ring): tests/test_webpages.py computes the ratios.
TEXT = "#1b1f24"
PAGE = "#ffffff"
CODE = "#f3f4f6"
LINK = "#0b57d0"
FOCUS = "#0b57d0"
MUTED = "#4b5563"
RULE = "#d1d5db"  # borders only, beside text of its own contrast
BUTTON = Colours("#ffffff", "#0b57d0")
BUTTON_DISABLED = Colours("#ffffff", "#4b5563")
OUTCOME_COLOURS: Mapping[str, Colours] = {
    Outcome.REJECTED.value: Colours("#14532d", "#dcfce7"),
    Outcome.DEFERRED.value: Colours("#713f12", "#fef3c7"),
    Outcome.ACCEPTED.value: Colours("#9a3412", "#ffedd5"),
    Outcome.RELAYED.value: Colours("#ffffff", "#b91c1c"),
    Outcome.ERROR.value: Colours("#374151", "#e5e7eb"),
    "unknown": Colours("#374151", "#e5e7eb"),
}
VERDICT_COLOURS: Mapping[str, Colours] = {
    "relayed": Colours("#991b1b", "#fee2e2"),
    "accepted": Colours("#9a3412", "#ffedd5"),
    "rejected": Colours("#14532d", "#dcfce7"),
    "incomplete": Colours("#374151", "#e5e7eb"),
}


def new_nonce() -> str:
    """A fresh nonce for one response's Content-Security-Policy and page."""
    return secrets.token_urlsafe(NONCE_BYTES)


def _checked_nonce(nonce: str) -> str:
    if not _NONCE.fullmatch(nonce):
        raise ValueError("a CSP nonce must be base64 of 16 or more random bytes")
    return nonce


def content_security_policy(nonce: str) -> str:
    """The Content-Security-Policy header value for a page made with `nonce`.

    Nothing but the page's own nonced <style> and <script>, fetch() to the same origin (the
    test's stream) and the empty data: favicon; no forms, no framing, and Trusted Types with no
    policy, so that no script can reach an HTML sink such as innerHTML.
    """
    source = f"'nonce-{_checked_nonce(nonce)}'"
    return (
        f"default-src 'none'; script-src {source}; style-src {source}; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
        "require-trusted-types-for 'script'; trusted-types 'none'"
    )


def _css_rules(prefix: str, colours: Mapping[str, Colours]) -> str:
    return "\n".join(
        f".{prefix}-{name} {{ color: {pair.foreground}; background: {pair.background}; }}"
        for name, pair in colours.items()
    )


_STYLE = f"""
:root {{ color: {TEXT}; background: {PAGE}; font-family: system-ui, sans-serif;
  line-height: 1.5; }}
body {{ max-width: 60rem; margin: 0 auto; padding: 1rem; }}
h1 {{ font-size: 1.6rem; line-height: 1.25; margin: .5rem 0; }}
h2 {{ font-size: 1.25rem; margin: 1.5rem 0 .5rem; }}
a {{ color: {LINK}; }}
:focus-visible {{ outline: 3px solid {FOCUS}; outline-offset: 2px; }}
.lead {{ color: {MUTED}; margin-top: 0; }}
pre, code, td {{ font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: .875rem; }}
pre {{ background: {CODE}; color: {TEXT}; border: 1px solid {RULE}; border-radius: 4px;
  padding: .75rem; margin: .5rem 0; overflow-x: auto; white-space: pre; }}
.transcript {{ max-height: 70vh; overflow: auto; }}
.commands {{ list-style: none; padding: 0; }}
.address {{ overflow-wrap: anywhere; }}
button {{ font: inherit; font-weight: 600; min-height: 44px; padding: .5rem 1.25rem; border: 0;
  border-radius: 4px; color: {BUTTON.foreground}; background: {BUTTON.background};
  cursor: pointer; overflow-wrap: anywhere; }}
button:disabled {{ color: {BUTTON_DISABLED.foreground}; background: {BUTTON_DISABLED.background};
  cursor: progress; }}
.status {{ font-weight: 600; min-height: 1.5em; }}
.outcome {{ display: inline-block; padding: 0 .4em; border: 1px solid currentColor;
  border-radius: 3px; font-weight: 600; }}
.transcript .outcome {{ user-select: none; }}
{_css_rules("outcome", OUTCOME_COLOURS)}
.verdict {{ border-left: .5rem solid currentColor; border-radius: 4px; padding: .5rem 1rem;
  margin: 1rem 0; }}
.verdict h1, .verdict h2 {{ margin: .25rem 0; }}
.verdict pre, .verdict p {{ color: {TEXT}; }}
.verdict pre {{ background: {PAGE}; }}
{_css_rules("verdict", VERDICT_COLOURS)}
.facts {{ display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem; }}
.facts dt {{ font-weight: 600; }}
.facts dd {{ margin: 0; overflow-wrap: anywhere; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ text-align: left; vertical-align: top; padding: .3rem .5rem;
  border-bottom: 1px solid {RULE}; white-space: nowrap; }}
td {{ white-space: pre; }}
/* Focused by the script to take the reader to the verdict; it is not a control. */
[tabindex="-1"]:focus {{ outline: none; }}
@media (max-width: 40rem) {{
  body {{ padding: .75rem; }}
  .facts {{ grid-template-columns: 1fr; }}
  .facts dd {{ margin-bottom: .5rem; }}
}}
"""


def _js_constant(value: object) -> str:
    """A JSON value as a JavaScript literal that cannot end its <script> element."""
    return json.dumps(value).replace("<", "\\u003c")


_SCRIPT_BODY = """
const MAX_LINE_CHARS = 1 << 20;
const MAX_REFUSAL_CHARS = 300;
const button = document.getElementById("start");
const statusLine = document.getElementById("status");
const transcript = document.getElementById("transcript");
const verdict = document.getElementById("verdict");
const headline = document.getElementById("verdict-headline");
const summary = document.getElementById("verdict-summary");
const fullResult = document.getElementById("full-result");
const fullResultLink = document.getElementById("full-result-link");
// Each probe's mark in the transcript, by name: the result turns "accepted" into "relayed".
const probeMarks = new Map();

function isObject(value) {
  return typeof value === "object" && value !== null;
}

function setStatus(text) {
  statusLine.textContent = text;
}

function paintMark(mark, name, outcome) {
  const known = Object.hasOwn(OUTCOME_WORDS, outcome);
  mark.className = "outcome outcome-" + (known ? outcome : "unknown");
  mark.textContent = String(name) + ": " + (known ? OUTCOME_WORDS[outcome] : String(outcome));
}

// Follow the end of the transcript unless the reader has scrolled up to read.
function append(...nodes) {
  const following =
    transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 8;
  transcript.append(...nodes);
  if (following) {
    transcript.scrollTop = transcript.scrollHeight;
  }
}

function addLine(text) {
  append(String(text) + "\\n");
}

function addProbe(name, outcome) {
  const mark = document.createElement("span");
  paintMark(mark, name, outcome);
  probeMarks.set(String(name), mark);
  append(mark, "\\n");
}

function safeLink(url) {
  if (typeof url !== "string") {
    return null;
  }
  try {
    const parsed = new URL(url, document.baseURI);
    return parsed.protocol === "https:" || parsed.protocol === "http:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function showResult(result) {
  const known = Object.hasOwn(VERDICT_HEADLINES, result.verdict);
  verdict.className = "verdict verdict-" + (known ? result.verdict : "incomplete");
  headline.textContent = known ? VERDICT_HEADLINES[result.verdict] : "Verdict: " + result.verdict;
  summary.textContent = Array.isArray(result.summary) ? result.summary.join("\\n") : "";
  for (const probe of Array.isArray(result.probes) ? result.probes : []) {
    const mark = isObject(probe) ? probeMarks.get(String(probe.name)) : undefined;
    if (mark !== undefined) {
      paintMark(mark, probe.name, probe.outcome);
    }
  }
  const link = safeLink(result.url);
  fullResult.hidden = link === null;
  if (link !== null) {
    fullResultLink.href = link;
  }
  verdict.hidden = false;
  headline.focus();
  return headline.textContent;
}

// Calls onEvent with each JSON object of an NDJSON body, as its lines arrive.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    pending += done ? decoder.decode() : decoder.decode(value, { stream: true });
    const lines = pending.split("\\n");
    pending = done ? "" : lines.pop();
    if (pending.length > MAX_LINE_CHARS) {
      throw new Error("a line of the stream is too long");
    }
    for (const line of lines) {
      if (line.trim() !== "") {
        onEvent(JSON.parse(line));
      }
    }
    if (done) {
      return;
    }
  }
}

async function refusal(response) {
  const text = (await response.text()).split("\\n", 1)[0].slice(0, MAX_REFUSAL_CHARS).trim();
  const code = (response.status + " " + response.statusText).trim();
  return "Not tested: " + (text || "the service refused the test") + " (HTTP " + code + ")";
}

async function runTest() {
  button.disabled = true;
  verdict.hidden = true;
  transcript.replaceChildren();
  probeMarks.clear();
  setStatus("Testing " + button.dataset.address + " ...");
  try {
    const response = await fetch("/test", {
      method: "POST",
      headers: { Accept: "application/x-ndjson" },
      cache: "no-store",
      credentials: "same-origin",
      redirect: "error",
    });
    if (!response.ok) {
      setStatus(await refusal(response));
      return;
    }
    transcript.hidden = false;
    let result = null;
    await readEvents(response, (event) => {
      if (!isObject(event)) {
        return;
      }
      if (event.type === "line") {
        addLine(event.text);
      } else if (event.type === "probe") {
        addProbe(event.name, event.outcome);
      } else if (event.type === "result" && isObject(event.result)) {
        result = event.result;
      }
    });
    if (result === null) {
      setStatus("The test ended early: the connection closed before the result came.");
    } else {
      setStatus("Test finished: " + showResult(result));
    }
  } catch (error) {
    setStatus("The test stopped: " + (error instanceof Error ? error.message : String(error)));
  } finally {
    button.disabled = false;
    if (verdict.hidden) {
      button.focus();
    }
  }
}

button.addEventListener("click", () => {
  runTest();
});
"""

# A block, so that the script adds no globals.
_LANDING_SCRIPT = (
    '"use strict";\n{\n'
    f"const OUTCOME_WORDS = {_js_constant(OUTCOME_WORDS)};\n"
    f"const VERDICT_HEADLINES = {_js_constant(VERDICT_HEADLINES)};\n"
    f"{_SCRIPT_BODY}}}\n"
)


def _text(value: object) -> str:
    return html.escape(str(value), quote=True)


def _page(
    *, title: str, header: str = "", main: str, nonce: str, script: str = "", indexable: bool
) -> bytes:
    """A whole document around `main`, with the style, and `script` if any, under `nonce`."""
    nonce = _text(_checked_nonce(nonce))
    robots = "" if indexable else '<meta name="robots" content="noindex">\n'
    script_element = f'<script nonce="{nonce}">{script}</script>\n' if script else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="color-scheme" content="light">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"{robots}"
        '<link rel="icon" href="data:,">\n'
        f"<title>{_text(title)}</title>\n"
        f'<style nonce="{nonce}">{_STYLE}</style>\n'
        f"</head>\n<body>\n{header}<main>\n{main}</main>\n{script_element}</body>\n</html>\n"
    ).encode()


def _pre(lines: Sequence[object], attributes: str = "") -> str:
    # The newline after <pre> is dropped by every HTML parser, so a first empty line survives.
    return f"<pre{attributes}>\n" + "\n".join(_text(line) for line in lines) + "</pre>"


def landing_page(
    *, caller: str, admission: str, commands: Sequence[str], service_name: str, nonce: str
) -> bytes:
    """The page a browser gets at `/`: what the service does, the caller's address and whether
    it may be tested now (`admission`, one line), the commands to run on the mail server, and a
    button that runs the test here, streaming `POST /test` as NDJSON into the page."""
    address = _text(caller)
    command_items = "".join(f"<li>{_pre([command])}</li>\n" for command in commands)
    header = f"""<header>
<h1>{_text(service_name)}</h1>
<p class="lead">Is your mail server an open relay?</p>
</header>
"""
    main = f"""<section aria-labelledby="about-heading">
<h2 id="about-heading">What this test does</h2>
<p>It checks whether your mail server is an <em>open relay</em>: whether anyone on the internet
can use it to send mail to domains that are not yours. The service connects back to port 25 of
the address your connection comes from, tries the ways spammers relay mail, and shows you the
whole SMTP conversation. It never tests an address you type, only the one you connect from.</p>
</section>
<section aria-labelledby="address-heading">
<h2 id="address-heading">Your address</h2>
<p>You are connecting from <strong class="address">{address}</strong>.</p>
<p id="admission">{_text(admission)}</p>
</section>
<section aria-labelledby="commands-heading">
<h2 id="commands-heading">Run the test on your mail server</h2>
<p>Log in to the mail server and run one of these commands. The test needs nothing you type;
it tests the address the command connects from.</p>
<ul class="commands">
{command_items}</ul>
</section>
<section aria-labelledby="run-heading">
<h2 id="run-heading">Or test from this browser</h2>
<p>This tests {address}, the address this browser connects from: useful when your mail server
receives mail on port 25 at that address.</p>
<button type="button" id="start" data-address="{address}" aria-describedby="admission">\
Test {address} now</button>
<noscript><p>Testing from this page needs JavaScript; the commands above do not.</p></noscript>
<p id="status" class="status" role="status"></p>
<section id="verdict" class="verdict" aria-labelledby="verdict-headline" hidden>
<h2 id="verdict-headline" tabindex="-1"></h2>
<pre id="verdict-summary"></pre>
<p id="full-result" hidden><a id="full-result-link" href="#">Full result</a>
(a link you can share)</p>
</section>
<pre id="transcript" class="transcript" tabindex="0" aria-label="Transcript" hidden></pre>
</section>
"""
    title = f"{service_name}: open relay test"
    return _page(
        title=title, header=header, main=main, nonce=nonce, script=_LANDING_SCRIPT, indexable=True
    )


def _started_at(value: object) -> str:
    try:
        when = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        return _text(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    when = when.astimezone(datetime.UTC)
    return f'<time datetime="{_text(when.isoformat())}">{when:%Y-%m-%d %H:%M:%S} UTC</time>'


def _tls(tls: Mapping[str, Any]) -> str:
    if not tls["used"]:
        if tls["required"]:
            return "not used, although the server requires it"
        if tls["offered"]:
            return "not used: the server offers STARTTLS; the probes ran in plaintext"
        return "not used: the server does not offer STARTTLS"
    certificate = tls["certificate"]
    used = TlsStarted(
        version=str(tls["version"]),
        cipher=str(tls["cipher"]),
        certificate=None
        if certificate is None
        else Certificate(
            subject=str(certificate["subject"]),
            issuer=str(certificate["issuer"]),
            not_after=str(certificate["not_after"]),
            self_signed=bool(certificate["self_signed"]),
        ),
    )
    required = " (the server requires it)" if tls["required"] else ""
    return tls_line(used) + required


def _confirmation(result: Mapping[str, Any]) -> str:
    if not result["accepted"]:
        return "nothing to confirm: no probe was accepted"
    return (
        f"{result['relayed']} of {result['accepted']} accepted probes proven relayed "
        "(their test messages reached the test domain)"
    )


def _outcome_mark(outcome: str) -> str:
    name = outcome if outcome in OUTCOME_WORDS else "unknown"
    word = OUTCOME_WORDS.get(outcome, outcome)
    return f'<span class="outcome outcome-{name}">{_text(word)}</span>'


def _probe_row(probe: Mapping[str, Any]) -> str:
    # The outcome next to the name: on a phone the columns after it scroll out of view.
    cells = (
        _outcome_mark(str(probe["outcome"])),
        _text(probe["mail_from"]),
        _text(probe["rcpt_to"]),
        _text(probe["reply"]),
    )
    return (
        f'<tr><th scope="row">{_text(probe["name"])}</th>'
        + "".join(f"<td>{cell}</td>" for cell in cells)
        + "</tr>\n"
    )


_TRANSCRIPT_ATTRIBUTES = (
    ' id="transcript" class="transcript" tabindex="0" aria-labelledby="transcript-heading"'
)


def result_page(result: Mapping[str, Any], *, nonce: str) -> bytes:
    """The page of a stored result at `/results/<id>`: `result` is the JSON result of
    `render.json_result` with `id` and `url` (each a string or null)."""
    verdict = str(result["verdict"])
    colour = verdict if verdict in VERDICT_COLOURS else "incomplete"
    headline = VERDICT_HEADLINES.get(verdict, f"Verdict: {verdict}")
    target = _text(result["target"])
    banner = result["banner"]
    facts = [
        ("Tested address", target),
        ("Host", _text(result["host"])),
        ("Banner", "none" if banner is None else _text(banner)),
        ("Tested at", _started_at(result["started_at"])),
        ("Duration", _text(f"{result['duration_s']} s")),
        ("TLS", _text(_tls(result["tls"]))),
        ("Delivery confirmation", _text(_confirmation(result))),
    ]
    if result.get("url"):
        facts.append(("Link to this result", _text(result["url"])))
    fact_items = "".join(f"<dt>{name}</dt><dd>{value}</dd>\n" for name, value in facts)
    json_link = ""
    if result.get("id"):
        href = _text(urllib.parse.quote(str(result["id"]), safe="") + ".json")
        json_link = f'<p><a href="{href}">This result as JSON</a></p>\n'
    rows = "".join(_probe_row(probe) for probe in result["probes"])
    main = f"""<section class="verdict verdict-{colour}" aria-labelledby="verdict-headline">
<p>Relay test of <strong class="address">{target}</strong></p>
<h1 id="verdict-headline">{_text(headline)}</h1>
{_pre(result["summary"])}
</section>
<section aria-labelledby="details-heading">
<h2 id="details-heading">Details</h2>
<dl class="facts">
{fact_items}</dl>
{json_link}</section>
<section aria-labelledby="probes-heading">
<h2 id="probes-heading">Probes</h2>
<div class="scroll" role="region" aria-labelledby="probes-heading" tabindex="0">
<table>
<thead><tr><th scope="col">Probe</th><th scope="col">Outcome</th><th scope="col">MAIL FROM</th>\
<th scope="col">RCPT TO</th><th scope="col">Reply</th></tr></thead>
<tbody>
{rows}</tbody>
</table>
</div>
</section>
<section aria-labelledby="transcript-heading">
<h2 id="transcript-heading">Transcript</h2>
{_pre(result["transcript"], _TRANSCRIPT_ATTRIBUTES)}
</section>
"""
    title = f"Relay test of {result['target']}: {headline}"
    return _page(title=title, main=main, nonce=nonce, indexable=False)
