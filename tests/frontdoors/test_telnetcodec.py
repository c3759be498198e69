import random
import tracemalloc

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relayprobe.frontdoors.telnetcodec import (
    Interrupt,
    InterruptCause,
    TelnetFeedResult,
    TelnetInput,
    encode_line,
    encode_lines,
)

# What Debian's netkit telnet sends first when connecting to port 23.
NETKIT_GREETING = bytes.fromhex("fffd03fffb18fffb1ffffb20fffb21fffb22fffb27fffd05")
NETKIT_REFUSAL = bytes.fromhex("fffc03fffe18fffe1ffffe20fffe21fffe22fffe27fffc05")

# Bytes that drive the state machine, mixed with ordinary ones so generated input exercises it.
TELNET_BYTES = st.binary(max_size=200) | st.lists(
    st.sampled_from([0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF0, 0xF4, 0xF3, 0xEE, 0xEC])
    | st.sampled_from([0x03, 0x04, 0x06, 0x18, 0x0D, 0x0A, ord("x")])
    | st.integers(0, 255),
    max_size=200,
).map(bytes)


def feed_pieces(parser: TelnetInput, pieces: list[bytes]) -> TelnetFeedResult:
    """Feed the pieces in turn; combine into one result (first interrupt, all replies)."""
    results = [parser.feed(piece) for piece in pieces]
    interrupts = [result.interrupt for result in results if result.interrupt is not None]
    return TelnetFeedResult(
        interrupt=interrupts[0] if interrupts else None,
        reply=b"".join(result.reply for result in results),
    )


def reply_frames(reply: bytes) -> list[bytes]:
    assert len(reply) % 3 == 0
    return [reply[index : index + 3] for index in range(0, len(reply), 3)]


def test_netkit_greeting_is_refused_once() -> None:
    parser = TelnetInput()
    first = parser.feed(NETKIT_GREETING)
    assert first == TelnetFeedResult(interrupt=None, reply=NETKIT_REFUSAL)
    assert not first.interrupted
    assert parser.feed(NETKIT_GREETING) == TelnetFeedResult(interrupt=None, reply=b"")


def test_plain_text_gives_nothing() -> None:
    assert TelnetInput().feed(b"hello\r\nquite\r\nquit?\r\n") == TelnetFeedResult(
        interrupt=None, reply=b""
    )


@pytest.mark.parametrize(
    "data",
    [b"quit\r\n", b"QUIT\r\0", b"  Quit \n", b"hello\r\nquit\r", b"\xff\xfb\x18quit\r\n"],
)
def test_a_line_saying_quit_stops_the_test(data: bytes) -> None:
    assert TelnetInput().feed(data).interrupt == Interrupt(InterruptCause.QUIT)


def test_quit_typed_a_character_at_a_time_stops_the_test() -> None:
    parser = TelnetInput()
    assert not any(parser.feed(bytes([byte])).interrupted for byte in b"quit")
    assert parser.feed(b"\r").interrupt == Interrupt(InterruptCause.QUIT)


@pytest.mark.parametrize(
    "data", [b"please quit\r\n", b"quit" + b" " * 20 + b"x\r\n", b"q\xff\xffuit\r\n"]
)
def test_quit_inside_a_longer_line_is_not_quit(data: bytes) -> None:
    assert not TelnetInput().feed(data).interrupted


def test_literal_ff_flood_then_interrupt() -> None:
    parser = TelnetInput()
    assert not parser.feed(b"\xff\xff" * 100_000).interrupted
    assert parser.feed(b"\xff\xff\xff\xf4").interrupt == Interrupt(InterruptCause.INTERRUPT_PROCESS)


@pytest.mark.parametrize("verb", [0xFC, 0xFE], ids=["WONT", "DONT"])
def test_wont_and_dont_need_no_answer(verb: int) -> None:
    assert TelnetInput().feed(bytes((0xFF, verb, 0x01))).reply == b""


