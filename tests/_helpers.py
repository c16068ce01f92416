"""Small helpers shared by test modules (tests/ is on sys.path, like _proxy)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

import pgbus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


def in_ci() -> bool:
    """Whether the tests run in CI (``CI=true``), where nothing they need may be missing."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(reason: str) -> NoReturn:
    """Skip a test whose tool or server is missing, or fail it in CI, which installs them."""
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


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


def ticket_type(channel: str) -> type[pgbus.Event]:
    """A fresh event type for durable tests: ``n`` and an optional ``blob``."""

    class Ticket(pgbus.Event, channel=channel):
        n: int
        blob: str = ""

    return Ticket


class Collector:
    """What a handler received, with a way to wait for a count."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: Any) -> None:
        self.items.append(event)
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 20.0) -> list[Any]:
        async def until() -> None:
            while len(self.items) < n:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout)
        return self.items


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``check()`` holds, looking every 20 ms, for at most ``timeout`` s.

    For a figure a background task updates (a gauge), where there is no event to wait on.
    """
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 - a background figure: no event to wait on
            await asyncio.sleep(0.02)


class Watch:
    """A plugin that timestamps each LISTEN (re-)establishment of one bus."""

    def __init__(self) -> None:
        self.connected_at: list[float] = []
        self.lost_at: list[tuple[float, BaseException | None]] = []
        self.changed = asyncio.Event()

    @pgbus.hookimpl
    def pgbus_on_connect(self, bus: pgbus.Bus, channels: Any) -> None:
        self.connected_at.append(time.monotonic())
        self.changed.set()

    @pgbus.hookimpl
    def pgbus_on_disconnect(self, bus: pgbus.Bus, error: BaseException | None) -> None:
        self.lost_at.append((time.monotonic(), error))
        self.changed.set()

    async def disconnects(self, n: int, timeout: float = 30.0) -> None:
        """Wait until the connection was found lost ``n`` times in all."""
        async with asyncio.timeout(timeout):
            while len(self.lost_at) < n:
                self.changed.clear()
                await self.changed.wait()

    async def connects(self, n: int, timeout: float = 30.0) -> None:
        """Wait until LISTEN was established ``n`` times in all."""
        async with asyncio.timeout(timeout):
            while len(self.connected_at) < n:
                self.changed.clear()
                await self.changed.wait()


class Letters:
    """A plugin that hands every dead letter to the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pgbus.DeadLetter] = asyncio.Queue()

    @pgbus.hookimpl
    def pgbus_on_dead_letter(self, dead_letter: pgbus.DeadLetter) -> None:
        self.queue.put_nowait(dead_letter)

    async def next(self) -> pgbus.DeadLetter:
        return await asyncio.wait_for(self.queue.get(), 5)


ROOT = Path(__file__).resolve().parent.parent


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m pgbus`` subprocess: no PGBUS_DSN unless given."""
    env = {k: v for k, v in os.environ.items() if k != "PGBUS_DSN"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def json_report(
    args: list[str], *, timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python ARGS`` (a bench or figures script), assert it exits 0; its JSON output."""
    proc = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


class Process:
    """A subprocess whose output the test reads with timeouts."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        #: Every line read so far from stderr (for :meth:`until`'s failure message).
        self.seen: list[str] = []

    async def line(self, stream: str = "stdout", timeout: float = 15.0) -> str:
        reader = self.proc.stdout if stream == "stdout" else self.proc.stderr
        assert reader is not None
        raw = await asyncio.wait_for(reader.readline(), timeout)
        return raw.decode()

    async def until(self, text: str, stream: str = "stderr", timeout: float = 20.0) -> str:
        """Read lines of ``stream`` until one contains ``text``; return it."""

        async def find() -> str:
            while True:
                line = await self.line(stream, timeout)
                self.seen.append(line)
                if text in line:
                    return line
                if not line:
                    raise AssertionError(f"{text!r} never came; got:\n{''.join(self.seen)}")

        return await asyncio.wait_for(find(), timeout)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        self.proc.send_signal(signum)

    async def stop(self, sig: int | None = None, timeout: float = 20.0) -> int:
        """Send ``sig`` (SIGINT by default) and return the exit status once it has ended."""
        self.proc.send_signal(signal.SIGINT if sig is None else sig)
        await asyncio.wait_for(self.proc.wait(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        assert self.proc.returncode is not None
        return self.proc.returncode, out.decode(), "".join(self.seen) + err.decode()


async def run_cli(*args: str) -> tuple[int, str]:
    """Run ``python -m pgbus ARGS``; its exit status and its output (stdout and stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgbus",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode()


class OnlyOdd:
    """A router plugin replacing the built-in one: only events with an odd ``n`` are routed."""

    @pgbus.hookimpl
    def pgbus_router(self, channel: str, subscriptions: Any) -> Any:
        def route(delivery: Any) -> Any:
            return subscriptions if delivery.event.n % 2 else ()

        return route
