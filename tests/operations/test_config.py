from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relayprobe import cli
from relayprobe.frontdoors.access import RateLimiter, rate_refusal
from relayprobe.operations.config import (
    MAX_COUNT,
    MAX_DAYS,
    MAX_RATE,
    MAX_SECONDS,
    MIN_DAYS,
    MIN_RATE,
    MIN_SECONDS,
    ConfigError,
    Endpoint,
    Settings,
    add_options,
    load_settings,
    parse_count,
    parse_days,
    parse_endpoint,
    parse_port,
    parse_prefix_length,
    parse_rate,
    parse_seconds,
)
from relayprobe.relaytest.probes import CLASSIC, EXTENDED, Probe


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relayprobe.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def parsed(command: str, *argv: str) -> dict[str, object]:
    """The options as the command line hands them to load_settings."""
    parser = argparse.ArgumentParser()
    add_options(parser, command)
    return vars(parser.parse_args(argv))


def test_defaults() -> None:
    settings = load_settings({}, environ={})
    assert settings == Settings()
    assert settings.listen == (Endpoint("0.0.0.0", 23), Endpoint("::", 23))
    assert settings.target_port == 25
    assert settings.test_options().suite == CLASSIC


def test_precedence_is_option_then_environment_then_file_then_default(tmp_path: Path) -> None:
    config = write(tmp_path, "reply_timeout = 5\nconnect_timeout = 4\n")
    environ = {"RELAYPROBE_REPLY_TIMEOUT": "6", "RELAYPROBE_DEADLINE": "60"}
    options = parsed("check", "--config", config, "--reply-timeout", "7")
    assert load_settings(options, environ=environ).reply_timeout == 7.0
    assert load_settings(parsed("check", "--config", config), environ=environ).reply_timeout == 6.0
    assert load_settings(parsed("check", "--config", config), environ={}).reply_timeout == 5.0
    assert load_settings({}, environ={}).reply_timeout == 30.0
    settings = load_settings(options, environ=environ)
    assert (settings.connect_timeout, settings.deadline) == (4.0, 60.0)


def test_config_file_named_in_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path, 'test_domain = "Relay-Test.ISP.example"\n')
    settings = load_settings({}, environ={"RELAYPROBE_CONFIG": config})
    assert settings.test_domain == "relay-test.isp.example"


def test_config_option_beats_the_environment(tmp_path: Path) -> None:
    config = write(tmp_path, "target_port = 2525\n")
    environ = {"RELAYPROBE_CONFIG": str(tmp_path / "missing.toml")}
    assert load_settings({"config": config}, environ=environ).target_port == 2525


