"""The one place that configures structlog: JSON lines for machines, plain lines for people."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure_logging(
    log_format: str = "auto", *, stream: TextIO | None = None, level: int = logging.INFO
) -> None:
    """Log to `stream` (stderr by default); `auto` means console on a terminal, JSON otherwise."""
    output = stream or sys.stderr
    as_json = log_format == "json" or (log_format == "auto" and not output.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if as_json else structlog.dev.set_exc_info,
            renderer,
        ],
        logger_factory=structlog.PrintLoggerFactory(file=output),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    # Libraries (asyncio, aiosmtpd) log through the standard library: keep their warnings.
    logging.basicConfig(
        stream=output, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
