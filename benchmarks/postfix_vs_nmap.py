"""Time `relayprobe check` against nmap's smtp-open-relay on the real Postfix instances.

Both tools test the closed (127.0.0.2), the open (127.0.0.3) and the TLS-requiring open
(127.0.0.4: 530 until STARTTLS) instance of tests/infra/postfix.sh, each R times, alternating so
neither gets a warmer machine. Stock
Postfix delays every reply once a session has 10 errors; nmap's 16 probes share one session
and pay for it, relayprobe's are meant not to. The table shows, per tool and target, the
median wall-clock time, the result, and how many sessions reached Postfix's error limits.

Run from the repository root, as root (it starts the instances if they are down):

    python -m benchmarks.postfix_vs_nmap [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.infra.postfix import (
    CLOSED_HOST,
    OPEN_HOST,
    SMTP_PORT,
    TEST_DOMAIN,
    TLS_OPEN_HOST,
    PostfixStartError,
    ensure_started,
    error_limit_hits,
    log_marker,
    postfix_available,
)

TARGETS = {CLOSED_HOST: "closed", OPEN_HOST: "open", TLS_OPEN_HOST: "tls-open"}
MAX_REPEAT = 20
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class Result:
    """What one run of a tool concluded."""

    summary: str  # e.g. "rejected (0/20 accepted)", or what went wrong
    completed: bool  # the tool reached a verdict


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    command: Callable[[str], list[str]]
    result: Callable[[subprocess.CompletedProcess[str]], Result]


@dataclass(frozen=True, slots=True)
class Run:
    """One tool's runs against one target."""

    tool: str
    target: str
    seconds: tuple[float, ...]
    results: tuple[Result, ...]
    error_limit_sessions: int  # sessions that reached the soft or hard error limit

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def completed(self) -> bool:
        return all(result.completed for result in self.results)

    def as_json(self) -> dict[str, object]:
        return {
            "tool": self.tool,
            "target": self.target,
            "seconds": self.seconds,
            "median_s": self.median_s,
            "results": [result.summary for result in self.results],
            "completed": self.completed,
            "error_limit_sessions": self.error_limit_sessions,
        }


def relayprobe_command(executable: str) -> Callable[[str], list[str]]:
    def command(target: str) -> list[str]:
        return [
            executable,
            "check",
            target,
            "--port",
            str(SMTP_PORT),
            "--json",
            "--test-domain",
            TEST_DOMAIN,
            "--no-confirm",
        ]

    return command


def nmap_command(target: str) -> list[str]:
    # -n: no reverse lookups; the script args name every domain and address it would
    # otherwise derive, so it looks nothing up and talks to the target alone.
    script_args = ",".join(
        [
            f"smtp.domain={TEST_DOMAIN}",
            f"smtp-open-relay.domain={TEST_DOMAIN}",
            f"smtp-open-relay.ip={target}",
            "smtp-open-relay.from=antispam",
            "smtp-open-relay.to=relaytest",
        ]
    )
    return [
        "nmap",
        "-n",
        "-Pn",
        "-p",
        str(SMTP_PORT),
        "--script",
        "smtp-open-relay",
        "--script-args",
        script_args,
        "-oX",
        "-",
        target,
    ]


def relayprobe_result(completed: subprocess.CompletedProcess[str]) -> Result:
    """'rejected (0/20 accepted)' from `check --json` output, with the TLS handshakes it took
    ('accepted (19/20 accepted, 3 TLS handshakes)'), or what went wrong."""
    try:
        result = json.loads(completed.stdout)
        accepted = f"{result['accepted']}/{len(result['probes'])} accepted"
        handshakes = result["transcript"].count(">>> STARTTLS")
        tls = f", TLS handshakes: {handshakes}" if handshakes else ""
        return Result(f"{result['verdict']} ({accepted}{tls})", completed=True)
    except (ValueError, KeyError, TypeError):
        return _failure(completed)


def nmap_result(completed: subprocess.CompletedProcess[str]) -> Result:
    """'accepted (16/16 accepted)' or 'rejected (0/16 accepted)' from nmap's XML."""
    try:
        root = ElementTree.fromstring(completed.stdout)
    except ElementTree.ParseError:
        return _failure(completed)
    script = root.find(".//script[@id='smtp-open-relay']")
    if script is None:
        return Result("no script output (port 25 not open?)", completed=False)
    output = script.get("output", "").strip()
    if output.startswith("Server is an open relay ("):
        count = output.removeprefix("Server is an open relay (").split(" ", 1)[0]
        return Result(f"accepted ({count} accepted)", completed=True)
    if output.startswith("Server doesn't seem to be an open relay"):
        return Result("rejected (0/16 accepted)", completed=True)
    return Result(f"error: {output.splitlines()[0] if output else 'empty output'}", completed=False)