def test_every_option_from_a_file(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
        listen = ["127.0.0.1:2323", "[::1]:2323"]
        test_domain = "relaytest.example"
        helo_name = "relay-test.isp.example"
        foreign_domain = "third.example"
        target_port = 2525
        suite = "extended"
        connect_timeout = 1.5
        reply_timeout = 2
        deadline = 60
        rdns_timeout = 0.5
        max_sessions = 10
        motd = "Welcome"
        log_format = "json"
        """,
    )
    assert load_settings({"config": config}, environ={}) == Settings(
        listen=(Endpoint("127.0.0.1", 2323), Endpoint("::1", 2323)),
        test_domain="relaytest.example",
        helo_name="relay-test.isp.example",
        foreign_domain="third.example",
        target_port=2525,
        suite="extended",
        connect_timeout=1.5,
        reply_timeout=2.0,
        deadline=60.0,
        rdns_timeout=0.5,
        max_sessions=10,
        motd="Welcome",
        log_format="json",
    )


def test_listen_is_repeatable_as_an_option() -> None:
    options = parsed("serve", "--listen", "127.0.0.1:2323", "--listen", "[::1]:2323")
    assert load_settings(options, environ={}).listen == (
        Endpoint("127.0.0.1", 2323),
        Endpoint("::1", 2323),
    )


def test_listen_is_a_comma_list_in_the_environment() -> None:
    environ = {"RELAYPROBE_LISTEN": "127.0.0.1:2323, [::1]:2323"}
    assert load_settings({}, environ=environ).listen == (
        Endpoint("127.0.0.1", 2323),
        Endpoint("::1", 2323),
    )


def test_listen_in_a_file_may_be_one_address(tmp_path: Path) -> None:
    config = write(tmp_path, 'listen = "[::]:23"\n')
    assert load_settings({"config": config}, environ={}).listen == (Endpoint("::", 23),)


def test_listen_option_replaces_the_file_list(tmp_path: Path) -> None:
    config = write(tmp_path, 'listen = ["127.0.0.1:2323", "[::1]:2323"]\n')
    options = parsed("serve", "--config", config, "--listen", "127.0.0.2:23")
    assert load_settings(options, environ={}).listen == (Endpoint("127.0.0.2", 23),)


@pytest.mark.parametrize(
    ("text", "endpoint", "shown"),
    [
        ("[::]:23", Endpoint("::", 23), "[::]:23"),
        ("0.0.0.0:23", Endpoint("0.0.0.0", 23), "0.0.0.0:23"),
        ("127.0.0.1:2323", Endpoint("127.0.0.1", 2323), "127.0.0.1:2323"),
        ("[::1]:2323", Endpoint("::1", 2323), "[::1]:2323"),
        ("[0:0:0:0:0:0:0:1]:65535", Endpoint("::1", 65535), "[::1]:65535"),
        ("127.0.0.1:1", Endpoint("127.0.0.1", 1), "127.0.0.1:1"),
    ],
)
def test_parse_endpoint(text: str, endpoint: Endpoint, shown: str) -> None:
    assert parse_endpoint(text) == endpoint
    assert str(endpoint) == shown


@pytest.mark.parametrize(
    "text",
    [
        "300.1.1.1:23",
        "::1:23",
        "[1.2.3.4]:23",
        "127.0.0.1",
        "127.0.0.1:",
        ":23",
        "[::1]",
        "[::1]:0",
        "127.0.0.1:65536",
        "127.0.0.1:x",
        "localhost:23",
        "[::1:23",
        "",
    ],
)
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text)


@pytest.mark.parametrize("address", ["300.1.1.1:23", "::1:23", "[1.2.3.4]:23"])
def test_bad_listen_address_names_the_option_variable_and_key(address: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--listen: "):
        load_settings(parsed("serve", "--listen", address), environ={})
    with pytest.raises(ConfigError, match=r"^RELAYPROBE_LISTEN: "):
        load_settings({}, environ={"RELAYPROBE_LISTEN": address})
    config = write(tmp_path, f'listen = ["{address}"]\n')
    with pytest.raises(ConfigError, match=": listen: "):
        load_settings({"config": config}, environ={})


@pytest.mark.parametrize("port", ["0", "65536", "x", "-1", "25.5", ""])
def test_bad_port_names_the_option_and_variable(port: str) -> None:
    with pytest.raises(ConfigError, match=r"^--target-port: "):
        load_settings(parsed("check", "--port", port), environ={})
    with pytest.raises(ConfigError, match=r"^RELAYPROBE_TARGET_PORT: "):
        load_settings({}, environ={"RELAYPROBE_TARGET_PORT": port})


@pytest.mark.parametrize("port", ["0", "65536", '"x"', "25.0", "true"])
def test_bad_port_in_a_file_names_the_key(port: str, tmp_path: Path) -> None:
    config = write(tmp_path, f"target_port = {port}\n")
    with pytest.raises(ConfigError, match=": target_port: "):
        load_settings({"config": config}, environ={})


@pytest.mark.parametrize("key", ["connect_timeout", "reply_timeout", "deadline", "rdns_timeout"])
@pytest.mark.parametrize("seconds", ["0", "-1", "-0.5", "nan", "inf", "soon"])
def test_bad_timeout_names_the_option(key: str, seconds: str) -> None:
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{flag}: "):
        load_settings(parsed("check", flag, seconds), environ={})
    with pytest.raises(ConfigError, match=f"^RELAYPROBE_{key.upper()}: "):
        load_settings({}, environ={f"RELAYPROBE_{key.upper()}": seconds})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("test_domain", '"localhost"'),
        ("helo_name", '"192.0.2.4"'),
        ("foreign_domain", '"bad_name.example"'),
        ("suite", '"huge"'),
        ("max_sessions", "0"),
        ("max_sessions", "1.5"),
        ("log_format", '"xml"'),
        ("motd", "42"),
        ("deadline", "-3"),
    ],
)
def test_bad_value_in_a_file_names_the_key(key: str, value: str, tmp_path: Path) -> None:
    config = write(tmp_path, f"{key} = {value}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{config}: {key}: ")):
        load_settings({"config": config}, environ={})


def test_unknown_file_key(tmp_path: Path) -> None:
    config = write(tmp_path, "reply_timeout = 5\nrepy_timeout = 6\n")
    with pytest.raises(ConfigError, match="unknown key 'repy_timeout'"):
        load_settings({"config": config}, environ={})


@pytest.mark.parametrize("name", ["RELAYPROBE_REPY_TIMEOUT", "RELAYPROBE_PROBES", "RELAYPROBE_"])
def test_unknown_environment_variable(name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown variable {name}$"):
        load_settings({}, environ={name: "1"})


def test_other_environment_variables_are_ignored() -> None:
    environ = {"PATH": "/usr/bin", "relayprobe_reply_timeout": "x", "RELAYPROBEX": "1"}
    assert load_settings({}, environ=environ) == Settings()


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=re.escape(f"config file {missing}: No such file")):
        load_settings({"config": str(missing)}, environ={})


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path}: ")):
        load_settings({"config": str(tmp_path)}, environ={})


@pytest.mark.parametrize("text", ["reply_timeout = \n", "[broken\n", "a = 1\na = 2\n"])
def test_invalid_toml(text: str, tmp_path: Path) -> None:
    config = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(f"config file {config}: not valid TOML")):
        load_settings({"config": config}, environ={})


def test_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('motd = "Grüße"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}: ")):
        load_settings({"config": str(path)}, environ={})


def test_extra_probes_from_the_file(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
        [[probes]]
        name = "Percent at literal"
        mail_from = "<>"
        rcpt_to = "<{rcpt}%{dom}@{ip}>"

        [[probes]]
        name = "Bang at host"
        mail_from = "<spamtest@{host}>"
        rcpt_to = "<{dom}!{rcpt}@{host}>"
        """,
    )
    settings = load_settings({"config": config}, environ={})
    extra = (
        Probe("Percent at literal", "<>", "<{rcpt}%{dom}@{ip}>"),
        Probe("Bang at host", "<spamtest@{host}>", "<{dom}!{rcpt}@{host}>"),
    )
    assert settings.probes == extra
    assert settings.test_options().suite == (*CLASSIC, *extra)


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ('name = "Mine"\nmail_from = "<>"\nrcpt_to = "<{who}>"', "unknown placeholder"),
        ('name = "Mine"\nmail_from = "<> SIZE=1"\nrcpt_to = "<{rcpt}>"', "printable ASCII"),
        ('name = "Mine"\nmail_from = "<>"', "name, mail_from and rcpt_to"),
        ('name = "Mine"\nmail_from = "<>"\nrcpt_to = "<x>"\nhelo = "x"', "name, mail_from"),
        ('name = 7\nmail_from = "<>"\nrcpt_to = "<x>"', "name, mail_from"),
        ('name = "Test 8"\nmail_from = "<>"\nrcpt_to = "<x>"', "duplicate probe names: Test 8"),
    ],
)
def test_bad_extra_probe_in_the_file(probes: str, message: str, tmp_path: Path) -> None:
    config = write(tmp_path, f"[[probes]]\n{probes}\n")
    with pytest.raises(ConfigError, match=f"probes: .*{message}"):
        load_settings({"config": config}, environ={})


