"""A subscription: a handler, what it listens to, its queue and its worker tasks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from typing import TYPE_CHECKING

from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from pgbus._events import Delivery, Event
    from pgbus.types import CallNext, Handler, Middleware

logger = logging.getLogger(__name__)

#: Default bound of a subscription's queue of deliveries waiting for its handler.
DEFAULT_MAX_PENDING = 10_000


class Subscription:
    """A handler bound to a channel (untyped) or to event types (typed).

    Created by :meth:`Bus.subscribe` and :meth:`Bus.listen`. Deliveries wait in a
    bounded queue of ``max_pending``; ``concurrency`` worker tasks take them in order.
    With the default ``concurrency=1`` events are handled one at a time in publish order.

    :ivar name: unique within the bus (defaults to the handler's qualified name).
    :ivar channels: the channels it listens on.
    :ivar event_types: the models it receives (empty: untyped, gets raw messages).
    :ivar handler: the user's function.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        name: str,
        channels: Sequence[str],
        event_types: Sequence[type[Event]],
        handler: Handler,
        concurrency: int = 1,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"subscription {name!r}: concurrency must be at least 1")
        if max_pending < 1:
            raise ConfigError(f"subscription {name!r}: max_pending must be at least 1")
        self.name = name
        self.channels = tuple(dict.fromkeys(channels))
        self.event_types = tuple(event_types)
        self.handler = handler
        self.concurrency = concurrency
        self.max_pending = max_pending
        self._queue: asyncio.Queue[Delivery] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._invoke: Callable[[Delivery], Awaitable[None]] | None = None
        self._active = 0

    def __repr__(self) -> str:
        what = ", ".join(t.__name__ for t in self.event_types) or "untyped"
        return f"<Subscription {self.name!r} on {', '.join(self.channels)} ({what})>"

    @property
    def typed(self) -> bool:
        """Whether the handler receives decoded events (else raw messages)."""
        return bool(self.event_types)

    @property
    def pending(self) -> int:
        """Deliveries waiting in the queue."""
        return self._queue.qsize() if self._queue is not None else 0

    def handler_call(self) -> CallNext:
        """The innermost step of the chain: call the user's handler with the event."""
        handler = self.handler
        typed = self.typed
        if inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        ):

            async def call_async(delivery: Delivery) -> None:
                await handler(delivery.event if typed else delivery.message)  # type: ignore[misc]

            return call_async

        async def call_in_thread(delivery: Delivery) -> None:
            result = await asyncio.to_thread(handler, delivery.event if typed else delivery.message)
            if inspect.isawaitable(result):
                await result

        return call_in_thread

    def start(
        self,
        middleware: Sequence[Middleware],
        on_done: Callable[[Subscription, Delivery, float], None] | None,
        on_error: Callable[[Subscription, Delivery, BaseException], Awaitable[None]],
    ) -> None:
        """Compose the handler chain and start the workers (the bus calls this)."""
        chain = self.handler_call()
        for mw in reversed(middleware):
            chain = _bind(mw, chain)
        clock = time.perf_counter

        async def invoke(delivery: Delivery) -> None:
            self._active += 1
            started = clock()
            try:
                await chain(delivery)
            except Exception as exc:
                await on_error(self, delivery, exc)
            else:
                if on_done is not None:
                    on_done(self, delivery, clock() - started)
            finally:
                self._active -= 1

        self._invoke = invoke
        self._queue = asyncio.Queue(self.max_pending)
        self._workers = [
            asyncio.create_task(self._work(), name=f"pgbus-handler-{self.name}-{i}")
            for i in range(self.concurrency)
        ]

    def offer(self, delivery: Delivery) -> bool:
        """Enqueue without waiting; ``False`` when the queue is full."""
        queue = self._queue
        if queue is None:
            return True  # stopped: nothing will handle it any more
        try:
            queue.put_nowait(delivery)
        except asyncio.QueueFull:
            return False
        return True

    async def put(self, delivery: Delivery) -> None:
        """Enqueue, waiting for room (back-pressure on this subscription only)."""
        if self._queue is not None:
            await self._queue.put(delivery)

    async def _work(self) -> None:
        queue = self._queue
        invoke = self._invoke
        if queue is None or invoke is None:  # pragma: no cover - start() sets both
            return
        while True:
            delivery = await queue.get()
            try:
                await invoke(delivery)
            finally:
                queue.task_done()

    async def stop(self, timeout: float) -> int:  # noqa: ASYNC109 - a drain deadline, not a cancel scope
        """Wait up to ``timeout`` s for queued deliveries, then cancel the workers.

        :returns: how many deliveries were still queued or running when it gave up.
        """
        queue = self._queue
        if queue is None:
            return 0
        left = 0
        try:
            await asyncio.wait_for(queue.join(), timeout)
        except TimeoutError:
            left = queue.qsize() + self._active
            logger.warning(
                "subscription %s: %d deliveries not handled within %.1f s of stop()",
                self.name,
                left,
                timeout,
            )
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        self._queue = None
        return left


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    async def step(delivery: Delivery) -> None:
        await mw(delivery, call_next)

    return step
