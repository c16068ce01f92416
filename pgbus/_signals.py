"""SIGTERM and SIGINT as asyncio events: how :meth:`pgbus.Bus.run_forever` and ``pgbus run`` stop.

Docker, systemd and Kubernetes stop a service with SIGTERM, a terminal with SIGINT
(Ctrl-C). The first one asks for a graceful stop (drain, then exit 0); a second one
asks to stop at once (exit ``128 + signal``: 130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

#: The signals that stop a service.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalWatch:
    """Which stop signals arrived: ``first`` is set by the first, ``second`` by another."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()
        #: The last signal received, if any.
        self.signum: int | None = None
        self.count = 0

    def received(self, signum: int) -> None:
        """Record ``signum`` (the signal handler)."""
        self.signum = signum
        self.count += 1
        (self.first if self.count == 1 else self.second).set()

    @property
    def name(self) -> str:
        """The last signal's name (``"SIGTERM"``), or ``""``."""
        return "" if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """``128 + signal``: what a shell reports for a process the signal ended."""
        return 128 + (self.signum or 0)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[SignalWatch]:
    """Watch the stop signals in the running loop while the block runs, then restore them.

    Outside the main thread (where a signal handler cannot be set) the watch never fires.
    """
    watch = SignalWatch()
    if threading.current_thread() is not threading.main_thread():
        yield watch
        return
    loop = asyncio.get_running_loop()
    for signum in signals:
        loop.add_signal_handler(signum, watch.received, signum)
    try:
        yield watch
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