def test_probes_must_be_tables(tmp_path: Path) -> None:
    config = write(tmp_path, 'probes = ["<{rcpt}@{dom}>"]\n')
    with pytest.raises(ConfigError, match=r"probes: expected \[\[probes\]\] tables"):
        load_settings({"config": config}, environ={})


def test_extra_probe_may_not_repeat_an_extended_name(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        'suite = "extended"\n[[probes]]\nname = "Test 20"\nmail_from = "<>"\nrcpt_to = "<x>"\n',
    )
    assert "Test 20" in [probe.name for probe in EXTENDED]
    with pytest.raises(ConfigError, match="duplicate probe names: Test 20"):
        load_settings({"config": config}, environ={})


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err.splitlines()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("RELAYPROBE_")]:
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--port", "0"], "--target-port"),
        (["--port", "65536"], "--target-port"),
        (["--target-port", "x"], "--target-port"),
        (["--reply-timeout", "0"], "--reply-timeout"),
        (["--connect-timeout", "-1"], "--connect-timeout"),
        (["--test-domain", "localhost"], "--test-domain"),
        (["--config", "/nonexistent/relayprobe.toml"], "/nonexistent/relayprobe.toml"),
    ],
)
def test_cli_bad_option_is_one_line_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_cli(["check", "127.0.0.1", *argv], capsys)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("relayprobe check: ")
    assert named in lines[0]