def _failure(completed: subprocess.CompletedProcess[str]) -> Result:
    lines = completed.stderr.strip().splitlines()
    last = lines[-1] if lines else "no output"
    return Result(f"error: exit {completed.returncode}: {last}", completed=False)


def timed_run(command: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return time.perf_counter() - started, completed


def benchmark(tools: Sequence[Tool], repeat: int) -> list[Run]:
    seconds: dict[tuple[str, str], list[float]] = {}
    results: dict[tuple[str, str], list[Result]] = {}
    limit_sessions: dict[tuple[str, str], int] = {}
    for _ in range(repeat):
        for target, instance in TARGETS.items():
            for tool in tools:
                key = (tool.name, target)
                marker = log_marker()
                try:
                    elapsed, completed = timed_run(tool.command(target))
                    result = tool.result(completed)
                except subprocess.TimeoutExpired:
                    elapsed = RUN_TIMEOUT_S
                    result = Result(f"error: no verdict in {RUN_TIMEOUT_S:g} s", completed=False)
                # Sessions cut off at the hard limit were tarpitted first: counted there.
                tarpitted = error_limit_hits(marker)[instance].tarpitted
                seconds.setdefault(key, []).append(elapsed)
                results.setdefault(key, []).append(result)
                limit_sessions[key] = limit_sessions.get(key, 0) + tarpitted
    return [
        Run(
            tool=tool.name,
            target=target,
            seconds=tuple(seconds[tool.name, target]),
            results=tuple(results[tool.name, target]),
            error_limit_sessions=limit_sessions[tool.name, target],
        )
        for target in TARGETS
        for tool in tools
    ]


def ratios(runs: Sequence[Run]) -> dict[str, float | None]:
    """nmap's median time over relayprobe's, per target; None unless both reached verdicts."""
    by_key = {(run.tool, run.target): run for run in runs}
    ratio: dict[str, float | None] = {}
    for target in TARGETS:
        nmap, relayprobe = by_key["nmap", target], by_key["relayprobe", target]
        both = nmap.completed and relayprobe.completed
        ratio[target] = nmap.median_s / relayprobe.median_s if both else None
    return ratio


def print_table(runs: Sequence[Run], repeat: int) -> None:
    print(f"{'tool':<11} {'target':<10} {'median s':>9}  {'limit hits':>10}  result, {repeat} runs")
    for run in runs:
        shown = "; ".join(dict.fromkeys(result.summary for result in run.results))
        print(
            f"{run.tool:<11} {run.target:<10} {run.median_s:>9.3f}  "
            f"{run.error_limit_sessions:>10}  {shown}"
        )
    for target, ratio in ratios(runs).items():
        shown = f"{ratio:.1f}x" if ratio is not None else "n/a (a run reached no verdict)"
        print(f"nmap/relayprobe time on {target} ({TARGETS[target]}): {shown}")


def find_relayprobe() -> str | None:
    """The console script beside this interpreter (a virtualenv) first, then on PATH."""
    search_path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    return shutil.which("relayprobe", path=search_path)


def _cannot_run(reason: str) -> int:
    print(f"postfix_vs_nmap: {reason}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--repeat", type=int, default=3, help=f"runs per tool and target, 1..{MAX_REPEAT}"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.repeat <= MAX_REPEAT:
        parser.error(f"--repeat must be between 1 and {MAX_REPEAT}")
    relayprobe = find_relayprobe()
    if relayprobe is None:
        return _cannot_run("relayprobe is not installed")
    if shutil.which("nmap") is None:
        return _cannot_run("nmap is not installed (run .ci/system-packages)")
    reason = postfix_available()
    if reason is not None:
        return _cannot_run(reason)
    try:
        ensure_started()
    except PostfixStartError as exc:
        print(f"postfix_vs_nmap: {exc}", file=sys.stderr)
        return 1
    tools = [
        Tool("relayprobe", relayprobe_command(relayprobe), relayprobe_result),
        Tool("nmap", nmap_command, nmap_result),
    ]
    runs = benchmark(tools, args.repeat)
    if args.json:
        report = {
            "repeat": args.repeat,
            "runs": [run.as_json() for run in runs],
            "nmap_over_relayprobe": ratios(runs),
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(runs, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
