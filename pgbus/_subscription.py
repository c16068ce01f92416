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
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

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

    * ``WAIT`` (the default): nothing is lost. Deliveries wait, in order, behind the
      full queue of this subscription; other subscriptions are not held up. When too
      many deliveries wait in the process (5,000, all subscriptions together) the
      listener stops reading its socket and PostgreSQL keeps the rest in its
      notification queue until the handlers catch up.
    * ``DROP_OLDEST``: the oldest queued delivery is removed to make room (keeps the
      freshest events, e.g. for a live view).
    * ``DROP_NEWEST``: the new delivery is not queued (keeps the backlog in order).

    Every dropped delivery is reported: the :func:`~pgbus.hookspecs.pgbus_on_dropped`
    hook, a warning in the log (the first drop, then every 1000th), and the metrics'
    ``dropped`` counter.

    Plain strings work too: ``overflow="drop_oldest"``.

    .. versionadded:: 0.1.0
    """

    WAIT = "wait"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


#: What a subscription awaits after a failed run: ``(subscription, delivery, error)``.
OnError: TypeAlias = "Callable[[Subscription, Delivery, BaseException], Awaitable[None]]"

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
        #: Deliveries waiting for a worker, in order; beyond ``max_pending`` (only with
        #: ``Overflow.WAIT``) they are the backlog the bus counts against its bound.
        self._pending: deque[Delivery] = deque()
        self._started = False
        self._workers: list[asyncio.Task[None]] = []
        self._chain: CallNext | None = None
        self._on_done: Callable[[Subscription, Delivery, float], None] | None = None
        self._on_error: OnError | None = None
        self._on_dropped: Callable[[Subscription, Delivery, Overflow], None] | None = None
        self._on_backlog: Callable[[int], None] | None = None
        self._active = 0
        #: Workers waiting for a delivery, producers (:meth:`put`) waiting for room, and
        #: :meth:`stop` waiting for the queue to empty: futures, woken one at a time.
        self._idle: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._drained: asyncio.Future[None] | None = None

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
        return len(self._pending)

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
        on_error: OnError,
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
        self._chain = chain
        self._on_done = on_done
        self._on_error = on_error
        self._started = True
        self._workers = [
            asyncio.create_task(self._work(), name=f"pgbus-handler-{self.name}-{i}")
            for i in range(self.concurrency)
        ]

    def offer(self, delivery: Delivery) -> None:
        """Enqueue without waiting, or apply the overflow policy when the queue is full.

        With :attr:`Overflow.WAIT` the delivery waits, in order, behind the full queue
        of this subscription only; the dispatcher goes on with the others.
        """
        if not self._started:
            return  # stopped: nothing will handle it any more
        pending = self._pending
        if len(pending) >= self.max_pending:
            self._overflow(pending, delivery)
        else:
            pending.append(delivery)
        if self._idle:
            _wake(self._idle)

    def _overflow(self, pending: deque[Delivery], delivery: Delivery) -> None:
        policy = self.overflow
        if policy is Overflow.WAIT:
            pending.append(delivery)
            if self._on_backlog is not None:
                self._on_backlog(1)
            return
        if policy is Overflow.DROP_OLDEST:
            dropped = pending.popleft()
            pending.append(delivery)
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
        while self._started and len(self._pending) >= self.max_pending:
            await _wait(self._putters)
        if self._started:
            self._pending.append(delivery)
            if self._idle:
                _wake(self._idle)

    async def _work(self) -> None:
        pending = self._pending
        chain, on_done, on_error = self._chain, self._on_done, self._on_error
        if chain is None or on_error is None:  # pragma: no cover - start() sets both
            return
        clock = time.perf_counter
        while True:
            if not pending:
                await _wait(self._idle)
                continue
            delivery = pending.popleft()
            if len(pending) >= self.max_pending or self._putters:
                self._made_room()
            self._active += 1
            started = clock() if on_done is not None else 0.0
            try:
                await chain(delivery)
            except Exception as exc:
                await on_error(self, delivery, exc)
            else:
                if on_done is not None:
                    on_done(self, delivery, clock() - started)
            finally:
                self._active -= 1
            if self._drained is not None:
                self._check_drained()

    def _made_room(self) -> None:
        """A worker took a delivery: one moves up from the backlog, or a producer may go on."""
        if len(self._pending) >= self.max_pending:
            if self._on_backlog is not None:
                self._on_backlog(-1)
        elif self._putters:
            _wake(self._putters)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._pending and not self._active:
            _wake_future(self._drained)

    async def stop(self, timeout: float) -> int:  # noqa: ASYNC109 - a drain deadline, not a cancel scope
        """Wait up to ``timeout`` s for queued deliveries, then cancel the workers.

        :returns: how many deliveries were still queued or running when it gave up.
        """
        if not self._started:
            return 0
        pending = self._pending
        left = 0
        if pending or self._active:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except TimeoutError:
                left = len(pending) + self._active
                logger.warning(
                    "subscription %s: %d deliveries not handled within %.1f s of stop()",
                    self.name,
                    left,
                    timeout,
                )
            self._drained = None
        self._started = False
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        self._workers = []
        behind = len(pending) - self.max_pending
        if behind > 0 and self._on_backlog is not None:  # no longer counted by the bus
            self._on_backlog(-behind)
        pending.clear()
        while self._putters:
            _wake(self._putters)
        return left


async def _wait(waiters: deque[asyncio.Future[None]]) -> None:
    """Wait in line in ``waiters`` until :func:`_wake` takes this waiter."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        with contextlib.suppress(ValueError):  # already taken by _wake
            waiters.remove(waiter)
        raise


def _wake(waiters: deque[asyncio.Future[None]]) -> None:
    """Wake the first waiter of ``waiters`` that is still waiting."""
    while waiters:
        if _wake_future(waiters.popleft()):
            return


def _wake_future(waiter: asyncio.Future[None]) -> bool:
    if waiter.done():
        return False
    waiter.set_result(None)
    return True


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    # a plain function returning the middleware's awaitable: no extra coroutine per layer
    def step(delivery: Delivery) -> Awaitable[None]:
        return mw(delivery, call_next)

    return step
