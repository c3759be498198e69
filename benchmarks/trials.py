"""`relayprobe serve` with a part of its work taken away: what that part costs under load.

For `python -m benchmarks.load --trial NAME`, which runs it beside the yardstick. A measuring
tool, never a service: what it takes away is what the spec asks for.

    python -m benchmarks.trials NAME serve [options of relayprobe serve]

- `no-transcript`: the engine passes on its summary alone, so no transcript line is rendered,
  kept or sent; the caller reads the summary and the verdict.
- `one-session`: no fresh session before the server's error limit, so a test makes one SMTP
  session, as the yardstick does (against Postfix this would run into its tarpit).
- `neither`: both.
"""

from __future__ import annotations

import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from relayprobe import cli, testrun
from relayprobe.relaytest import budget, engine
from relayprobe.relaytest.events import Event, Summary
from relayprobe.relaytest.options import RelayTestOptions

TRIALS = ("no-transcript", "one-session", "neither")


def _passing_on_the_summary_alone(
    target: str, options: RelayTestOptions, emit: engine.Emit, **keywords: Any
) -> Coroutine[Any, Any, Summary]:
    def summary_alone(event: Event) -> None:
        if isinstance(event, Summary):
            emit(event)

    return engine.run_relay_test(target, options, summary_alone, **keywords)


def _never_spent(_: budget.ErrorBudget) -> bool:
    return False


def take_away(trial: str) -> None:
    """Patch this process's relayprobe as `trial` says; ValueError for an unknown trial."""
    if trial not in TRIALS:
        raise ValueError(f"unknown trial {trial!r} (known: {', '.join(TRIALS)})")
    if trial in ("no-transcript", "neither"):
        setattr(testrun, "run_relay_test", _passing_on_the_summary_alone)  # noqa: B010
    if trial in ("one-session", "neither"):
        setattr(budget.ErrorBudget, "spent", property(_never_spent))  # noqa: B010


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] not in TRIALS:
        names = ",".join(TRIALS)
        print(f"usage: python -m benchmarks.trials {{{names}}} serve ...", file=sys.stderr)
        return 2
    take_away(arguments[0])
    return cli.main(arguments[1:])


if __name__ == "__main__":
    sys.exit(main())
