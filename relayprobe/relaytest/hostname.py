"""Is this string a host name we may put into a command? Pure."""

from __future__ import annotations

import re

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_hostname(name: str) -> bool:
    """A dotted LDH name whose last label is not numeric (so no bare IP address)."""
    labels = name.split(".")
    return (
        len(name) <= 253
        and len(labels) >= 2
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


# Words are split at ASCII white space alone: a no-break space or a control character is part
# of the word (and so no host name).
_FIRST_WORD = re.compile(r"\s*(\S+)", re.ASCII)


def banner_hostname(banner: str) -> str | None:
    """The first word after the code in a 220 greeting, when it is a host name."""
    word = _FIRST_WORD.match(banner, 4)
    if word is None:
        return None
    return word.group(1) if is_hostname(word.group(1)) else None
