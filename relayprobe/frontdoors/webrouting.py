"""What the public web front door does with a request, decided from its method and headers.

Pure: no I/O. `route` names the action; the adapter (`web.py`) carries it out. The rules:
`curl` (any client that does not prefer text/html) gets a test of its own address on `GET /`;
a browser gets a page and starts a test only with a same-origin `POST /test`; a request a
browser sends cross-site never starts a test.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NDJSON = "application/x-ndjson"
_RESULT_PATH = re.compile(r"/results/([A-Za-z0-9_-]{1,64})(\.json)?")


class Format(enum.StrEnum):
    TEXT = "text"
    NDJSON = "ndjson"
    HTML = "html"


class Action(enum.Enum):
    LANDING_PAGE = "landing page"
    RUN_TEST = "run test"
    RESULT_PAGE = "result page"
    RESULT_JSON = "result json"
    CROSS_SITE = "cross-site"
    NOT_FOUND = "not found"
    METHOD_NOT_ALLOWED = "method not allowed"


@dataclass(frozen=True, slots=True)
class Route:
    action: Action
    format: Format = Format.TEXT
    result_id: str | None = None
    allow: str = ""
    """For METHOD_NOT_ALLOWED: the methods the path takes."""
    head_only: bool = False


def media_quality(accept: str, media_type: str) -> float:
    """The quality `accept` (an Accept header) gives `media_type`, by the most specific match.

    Bounded: at most 64 entries are read, each parameter list is split once.
    """
    major = media_type.split("/", 1)[0]
    best: tuple[int, float] = (-1, 0.0)
    for entry in accept.split(",")[:64]:
        kind, *params = (part.strip() for part in entry.split(";"))
        kind = kind.lower()
        specificity = {media_type: 2, f"{major}/*": 1, "*/*": 0}.get(kind)
        if specificity is None or specificity < best[0]:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = min(1.0, max(0.0, float(value)))
                except ValueError:
                    quality = 0.0
        best = (specificity, quality)
    return best[1]


def choose_format(accept: str | None, query_format: str | None) -> Format:
    """`?format=` first, then Accept: NDJSON when asked for, HTML when preferred to plain text."""
    if query_format is not None and query_format in tuple(Format):
        return Format(query_format)
    accept = accept or "*/*"
    if media_quality(accept, NDJSON) > 0 and NDJSON in accept.lower():
        return Format.NDJSON
    if media_quality(accept, "text/html") > media_quality(accept, "text/plain"):
        return Format.HTML
    return Format.TEXT


def is_cross_site(sec_fetch_site: str | None) -> bool:
    """A browser says where a request comes from; anything but our own page or the user typing
    the address is cross-site (a `same-site` sibling host counts as cross-site too)."""
    return sec_fetch_site is not None and sec_fetch_site.lower() not in ("same-origin", "none")


def is_same_origin_post(origin: str | None, sec_fetch_site: str | None, host: str | None) -> bool:
    """A POST that may start a test: the browser says it comes from our own page.

    `Sec-Fetch-Site: same-origin` settles it; without it, `Origin` must name the host the request
    was sent to. A POST with neither is refused: browsers send one, and a script has `GET`.
    """
    if sec_fetch_site is not None:
        return sec_fetch_site.lower() == "same-origin"
    if origin is None or host is None:
        return False
    return origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}")


def route(
    *,
    method: str,
    path: str,
    accept: str | None,
    query_format: str | None,
    sec_fetch_site: str | None,
    origin: str | None,
    host: str | None,
) -> Route:
    """The action for a request."""
    if path == "/":
        if method not in ("GET", "HEAD"):
            return Route(Action.METHOD_NOT_ALLOWED, allow="GET, HEAD")
        head_only = method == "HEAD"
        chosen = choose_format(accept, query_format)
        if chosen is Format.HTML:
            return Route(Action.LANDING_PAGE, Format.HTML, head_only=head_only)
        if is_cross_site(sec_fetch_site):
            return Route(Action.CROSS_SITE)
        # HEAD says what GET would send without running a test.
        return Route(Action.RUN_TEST, chosen, head_only=head_only)
    if path == "/test":
        if method != "POST":
            return Route(Action.METHOD_NOT_ALLOWED, allow="POST")
        if not is_same_origin_post(origin, sec_fetch_site, host):
            return Route(Action.CROSS_SITE)
        chosen = choose_format(accept, query_format)
        return Route(Action.RUN_TEST, Format.TEXT if chosen is Format.TEXT else Format.NDJSON)
    if (match := _RESULT_PATH.fullmatch(path)) is not None:
        if method not in ("GET", "HEAD"):
            return Route(Action.METHOD_NOT_ALLOWED, allow="GET, HEAD")
        json_wanted = match.group(2) is not None
        return Route(
            Action.RESULT_JSON if json_wanted else Action.RESULT_PAGE,
            result_id=match.group(1),
            head_only=method == "HEAD",
        )
    return Route(Action.NOT_FOUND)


def forwarded_caller(
    peer: IPAddress, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The caller behind trusted proxies: `X-Forwarded-For` (all its lines, joined) is believed
    only from a trusted proxy, read from the right (what our proxy appended) past any further
    trusted proxies. None when a trusted proxy's hop is no address: the caller is unknown, and
    testing the proxy instead would test the wrong machine."""
    caller = peer
    if forwarded_for is None:
        return caller
    hops = [hop.strip() for hop in forwarded_for.split(",")[-16:]]
    while hops and any(caller in network for network in trusted):
        try:
            address = ipaddress.ip_address(hops.pop())
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        caller = address
    return caller
