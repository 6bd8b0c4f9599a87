"""Console output of the pipelines, through :mod:`logging`.

The pipelines report progress in the reference implementation's console shape (banners,
fixed-width tables). They log it, one record per line, to loggers under ``mahals``; nothing is
printed. :func:`console` attaches a message-only handler to the ``mahals`` logger, which is what
``mahals`` (the CLI) does, so the console looks as the reference implementation's. A library
user sees nothing at INFO level unless they configure logging, and can silence or redirect it
as any other logger (``logging.getLogger("mahals").setLevel(logging.WARNING)``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import torch

__all__ = ["RULE", "WIDE_RULE", "banner", "console", "device_line", "table"]

RULE = "=" * 60
WIDE_RULE = "=" * 70
ROOT_LOGGER = "mahals"


class _StdoutHandler(logging.StreamHandler):
    """Writes to ``stream``, or to whatever ``sys.stdout`` is at the time of each record (so
    that ``contextlib.redirect_stdout`` and pytest's capture see the output)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._fixed = stream

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._fixed if self._fixed is not None else sys.stdout
        super().emit(record)


@contextmanager
def console(stream: TextIO | None = None, level: int = logging.INFO) -> Iterator[None]:
    """Within the block, ``mahals`` log records of ``level`` and above are written to ``stream``
    (default: standard output) as bare messages, one per line, as the CLI shows them."""
    logger = logging.getLogger(ROOT_LOGGER)
    handler = _StdoutHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def banner(log: logging.Logger, *lines: str, rule: str = RULE) -> None:
    """A blank line, ``rule``, the lines, ``rule`` (the reference implementation's headings)."""
    log.info("\n%s", rule)
    for line in lines:
        log.info("%s", line)
    log.info("%s", rule)


def device_line() -> str:
    """``GPU: <name>`` / ``Memory: <total> GB`` on CUDA, the CPU thread count otherwise."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"GPU: {props.name}\nMemory: {props.total_memory / 1e9:.1f} GB"
    return f"Device: CPU ({torch.get_num_threads()} threads)"


def table(
    log: logging.Logger,
    headers: Sequence[str],
    widths: Sequence[int],
    rows: Iterable[Sequence[Any]],
    rule: str = "-" * 60,
) -> None:
    """A fixed-width table (the reference implementation's results tables)."""
    log.info("%s", "".join(f"{h:<{w}}" for h, w in zip(headers, widths, strict=True)))
    log.info("%s", rule)
    for row in rows:
        log.info("%s", "".join(f"{_cell(v):<{w}}" for v, w in zip(row, widths, strict=True)))
    log.info("%s", rule)


def _cell(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
