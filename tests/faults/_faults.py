"""Helpers of the fault-injection suite: a steady publisher, receivers, and the checks."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Self

from _helpers import Watch

import pgbus

if TYPE_CHECKING:
    from collections.abc import Iterable


class Receiver:
    """A bus with one untyped subscription that records integer payloads."""

    def __init__(self, dsn: str, channel: str, **options: Any) -> None:
        self.watch = Watch()
        options.setdefault("load_entrypoints", False)
        options["plugins"] = [self.watch, *options.get("plugins", ())]
        self.bus = pgbus.Bus(dsn, **options)
        self.received: list[int] = []
        self.markers: asyncio.Queue[str] = asyncio.Queue()
        self.bus.subscribe(channel, name="record")(self._record)

    async def _record(self, message: pgbus.Message) -> None:
        if message.payload.isdigit():
            self.received.append(int(message.payload))
        else:
            self.markers.put_nowait(message.payload)

    async def marker(self, text: str, timeout: float = 10.0) -> None:
        """Wait until the marker ``text`` arrives (earlier markers are skipped)."""
        async with asyncio.timeout(timeout):
            while await self.markers.get() != text:
                pass


class Stream:
    """Publishes 0, 1, 2, … on ``channel`` every ``interval`` s through its own bus.

    Records which numbers were published without error, and when each publish began.
    A publish that fails (the database is down) is recorded as failed; it may still have
    been committed (the connection broke after the commit, before the answer), so a
    receiver may get it. The publisher does not retry (``retries=0``) unless asked: a
    retried publish whose first attempt did commit is a publisher-side duplicate, and
    these tests check what the listener side promises.
    """

    def __init__(self, dsn: str, channel: str, interval: float = 0.005, retries: int = 0) -> None:
        self.bus = pgbus.Bus(
            dsn,
            load_entrypoints=False,
            publish_timeout=2.0,
            publish_retries=retries,
            connect_timeout=1.0,
        )
        self.channel = channel
        self.interval = interval
        self.started_at: dict[int, float] = {}
        self.published: set[int] = set()
        self.failed_seqs: set[int] = set()
        self.failed = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._progress = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        await self.bus.stop()

    async def _run(self) -> None:
        seq = 0
        while not self._stop.is_set():
            self.started_at[seq] = time.monotonic()
            try:
                await self.bus.notify(self.channel, str(seq))
            except pgbus.PublishError:
                self.failed += 1
                self.failed_seqs.add(seq)
                self._progress.set()
            else:
                self.published.add(seq)
                self._progress.set()
            seq += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def published_at_least(self, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` numbers were published."""
        async with asyncio.timeout(timeout):
            while len(self.published) < n:
                self._progress.clear()
                await self._progress.wait()

    async def published_after(self, since: float, n: int, timeout: float = 10.0) -> None:
        """Wait until ``n`` numbers whose publish began after ``since`` were published."""
        async with asyncio.timeout(timeout):
            while sum(1 for s in self.published if self.started_at[s] > since) < n:
                self._progress.clear()
                await self._progress.wait()

    async def wait_failures(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` publishes have failed."""
        async with asyncio.timeout(timeout):
            while self.failed < n:
                self._progress.clear()
                await self._progress.wait()

    async def end(self, receivers: Iterable[Receiver], marker: str = "end") -> None:
        """Stop publishing, then send ``marker`` and wait until every receiver has it."""
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 10)
        await self.bus.notify(self.channel, marker)
        await asyncio.gather(*(r.marker(marker) for r in receivers))


def check_delivery(stream: Stream, receiver: Receiver) -> dict[str, int]:
    """Assert plain NOTIFY's promises for one receiver; return the counts.

    * nothing is duplicated, and nothing arrives that was not published;
    * everything published after the last LISTEN re-establishment arrived.
    """
    received = receiver.received
    assert len(received) == len(set(received)), "duplicates"
    assert set(received) <= stream.published | stream.failed_seqs, "never published"
    relisten = receiver.watch.connected_at[-1]
    after = {s for s in stream.published if stream.started_at[s] > relisten}
    missing = after - set(received)
    assert not missing, f"lost {len(missing)} events published after the re-LISTEN"
    return {
        "published": len(stream.published),
        "received": len(received),
        "lost": len(stream.published - set(received)),
        "after_relisten": len(after),
    }