@pytest.mark.usefixtures("clean_environment")
def test_cli_bad_config_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, "reply_timeout = 5\nbogus = 1\n")
    status, lines = run_cli(["check", "127.0.0.1", "--config", config], capsys)
    assert (status, lines) == (2, [f"relayprobe check: config file {config}: unknown key 'bogus'"])


@pytest.mark.usefixtures("clean_environment")
def test_cli_bad_environment_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAYPROBE_TARGET_PORT", "99999")
    status, lines = run_cli(["check", "127.0.0.1"], capsys)
    assert status == 2
    assert lines == ["relayprobe check: RELAYPROBE_TARGET_PORT: port 99999 is out of range 1-65535"]


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--listen", "300.1.1.1:23"], "--listen"),
        (["--listen", "::1:23"], "--listen"),
        (["--listen", "[1.2.3.4]:23"], "--listen"),
        (["--listen", "127.0.0.1:2323", "--listen", "127.0.0.1:0"], "--listen"),
        (["--max-sessions", "0"], "--max-sessions"),
        (["--log-format", "xml"], "--log-format"),
    ],
)
def test_cli_serve_bad_option_is_one_line_and_exit_2(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_cli(["serve", "--check-config", *argv], capsys)
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"relayprobe serve: {named}: ")


@pytest.mark.usefixtures("clean_environment")
def test_cli_serve_check_config_accepts_good_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, 'listen = ["127.0.0.1:2323"]\n')
    argv = ["serve", "--check-config", "--config", config, "--listen", "[::1]:2323"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("configuration OK\n", "")


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    "argv",
    [
        ["check", "127.0.0.1", "--bogus"],
        ["check"],
        ["check", "127.0.0.1", "--port"],
        ["check", "127.0.0.1", "--listen", "127.0.0.1:23"],
        ["serve", "--check-config", "--bogus"],
        [],
    ],
    ids=[
        "unknown-option",
        "missing-target",
        "missing-value",
        "serve-only-option",
        "serve-unknown-option",
        "no-command",
    ],
)
def test_cli_usage_error_is_one_line_and_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    status, lines = run_cli(argv, capsys)
    assert status == 2
    assert len(lines) == 1, lines


# (key, value): each is valid TOML too, where 1e400 reads as inf.
OUT_OF_RANGE = [
    ("max_sessions", "inf"),
    ("max_sessions", "1e400"),
    ("max_sessions", "nan"),
    ("max_sessions", "2000000"),
    ("rate_prefix_tests", "-inf"),
    ("rate_ipv4_prefix", "inf"),
    ("rate_ipv6_prefix", "1e400"),
    ("rate_global", "1e-320"),
    ("rate_global", "0.00001"),
    ("rate_global", "inf"),
    ("rate_global", "nan"),
    ("deadline", "1e-320"),
    ("reply_timeout", "0.0001"),
    ("confirm_wait", "1e400"),
    ("rate_prefix_window", "nan"),
    ("rate_address_interval", "86401"),
    ("retention_days", "1e-320"),
    ("retention_days", "0.01"),
    ("retention_days", "inf"),
]


