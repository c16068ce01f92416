"""Small helpers shared by test modules (tests/ is on sys.path, like _proxy)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import pgbus

if TYPE_CHECKING:
    from collections.abc import Iterator


def event_on(channel: str, name: str = "Ping") -> type[pgbus.Event]:
    """A fresh event type with one int field ``n``, bound to ``channel``."""
    return type(name, (pgbus.Event,), {"__annotations__": {"n": int}}, channel=channel)


@contextlib.contextmanager
def logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records of logger ``name``, whatever logging setup earlier tests left behind."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