def test_do_and_will_of_the_same_option_are_answered_separately() -> None:
    parser = TelnetInput()
    assert parser.feed(b"\xff\xfb\x01").reply == b"\xff\xfe\x01"
    assert parser.feed(b"\xff\xfd\x01").reply == b"\xff\xfc\x01"
    assert parser.feed(b"\xff\xfb\x01\xff\xfd\x01").reply == b""


def test_every_do_timing_mark_is_answered() -> None:
    # netkit discards output after Ctrl-C until its DO TIMING-MARK is answered.
    parser = TelnetInput()
    ctrl_c = b"\xff\xf4\xff\xfd\x06"
    for _ in range(3):
        result = parser.feed(ctrl_c)
        assert result == TelnetFeedResult(
            interrupt=Interrupt(InterruptCause.INTERRUPT_PROCESS), reply=b"\xff\xfc\x06"
        )


def test_negotiation_flood_is_answered_once_per_option() -> None:
    flood = b"".join(
        bytes((0xFF, verb, option)) for verb in range(0xFB, 0xFF) for option in range(256)
    )
    parser = TelnetInput()
    frames = reply_frames(parser.feed(flood).reply)
    assert sorted(frames) == sorted(
        [bytes((0xFF, 0xFE, option)) for option in range(256)]
        + [bytes((0xFF, 0xFC, option)) for option in range(256)]
    )
    for _ in range(10):
        assert parser.feed(flood).reply == b"\xff\xfc\x06"


@pytest.mark.parametrize(
    ("data", "cause"),
    [
        (b"abc\xff\xf4def", InterruptCause.INTERRUPT_PROCESS),
        (b"abc\xff\xf3", InterruptCause.BREAK),
        (b"\xff\xeeabc", InterruptCause.ABORT),
        (b"\xff\xec", InterruptCause.END_OF_FILE),
        (b"abc\x03", InterruptCause.CTRL_C),
        (b"\x04", InterruptCause.CTRL_D),
        (NETKIT_GREETING + b"\x03", InterruptCause.CTRL_C),
    ],
)
def test_interrupts_are_detected(data: bytes, cause: InterruptCause) -> None:
    result = TelnetInput().feed(data)
    assert result.interrupted
    assert result.interrupt == Interrupt(cause)


def test_first_interrupt_in_a_chunk_is_reported() -> None:
    assert TelnetInput().feed(b"\x04\x03\xff\xf4").interrupt == Interrupt(InterruptCause.CTRL_D)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff\xff", id="IAC IAC"),
        pytest.param(b"\xff\xff\xf4\xff\xff\xf3", id="IAC IAC then IP/BRK data bytes"),
        pytest.param(b"\xff\xf5\xff\xf1\xff\xf2\xff\xf6", id="AO NOP DM AYT"),
        pytest.param(b"\xff\xfb\x03\xff\xfd\x04", id="option codes 3 and 4"),
        pytest.param(b"\xff\xf0", id="stray SE"),
    ],
)
def test_not_interrupts(data: bytes) -> None:
    assert not TelnetInput().feed(data + b"text").interrupted


def test_subnegotiation_content_is_not_data() -> None:
    parser = TelnetInput()
    # Terminal type "\x03\x04\xf4" with a doubled IAC and a literal SE byte inside.
    subnegotiation = b"\xff\xfa\x18\x00\x03\x04\xf4\xff\xff\xf0\x03\xff\xf0"
    assert parser.feed(subnegotiation) == TelnetFeedResult(interrupt=None, reply=b"")
    assert parser.feed(b"\x03").interrupt == Interrupt(InterruptCause.CTRL_C)


def test_subnegotiation_option_byte_is_not_a_command() -> None:
    parser = TelnetInput()
    assert not parser.feed(b"\xff\xfa\x03\xff\xf0").interrupted
    assert not parser.feed(b"\xff\xfa\xff\x04\xff\xf0").interrupted


