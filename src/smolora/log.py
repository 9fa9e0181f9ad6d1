"""The package's one voice: every message goes through the ``smolora`` logger.

``say`` is for progress, ``warn`` for what a user should act on. On the console a message reads
``[smolora] message`` or ``[smolora] warning: message``, written to standard output above any
progress bar. ``quiet()`` (``--quiet``) keeps warnings and errors only; under torchrun only
process 0 speaks. A program that configures ``logging`` itself can take the ``smolora`` logger
over: set its handlers and ``propagate`` as it likes.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("smolora")


class _Console(logging.Handler):
    """One line per message to standard output, through tqdm so that a progress bar stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


class ConsoleFormat(logging.Formatter):
    """``[smolora] message``, ``[smolora] warning: message``."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"[smolora] {kind}{record.getMessage()}"


if not logger.handlers:
    _handler = _Console()
    _handler.setFormatter(ConsoleFormat())
    logger.addHandler(_handler)
    logger.propagate = False
    logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR)


def say(message: str) -> None:
    logger.info(message)


def warn(message: str) -> None:
    logger.warning(message)


def quiet(on: bool = True) -> None:
    """Warnings and errors only (``--quiet``); off again with ``quiet(False)``."""
    if int(os.environ.get("RANK", "0")) == 0:
        logger.setLevel(logging.WARNING if on else logging.INFO)
