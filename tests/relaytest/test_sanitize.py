from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe.relaytest.sanitize import MAX_DISPLAY_CHARS, sanitize_line, sanitize_text

PRINTABLE_ASCII = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E))
CUT_NOTE = re.compile(r"\.\.\. \[cut: (\d+) characters in all\]\Z")


def sanitize(data: bytes) -> str:
    """Bytes from the network as the SMTP client hands them on (`surrogateescape`), sanitised."""
    return sanitize_text(data.decode("utf-8", "surrogateescape"))


def line(data: bytes, *, limit: int = MAX_DISPLAY_CHARS) -> str:
    return sanitize_line(data.decode("utf-8", "surrogateescape"), limit=limit)


def assert_harmless(text: str) -> None:
    for char in text:
        code = ord(char)
        assert code >= 0x20, f"C0 control {char!r}"
        assert code != 0x7F, "DEL"
        assert not 0x80 <= code <= 0x9F, f"C1 control {char!r}"
        assert char.isprintable(), f"unprintable {char!r}"


@given(st.binary())
def test_any_bytes_come_out_harmless(data: bytes) -> None:
    assert_harmless(sanitize(data))


@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=1200))
def test_any_line_comes_out_harmless(data: bytes, limit: int) -> None:
    assert_harmless(line(data, limit=limit))


@given(st.text())
def test_any_text_comes_out_harmless(text: str) -> None:
    assert_harmless(sanitize_text(text))


@given(PRINTABLE_ASCII)
def test_printable_ascii_round_trips(text: str) -> None:
    assert sanitize(text.encode("ascii")) == text
    assert sanitize_text(text) == text


@given(st.text(alphabet=st.characters(categories=["L", "N", "P", "S"])))
def test_printable_unicode_round_trips(text: str) -> None:
    assert sanitize(text.encode("utf-8")) == text


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"220 \x1b[2Jhello", "220 \\x1b[2Jhello"),
        (b"bell\x07", "bell\\x07"),
        (b"nul\x00byte", "nul\\x00byte"),
        (b"back\x08space", "back\\x08space"),
        (b"bare\rCR", "bare\\x0dCR"),
        (b"line\nfeed", "line\\x0afeed"),
        (b"tab\there", "tab\\x09here"),
        (b"del\x7f", "del\\x7f"),
        ("csi\u009b2J".encode(), "csi\\x9b2J"),
        (b"raw\x9b2J", "raw\\x9b2J"),
        (b"bad \xff\xfe utf8", "bad \\xff\\xfe utf8"),
        (b"cut \xe2\x82", "cut \\xe2\\x82"),
        ("evil\u202etxt.exe".encode(), "evil\\u202etxt.exe"),
        ("zero\u200bwidth".encode(), "zero\\u200bwidth"),
        ("nbsp\u00a0".encode(), "nbsp\\xa0"),
        ("private\U000f0000".encode(), "private\\U000f0000"),
        ("250 Grüße".encode(), "250 Grüße"),
    ],
)
def test_unsafe_bytes_are_shown_escaped(data: bytes, shown: str) -> None:
    assert sanitize(data) == shown


def test_encoded_surrogate_is_shown_as_its_bytes() -> None:
    assert sanitize(b"\xed\xb2\x80") == "\\xed\\xb2\\x80"


def test_short_line_is_not_cut() -> None:
    data = b"250 " + b"x" * (MAX_DISPLAY_CHARS - 4)
    assert line(data) == data.decode()


def test_long_line_is_cut_with_a_note() -> None:
    shown = line(b"250 " + b"x" * 2000)
    assert shown == "250 " + "x" * (MAX_DISPLAY_CHARS - 4) + "... [cut: 2004 characters in all]"


def test_cut_at_a_small_limit() -> None:
    assert line(b"abcdef", limit=3) == "abc... [cut: 6 characters in all]"


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=100))
def test_line_never_exceeds_limit_plus_note(data: bytes, limit: int) -> None:
    shown = line(data, limit=limit)
    note = CUT_NOTE.search(shown)
    assert len(shown) <= limit + (len(note.group(0)) if note else 0)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=100))
def test_cut_note_says_how_long_the_line_was(data: bytes, limit: int) -> None:
    shown = line(data, limit=limit)
    note = CUT_NOTE.search(shown)
    text = data.decode("utf-8", "surrogateescape")
    if len(text) <= limit and len(sanitize(data)) <= limit:
        assert note is None
        assert shown == sanitize(data)
    else:
        assert note is not None
        assert int(note.group(1)) == len(text)
        assert len(shown) - len(note.group(0)) <= limit


def test_sanitize_text_escapes_smuggled_bytes() -> None:
    smuggled = b"mx\x1b]0;owned\x07\xff.example".decode("utf-8", "surrogateescape")
    assert sanitize_text(smuggled) == "mx\\x1b]0;owned\\x07\\xff.example"


def test_sanitize_text_escapes_control_characters() -> None:
    assert sanitize_text("a\x1bb\u009bc\u202ed") == "a\\x1bb\\x9bc\\u202ed"


def test_sanitize_text_escapes_a_lone_surrogate() -> None:
    assert sanitize_text("a\ud800b") == "a\\ud800b"


@given(st.text(), st.integers(min_value=1, max_value=1200))
def test_any_text_line_comes_out_harmless_and_bounded(text: str, limit: int) -> None:
    shown = sanitize_line(text, limit=limit)
    assert_harmless(shown)
    note = CUT_NOTE.search(shown)
    assert len(shown) <= limit + (len(note.group(0)) if note else 0)


def escaped_whole(text: str, limit: int) -> str:
    """What sanitize_line shows, made the slow way: the whole first `limit` characters escaped."""
    shown = sanitize_text(text[:limit])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... [cut: {len(text)} characters in all]"


@given(st.text(max_size=3000), st.integers(min_value=1, max_value=1200))
def test_escaping_stops_early_without_changing_what_is_shown(text: str, limit: int) -> None:
    assert sanitize_line(text, limit=limit) == escaped_whole(text, limit)


def test_a_line_of_characters_that_escape_long_is_cut_like_the_rest() -> None:
    text = "\U000e0001" * 5000
    assert sanitize_line(text) == escaped_whole(text, MAX_DISPLAY_CHARS)