def test_command_inside_unterminated_subnegotiation_ends_it() -> None:
    parser = TelnetInput()
    result = parser.feed(b"\xff\xfa\x18\x00vt100\xff\xf4")
    assert result.interrupt == Interrupt(InterruptCause.INTERRUPT_PROCESS)
    assert parser.feed(b"\xff\xfb\x18").reply == b"\xff\xfe\x18"
    assert parser.feed(b"\x03").interrupted


def test_huge_subnegotiation_does_not_grow_memory() -> None:
    parser = TelnetInput()
    chunk = b"\x03\x04\xf4" * 20_000
    assert parser.feed(b"\xff\xfa\x18").reply == b""
    tracemalloc.start()
    try:
        for _ in range(500):  # 30 MB of subnegotiation content
            assert not parser.feed(chunk).interrupted
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16_384
    assert not parser.feed(b"\xff\xf0text").interrupted
    assert parser.feed(b"\x03").interrupted


def test_parser_keeps_no_input() -> None:
    source = random.Random(1143)
    chunks = [source.randbytes(4096) for _ in range(64)]
    parser = TelnetInput()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(16):  # 4 MiB of random input
            for chunk in chunks:
                parser.feed(chunk)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert after - before < 4096


@given(data=TELNET_BYTES, split=st.data())
def test_any_split_gives_the_same_result(data: bytes, split: st.DataObject) -> None:
    cuts = sorted(split.draw(st.lists(st.integers(0, len(data)), max_size=len(data) + 1)))
    pieces = [data[start:end] for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    assert feed_pieces(TelnetInput(), pieces) == TelnetInput().feed(data)


@given(data=TELNET_BYTES)
def test_byte_by_byte_gives_the_same_result(data: bytes) -> None:
    pieces = [data[index : index + 1] for index in range(len(data))]
    assert feed_pieces(TelnetInput(), pieces) == TelnetInput().feed(data)


@given(chunks=st.lists(TELNET_BYTES, max_size=10))
def test_replies_are_refusals_at_most_once_each(chunks: list[bytes]) -> None:
    parser = TelnetInput()
    reply = b"".join(parser.feed(chunk).reply for chunk in chunks)
    assert len(reply) <= sum(map(len, chunks))
    frames = reply_frames(reply)
    assert all(frame[0] == 0xFF and frame[1] in (0xFC, 0xFE) for frame in frames)
    repeatable = b"\xff\xfc\x06"
    once = [frame for frame in frames if frame != repeatable]
    assert len(once) == len(set(once))


def test_encode_line_plain_and_unicode() -> None:
    assert encode_line("") == b"\r\n"
    assert encode_line("<<< 250 mail.example.com") == b"<<< 250 mail.example.com\r\n"
    assert encode_line(":Relay test: é→✓") == ":Relay test: é→✓\r\n".encode()


def test_encode_line_escapes_line_breaks() -> None:
    assert encode_line("a\r\nb\rc\n") == b"a\\r\\nb\\rc\\n\r\n"


def test_encode_line_escapes_lone_surrogates() -> None:
    assert encode_line("x\udcff") == b"x\\udcff\r\n"


@example("\udcff\r")
@given(st.text(st.characters(exclude_categories=())))
def test_encode_line_is_one_safe_line(text: str) -> None:
    line = encode_line(text)
    assert line.endswith(b"\r\n")
    body = line[:-2]
    assert b"\r" not in body
    assert b"\n" not in body
    assert b"\xff" not in body.replace(b"\xff\xff", b"")


@given(st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n")))
def test_encode_line_keeps_ordinary_text(text: str) -> None:
    assert encode_line(text) == text.encode() + b"\r\n"


@given(st.lists(st.text(max_size=40), min_size=1, max_size=8))
def test_encoding_lines_together_is_encoding_each(lines: list[str]) -> None:
    assert encode_lines(lines) == b"".join(encode_line(line) for line in lines)


def test_a_line_break_inside_a_line_is_escaped_when_encoded_together() -> None:
    assert encode_lines(["a", "b\r\nc", "d"]) == b"a\r\nb\\r\\nc\r\nd\r\n"
