"""A subscription: a handler, what it listens to, its queue and its worker tasks."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from pgbus._events import Delivery, Event
    from pgbus.default_plugins.retry import Retry
    from pgbus.types import CallNext, Handler, Middleware

logger = logging.getLogger(__name__)

#: Default bound of a subscription's queue of deliveries waiting for its handler.
DEFAULT_MAX_PENDING = 10_000


class Overflow(enum.Enum):
    """What a subscription does with a delivery when its queue (``max_pending``) is full.

    * ``WAIT`` (the default): nothing is lost. The bus's dispatcher waits for room in
      this queue before it dispatches the next notification. Other subscriptions keep
      working through what is already in their own queues; notifications that arrive
      meanwhile wait in the listener's buffer and, beyond it, in PostgreSQL's
      notification queue.
    * ``DROP_OLDEST``: the oldest queued delivery is removed to make room (keeps the
      freshest events, e.g. for a live view).
    * ``DROP_NEWEST``: the new delivery is not queued (keeps the backlog in order).

    Every dropped delivery is reported: the :func:`~pgbus.hookspecs.pgbus_on_dropped`
    hook, a warning in the log (the first drop, then every 1000th), and the metrics'
    ``dropped`` counter. The dispatcher never waits under a drop policy.

    Plain strings work too: ``overflow="drop_oldest"``.

    .. versionadded:: 0.1.0
    """

    WAIT = "wait"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


#: What the timeout of a handler does when it expires.
TimeoutAction = Literal["cancel", "report"]


class Subscription:
    """A handler bound to a channel (untyped) or to event types (typed).

    Created by :meth:`Bus.subscribe` and :meth:`Bus.listen`. Deliveries wait in a
    bounded queue of ``max_pending``; ``concurrency`` worker tasks take them in order.
    With the default ``concurrency=1`` events are handled one at a time in publish order.

    Options that plugins act on are kept here, as given: ``retry`` (the retry plugin),
    ``timeout``, ``on_timeout`` and ``warn_after`` (the timeouts plugin), ``where`` (the
    router). ``overflow`` is applied by the subscription itself.

    :ivar name: unique within the bus (defaults to the handler's qualified name).
    :ivar channels: the channels it listens on.
    :ivar event_types: the models it receives (empty: untyped, gets raw messages).
    :ivar handler: the user's function.
    :ivar concurrency: how many deliveries its handler works on at once.
    :ivar max_pending: the bound of its queue.
    :ivar retry: its :class:`~pgbus.Retry` policy, or ``None`` for the bus's default.
    :ivar timeout: seconds one handler attempt may run, or ``None`` for no limit.
    :ivar on_timeout: ``"cancel"`` (cancel the attempt, which then fails with
        :class:`TimeoutError`) or ``"report"`` (only report it, and let it run).
    :ivar warn_after: seconds after which a still-running attempt is reported as slow,
        or ``None`` for the timeouts plugin's default.
    :ivar where: a predicate on the event (or the :class:`~pgbus.Message`, for untyped
        subscriptions); only deliveries it accepts are routed here.
    :ivar overflow: the :class:`Overflow` policy of its queue.
    :ivar dropped: how many deliveries its overflow policy dropped.
    :ivar durable: the durable name (consumer group) of a durable subscription, fed from
        the journal by the ``durable`` plugin instead of by NOTIFY; ``None`` for a plain one.

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
        retry: Retry | None = None,
        timeout: float | None = None,
        on_timeout: TimeoutAction = "cancel",
        warn_after: float | None = None,
        where: Callable[[Any], bool] | None = None,
        overflow: Overflow | str = Overflow.WAIT,
        durable: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"subscription {name!r}: concurrency must be at least 1")
        if max_pending < 1:
            raise ConfigError(f"subscription {name!r}: max_pending must be at least 1")
        for option, value in (("timeout", timeout), ("warn_after", warn_after)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(
                    f"subscription {name!r}: {option} must be a positive number of"
                    f" seconds or None, not {value!r}"
                )
        if on_timeout not in ("cancel", "report"):
            raise ConfigError(
                f"subscription {name!r}: on_timeout must be 'cancel' or 'report',"
                f" not {on_timeout!r}"
            )
        if where is not None and not callable(where):
            raise ConfigError(f"subscription {name!r}: where must be callable")
        if retry is not None and not hasattr(retry, "delay"):
            raise ConfigError(f"subscription {name!r}: retry must be a pgbus.Retry")
        try:
            policy = Overflow(overflow)
        except ValueError:
            choices = ", ".join(repr(o.value) for o in Overflow)
            raise ConfigError(
                f"subscription {name!r}: overflow must be one of {choices}, not {overflow!r}"
            ) from None
        self.name = name
        self.channels = tuple(dict.fromkeys(channels))
        self.event_types = tuple(event_types)
        self.handler = handler
        self.concurrency = concurrency
        self.max_pending = max_pending
        self.retry = retry
        self.timeout = timeout
        self.on_timeout: TimeoutAction = on_timeout
        self.warn_after = warn_after
        self.where = where
        self.overflow = policy
        self.dropped = 0
        self.durable = durable
        self._queue: asyncio.Queue[Delivery] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._invoke: Callable[[Delivery], Awaitable[None]] | None = None
        self._on_dropped: Callable[[Subscription, Delivery, Overflow], None] | None = None
        self._on_backlog: Callable[[int], None] | None = None
        #: Deliveries waiting behind a full queue (``Overflow.WAIT``), in order.
        self._backlog: deque[Delivery] = deque()
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
        """Deliveries waiting for the handler (in the queue and behind it)."""
        queued = self._queue.qsize() if self._queue is not None else 0
        return queued + len(self._backlog)

    @property
    def running(self) -> int:
        """Deliveries its handler chain is working on right now."""
        return self._active

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
        on_dropped: Callable[[Subscription, Delivery, Overflow], None] | None = None,
        on_backlog: Callable[[int], None] | None = None,
    ) -> None:
        """Compose the handler chain and start the workers (the bus calls this).

        :param middleware: outermost first.
        :param on_done: called after a successful run with its duration (or ``None``).
        :param on_error: awaited after a failed run (after every middleware, retries
            included) with the delivery and the error.
        :param on_dropped: called for each delivery an overflow policy drops.
        :param on_backlog: called with the change in the number of deliveries waiting
            behind the full queue (the bus bounds their total).
        """
        self._on_dropped = on_dropped
        self._on_backlog = on_backlog
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

    def offer(self, delivery: Delivery) -> None:
        """Enqueue without waiting, or apply the overflow policy when the queue is full.

        With :attr:`Overflow.WAIT` the delivery waits, in order, behind the full queue
        of this subscription only; the dispatcher goes on with the others.
        """
        queue = self._queue
        if queue is None:
            return  # stopped: nothing will handle it any more
        if self._backlog:  # keep order: behind what already waits
            self._overflow(queue, delivery)
            return
        try:
            queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self._overflow(queue, delivery)

    def _refill(self, queue: asyncio.Queue[Delivery]) -> None:
        """Move waiting deliveries into the queue while it has room."""
        backlog = self._backlog
        moved = 0
        while backlog and not queue.full():
            queue.put_nowait(backlog.popleft())
            moved += 1
        if moved and self._on_backlog is not None:
            self._on_backlog(-moved)

    def _overflow(self, queue: asyncio.Queue[Delivery], delivery: Delivery) -> None:
        policy = self.overflow
        if policy is Overflow.WAIT:
            self._backlog.append(delivery)
            if self._on_backlog is not None:
                self._on_backlog(1)
            return
        if policy is Overflow.DROP_OLDEST:
            dropped = queue.get_nowait()
            queue.task_done()
            queue.put_nowait(delivery)
        else:
            dropped = delivery
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            logger.warning(
                "subscription %s: queue full (max_pending=%d), %s: %d deliveries dropped so far",
                self.name,
                self.max_pending,
                policy.value,
                self.dropped,
                extra={"channel": delivery.channel},
            )
        if self._on_dropped is not None:
            try:
                self._on_dropped(self, dropped, policy)
            except Exception:
                logger.exception("subscription %s: reporting a dropped delivery failed", self.name)

    async def put(self, delivery: Delivery) -> None:
        """Enqueue, waiting for room (a producer that can wait, such as a durable consumer)."""
        if self._queue is not None:
            await self._queue.put(delivery)

    async def _work(self) -> None:
        queue = self._queue
        invoke = self._invoke
        if queue is None or invoke is None:  # pragma: no cover - start() sets both
            return
        while True:
            delivery = await queue.get()
            if self._backlog:
                self._refill(queue)
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
            if queue.qsize() or self._active or self._backlog:
                await asyncio.wait_for(queue.join(), timeout)
        except TimeoutError:
            left = queue.qsize() + self._active + len(self._backlog)
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
        if self._backlog:  # given up on: no longer counted against the bus's bound
            if self._on_backlog is not None:
                self._on_backlog(-len(self._backlog))
            self._backlog.clear()
        return left


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    # a plain function returning the middleware's awaitable: no extra coroutine per layer
    def step(delivery: Delivery) -> Awaitable[None]:
        return mw(delivery, call_next)

    return step
