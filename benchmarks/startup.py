"""Whole-process start-up: `relayprobe --help` and `relayprobe check` against the import floor.

The floor is what the chosen libraries cost before relayprobe does anything:
`python -c "import asyncio, aiosmtplib, uvloop, json"`. Each command runs R times, in a
different order each round so that none always follows another, with its output discarded; the
table shows the median wall-clock time of each and its ratio to the floor's median, measured in
the same run. `check` tests the closed stock Postfix of tests/infra/postfix.sh (127.0.0.2),
which refuses every probe at once, so its time is start-up, one SMTP session and exit.

relayprobe runs as `python -m relayprobe` from the repository root, or from `--tree DIR` (a
`git worktree` of another commit, for a before-and-after in one run of this machine).

Run from the repository root, as root (it starts the Postfix instances if they are down):

    python -m benchmarks.startup [--repeat R] [--tree DIR] [--json]
"""

from __future__ import annotations

import argparse
import compileall
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.infra.postfix import CLOSED_HOST, PostfixStartError, ensure_started, postfix_available

MAX_REPEAT = 50
RUN_TIMEOUT_S = 30.0
# Targets of the issue, as ratios to the floor measured in the same run.
TARGETS = {"relayprobe --help": 1.2, f"relayprobe check {CLOSED_HOST}": 1.5}
FLOOR = "import floor"


REPOSITORY = Path(__file__).resolve().parents[1]


def commands() -> dict[str, list[str]]:
    relayprobe = [sys.executable, "-m", "relayprobe"]
    return {
        FLOOR: [sys.executable, "-c", "import asyncio, aiosmtplib, uvloop, json"],
        "relayprobe --help": [*relayprobe, "--help"],
        f"relayprobe check {CLOSED_HOST}": [*relayprobe, "check", CLOSED_HOST],
    }


def timed(argv: Sequence[str], tree: Path) -> float:
    """Seconds from start to exit; a command that fails is a broken benchmark, not a result."""
    started = time.perf_counter()
    completed = subprocess.run(
        argv,
        cwd=tree,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    elapsed = time.perf_counter() - started
    # `check` exits 0 for a server that refused every probe, which the closed instance does.
    if completed.returncode != 0:
        error = completed.stderr.decode(errors="replace").strip()
        raise SystemExit(f"{' '.join(argv)} exited {completed.returncode}: {error}")
    return elapsed


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    median_s: float
    runs_s: tuple[float, ...]
    ratio: float
    target: float | None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "median_s": round(self.median_s, 4),
            "runs_s": [round(run, 4) for run in self.runs_s],
            "ratio_to_floor": round(self.ratio, 2),
            "target": self.target,
        }


def compile_bytecode(tree: Path) -> None:
    """Write the checkout's bytecode, as pip does when it installs a package: with
    PYTHONDONTWRITEBYTECODE set (as on some CI machines), every run would compile every module
    again, which is no start-up an operator sees."""
    if not compileall.compile_dir(tree / "relayprobe", quiet=1):
        raise SystemExit(f"cannot compile {tree / 'relayprobe'}")


def measure(repeat: int, tree: Path) -> list[Row]:
    compile_bytecode(tree)
    argvs = commands()
    names = list(argvs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # once each, unmeasured: the page cache holds every file afterwards
        timed(argvs[name], tree)
    for round_number in range(repeat):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(argvs[name], tree))
    floor = statistics.median(times[FLOOR])
    return [
        Row(
            name,
            statistics.median(times[name]),
            tuple(times[name]),
            statistics.median(times[name]) / floor,
            TARGETS.get(name),
        )
        for name in names
    ]


def print_table(rows: Sequence[Row]) -> None:
    print(f"{'command':<32} {'median s':>9} {'x floor':>8} {'target':>7}")
    for row in rows:
        target = "" if row.target is None else f"<= {row.target:g}"
        met = "" if row.target is None else ("  met" if row.ratio <= row.target else "  MISSED")
        print(f"{row.name:<32} {row.median_s:>9.3f} {row.ratio:>8.2f} {target:>7}{met}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help=f"runs each, 1..{MAX_REPEAT}")
    parser.add_argument(
        "--tree", type=Path, default=REPOSITORY, help="the checkout whose relayprobe runs"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if not 1 <= args.repeat <= MAX_REPEAT:
        parser.error(f"--repeat must be 1..{MAX_REPEAT}")
    if (reason := postfix_available()) is not None:
        raise SystemExit(reason)
    try:
        ensure_started()
    except PostfixStartError as exc:
        raise SystemExit(str(exc)) from None
    if not (args.tree / "relayprobe" / "__main__.py").is_file():
        parser.error(f"--tree {args.tree}: no relayprobe checkout there")
    rows = measure(args.repeat, args.tree.resolve())
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