def assert_one_line_exit_2(status: int, lines: list[str], named: str) -> None:
    assert status == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"relayprobe serve: {named}: expected "), lines
    assert "Traceback" not in lines[0]


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_cli_out_of_range_number_by_option_is_one_line_and_exit_2(
    key: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = "--" + key.replace("_", "-")
    status, lines = run_cli(["serve", "--check-config", f"{flag}={value}"], capsys)
    assert_one_line_exit_2(status, lines, flag)


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(("key", "value"), OUT_OF_RANGE)
def test_cli_out_of_range_number_by_environment_is_one_line_and_exit_2(
    key: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(f"RELAYPROBE_{key.upper()}", value)
    status, lines = run_cli(["serve", "--check-config"], capsys)
    assert_one_line_exit_2(status, lines, f"RELAYPROBE_{key.upper()}")


@pytest.mark.usefixtures("clean_environment")
@pytest.mark.parametrize(
    ("key", "value"), [*OUT_OF_RANGE, ("max_sessions", "9" * 400), ("rate_global", "-" + "9" * 400)]
)
def test_cli_out_of_range_number_in_a_file_is_one_line_and_exit_2(
    key: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write(tmp_path, f"{key} = {value}\n")
    status, lines = run_cli(["serve", "--check-config", "--config", config], capsys)
    assert_one_line_exit_2(status, lines, f"config file {config}: {key}")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_sessions", "1"),
        ("max_sessions", str(MAX_COUNT)),
        ("rate_ipv6_prefix", "128"),
        ("rate_global", str(MIN_RATE)),
        ("rate_global", "1e6"),
        ("deadline", "0.001"),
        ("rate_prefix_window", "86400"),
        ("retention_days", str(MIN_DAYS)),
        ("retention_days", "100000"),
    ],
)
def test_the_bounds_themselves_are_accepted(key: str, value: str) -> None:
    settings = load_settings({}, environ={f"RELAYPROBE_{key.upper()}": value})
    assert getattr(settings, key) == float(value)


NUMERIC_PARSERS = [
    (parse_seconds, MIN_SECONDS, MAX_SECONDS),
    (parse_rate, MIN_RATE, MAX_RATE),
    (parse_days, MIN_DAYS, MAX_DAYS),
    (parse_count, 1, MAX_COUNT),
    (parse_prefix_length(32), 1, 32),
    (parse_prefix_length(128), 1, 128),
    (parse_port, 1, 65535),
]
# What a TOML file, a variable or an option can hand a parser: floats of every kind (and their
# text), and integers of any size.
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),
)


@given(number=numbers, as_text=st.booleans())
def test_numeric_parsers_return_a_finite_value_in_range_or_raise_value_error(
    number: float, as_text: bool
) -> None:
    raw = str(number) if as_text else number
    for parse, low, high in NUMERIC_PARSERS:
        try:
            value = parse(raw)
        except ValueError:
            continue
        assert math.isfinite(value)
        assert low <= value <= high


def test_the_slowest_global_rate_gives_a_wait_a_caller_can_read() -> None:
    limiter = RateLimiter(
        per_address_interval=0,
        prefix_window=0,
        global_per_second=parse_rate(str(MIN_RATE)),
        global_burst=1,
        clock=lambda: 0.0,
    )
    assert limiter.check(ipaddress.ip_address("192.0.2.1")).allowed
    refused = limiter.check(ipaddress.ip_address("192.0.2.2"))
    assert not refused.allowed
    waited = re.fullmatch(r".* try again in (\d+) s", rate_refusal(refused).message)
    assert waited is not None
    assert 86400 <= int(waited[1]) <= 86401


def test_a_nul_in_the_state_dir_is_refused(tmp_path: Path) -> None:
    # Only a TOML file can hold one (\u0000); at start, the OS call would raise a ValueError.
    config = write(tmp_path, 'state_dir = "/var/lib/relay\\u0000probe"\n')
    with pytest.raises(ConfigError, match="state_dir: a path cannot hold a NUL"):
        load_settings({"config": config}, environ={})


@pytest.mark.usefixtures("clean_environment")
def test_cli_check_config_reads_the_sink_certificate_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "sink.crt", tmp_path / "sink.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    argv = ["serve", "--check-config", "--sink-tls-cert", str(cert), "--sink-tls-key", str(key)]
    assert run_cli(argv, capsys) == (
        2,
        [
            f"relayprobe serve: canary sink: {cert} and {key}: expected a PEM certificate chain "
            "and its PEM private key"
        ],
    )
    missing = tmp_path / "missing.crt"
    assert run_cli([*argv[:3], str(missing), *argv[4:]], capsys) == (
        2,
        [f"relayprobe serve: canary sink: cannot read {missing}: No such file or directory"],
    )
