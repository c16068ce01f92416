"""A subscription: a handler, what it listens to, its queue and its worker tasks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import inspect
import logging
import math
import operator
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from itertools import islice, repeat
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, cast

from pgbus._context import context_parameter, is_async, with_context
from pgbus._events import Batch
from pgbus._util import plural
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from pgbus._events import Delivery, Event, Message

logger = logging.getLogger(__name__)

#: The rest of the handler chain, as a middleware sees it; awaiting it gives what the
#: handler returned (``None`` when a middleware in between does not pass it on).
CallNext: TypeAlias = Callable[["Delivery"], Awaitable[Any]]
#: ``async def middleware(delivery, call_next) -> None``.
Middleware: TypeAlias = Callable[["Delivery", CallNext], Awaitable[Any]]
#: A handler: ``async def`` or plain ``def`` (run in a worker thread), given the event
#: (typed subscriptions) or the :class:`~pgbus.Message` (untyped ones), a list of them
#: (batch handlers), and a :class:`~pgbus.Context` if it has a parameter for one; its
#: signature is checked by ``subscribe()``.
Handler: TypeAlias = Callable[..., Awaitable[Any] | Any]
#: Picks the subscriptions a delivery goes to.
Router: TypeAlias = Callable[["Delivery"], Sequence["Subscription"]]

#: Default bound of a subscription's queue of deliveries waiting for its handler.
DEFAULT_MAX_PENDING = 10_000

#: Seconds a batch handler's worker waits for a batch to fill, by default.
DEFAULT_BATCH_WAIT = 0.05

#: Seconds at most that :meth:`Subscription.stop` leaves cancelled handlers to end.
CANCEL_GRACE = 1.0


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


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """A retry policy: how many attempts, how long between them, for which errors.

    The delay after failed attempt ``n`` is ``backoff * factor ** (n - 1)``, capped at
    ``max_delay``; with ``jitter`` it is drawn uniformly from ``[delay / 2, delay]`` so
    that many failing handlers do not retry in lockstep. ``backoff`` may instead be a
    function ``(attempt) -> seconds``, which is then used as is::

        @bus.subscribe(OrderPlaced, retry=pgbus.Retry(attempts=5, backoff=0.5, on=(TimeoutError,)))
        async def charge(event: OrderPlaced) -> None: ...

    ``Retry(attempts=1)`` turns retrying off for one subscription. The built-in ``retry``
    plugin applies it.

    :param attempts: how many times the handler is called at most (the first call
        included); at least 1.
    :param backoff: the first delay in seconds, or a function of the failed attempt's
        number returning the delay.
    :param factor: how much each delay grows over the previous one.
    :param max_delay: the largest delay, in seconds.
    :param jitter: randomise each delay within its upper half.
    :param on: the exception types to retry; others fail at once.
    :raises ConfigError: for a policy that cannot work.

    .. versionadded:: 0.1.0
    """

    attempts: int = 3
    backoff: float | Callable[[int], float] = 0.1
    factor: float = 2.0
    max_delay: float = 30.0
    jitter: bool = True
    on: tuple[type[Exception], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"Retry: attempts must be at least 1, not {self.attempts!r}")
        if not callable(self.backoff) and self.backoff < 0:
            raise ConfigError(f"Retry: backoff must not be negative, not {self.backoff!r}")
        if self.factor < 1:
            raise ConfigError(f"Retry: factor must be at least 1, not {self.factor!r}")
        if self.max_delay < 0:
            raise ConfigError(f"Retry: max_delay must not be negative, not {self.max_delay!r}")
        on = self.on if isinstance(self.on, tuple) else tuple(self.on)
        if not on or not all(isinstance(t, type) and issubclass(t, Exception) for t in on):
            raise ConfigError(
                "Retry: on= takes Exception subclasses (a cancelled handler is never retried)"
            )
        object.__setattr__(self, "on", on)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1, 2, …).

        :param attempt: the number of the attempt that failed.
        :returns: the delay before the next attempt.
        """
        if callable(self.backoff):
            return max(0.0, float(self.backoff(attempt)))
        ceiling = min(self.max_delay, self.backoff * self.factor ** min(attempt - 1, 64))
        if self.jitter and ceiling > 0:
            return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not cryptography
        return ceiling


#: The policy of subscriptions that set none, on a bus that sets none: 3 attempts,
#: 0.1 s then 0.2 s apart (jittered), for any :class:`Exception`.
DEFAULT_RETRY = Retry()


class SubscriptionHost(Protocol):
    """What a subscription reports to (the bus's dispatcher).

    .. versionadded:: 0.2.0
    """

    #: Whether :meth:`handled` is wanted (a plugin observes successes); when not, the
    #: subscription does not time its handler.
    wants_handled: bool

    def handled(self, subscription: Subscription, delivery: Delivery, duration: float) -> None:
        """A handler run succeeded; ``duration`` is the chain's time in seconds."""

    async def failed(
        self, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> None:
        """A handler run failed for good (after every middleware, retries included)."""

    def dropped(self, subscription: Subscription, delivery: Delivery, policy: Overflow) -> None:
        """The overflow policy dropped ``delivery``."""

    def backlog_changed(self, delta: int) -> None:
        """The deliveries waiting behind the full queue grew or shrank by ``delta``."""


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
    :ivar key: the key function of a key-ordered subscription (equal keys one at a time,
        in order), or ``None``.
    :ivar batch: the largest batch of a batch handler, or ``None`` for one event a call.
    :ivar batch_wait: seconds a batch waits to fill.
    :ivar start_position: where a durable subscription new to the database starts: ``"latest"``,
        ``"earliest"`` or an aware datetime.
    :ivar deferrer: set by a plugin that persists retries (the durable consumer):
        :meth:`defer` calls it with the delivery and the delay, and when it returns
        ``True`` the plugin brings the delivery back itself (nothing waits in memory).
    :ivar deferred: how many retries that plugin holds (it updates this count).

    .. versionadded:: 0.1.0
    .. versionchanged:: 0.3.0 ``key``, ``batch`` and ``batch_wait``; :meth:`defer`;
       ``deferrer`` and ``deferred``.
    """

    deferrer: Callable[[Delivery, float], bool] | None = None
    #: Retries waiting in the plugin that took them over (:attr:`deferrer`), as that
    #: plugin last counted them (the durable consumer: its group's retry rows).
    deferred: int = 0
    _drained: asyncio.Future[None] | None
    _fillers: list[tuple[asyncio.Future[None], int]]

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
        start: str | dt.datetime | None = None,
        key: Callable[[Any], Hashable] | None = None,
        batch: int | None = None,
        batch_wait: float | None = None,
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
        _check_key_and_batch(name, key, batch, batch_wait)
        if retry is not None and not isinstance(retry, Retry):
            raise ConfigError(f"subscription {name!r}: retry must be a pgbus.Retry")
        try:
            policy = Overflow(overflow)
        except ValueError:
            choices = ", ".join(repr(o.value) for o in Overflow)
            raise ConfigError(
                f"subscription {name!r}: overflow must be one of {choices}, not {overflow!r}"
            ) from None
        #: Where the handler takes its Context (checked now: a parameter pgbus cannot
        #: fill is a ConfigError at subscribe time, not a failure of every delivery).
        self._context = context_parameter(handler, name, batch=batch is not None)
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
        self.durable, self.start_position = durable, _start(name, start, durable)
        self.key = key
        self.batch, self.batch_wait = batch, batch_wait or DEFAULT_BATCH_WAIT
        #: Key order: of single deliveries, or of a batch handler's batches.
        self._keys, self._batch_keys = _key_orders(key, batch, _EVENT if event_types else _MESSAGE)
        #: Deliveries waiting for a worker, in order; beyond ``max_pending`` (only with
        #: ``Overflow.WAIT``) they are the backlog the bus counts against its bound.
        self._pending: deque[Delivery] = deque()
        self._started = False
        self._workers: list[asyncio.Task[None]] = []
        self._chain: CallNext | None = None
        self._host: SubscriptionHost | None = None
        self._active = 0
        #: What each worker is handling (``None``: waiting), to name what stop() abandons.
        self._current: list[Delivery | None] = []
        #: Handlers abandoned by stop() because they did not end when cancelled.
        self.abandoned = 0
        self._stuck: list[asyncio.Task[None]] = []
        #: Workers waiting for a delivery, producers (:meth:`put`) waiting for room, and
        #: :meth:`stop` waiting for the queue to empty: futures, woken one at a time.
        self._idle: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        #: ... and batch collectors waiting for their batch to fill (waiter, how many),
        #: the fewest queued deliveries that fill one's (what :meth:`offer` compares).
        self._drained, self._fillers, self._fill_at = None, [], _NO_FILLER
        #: Deliveries waiting out a delay before their next attempt (:meth:`defer`), and
        #: the ids of those whose handler chain is returning after deferring them.
        self._delayed: set[asyncio.TimerHandle] = set()
        self._deferring: set[int] = set()

    def __repr__(self) -> str:
        what = ", ".join(t.__name__ for t in self.event_types) or "untyped"
        return f"<Subscription {self.name!r} on {', '.join(self.channels)} ({what})>"

    @property
    def typed(self) -> bool:
        """Whether the handler receives decoded events (else raw messages)."""
        return bool(self.event_types)

    @property
    def pending(self) -> int:
        """Deliveries waiting for the handler (in the queue, behind it, and behind their key)."""
        return len(self._pending) + (self._keys.parked if self._keys is not None else 0)

    @property
    def running(self) -> int:
        """Deliveries its handler chain is working on right now."""
        return self._active

    @property
    def delayed(self) -> int:
        """Deliveries waiting out a delay before their next attempt (see :meth:`defer`).

        Those waiting in memory, plus the :attr:`deferred` ones a plugin persisted.
        """
        return len(self._delayed) + self.deferred

    def defer(self, delivery: Delivery, delay: float) -> None:
        """Queue ``delivery`` again after ``delay`` seconds, as its next attempt.

        For a middleware (the retry plugin on :class:`~pgbus.Nack`) that returns right
        after: the worker goes on with the deliveries behind it, and the return is not
        reported as handled. The delivery comes back with ``attempt`` increased and
        ``redelivered`` set, through the queue (its overflow policy applies). One still
        waiting when the subscription stops is dropped, and counted by :meth:`stop`,
        unless the subscription's :attr:`deferrer` took it over (durable: persisted).

        :param delivery: the delivery being handled.
        :param delay: seconds to wait, at least 0.

        .. versionadded:: 0.3.0
        """
        self._deferring.add(id(delivery))
        if not self._started or (self.deferrer is not None and self.deferrer(delivery, delay)):
            return
        again = dataclasses.replace(delivery, attempt=delivery.attempt + 1, redelivered=True)

        def due() -> None:
            self._delayed.discard(handle)
            self.offer(again)

        handle = asyncio.get_running_loop().call_later(delay, due)
        self._delayed.add(handle)

    def handler_call(self) -> CallNext:
        """The innermost step of the chain: call the user's handler with the event.

        Its shape was read when the subscription was made: a handler that takes a
        :class:`~pgbus.Context` gets one built per call, others pay nothing for it.
        """
        argument: Callable[[Delivery], Any]
        if self.batch is not None:
            argument = _EVENTS if self.typed else _MESSAGES
        else:
            argument = _EVENT if self.typed else _MESSAGE
        if self._context is None:
            return _call(self.handler, argument)
        return _call(with_context(self.handler, self._context, self.name, argument), _itself)

    def start(self, middleware: Sequence[Middleware], host: SubscriptionHost) -> None:
        """Compose the handler chain and start the workers (the bus's dispatcher calls this).

        :param middleware: outermost first.
        :param host: what successes, failures, drops and the backlog are reported to.
        """
        chain = self.handler_call()
        for mw in reversed(middleware):
            chain = _bind(mw, chain)
        self._chain = chain
        self._host = host
        self._started = True
        self._current = [None] * self.concurrency
        self._workers = [
            asyncio.create_task(self._work(i), name=f"pgbus-handler-{self.name}-{i}")
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
        if self._fillers and (len(pending) >= self._fill_at or isinstance(delivery, Batch)):
            self._filled()  # a collector's batch is full, or ends at a batch queued again

    def offer_many(self, deliveries: list[Delivery]) -> None:
        """:meth:`offer` each of ``deliveries``, in order; at once when the queue has room.

        .. versionadded:: 0.4.0
        """
        pending = self._pending
        if (
            not self._started
            or len(pending) + len(deliveries) > self.max_pending
            or any(map(isinstance, deliveries, repeat(Batch)))
        ):
            for delivery in deliveries:
                self.offer(delivery)
            return
        pending.extend(deliveries)
        idle = self._idle
        for _ in range(len(deliveries)):  # a worker for each, as offer() wakes them
            if not idle:
                break
            _wake(idle)
        if len(pending) >= self._fill_at:
            self._filled()

    def _overflow(self, pending: deque[Delivery], delivery: Delivery) -> None:
        policy = self.overflow
        if policy is Overflow.WAIT:
            pending.append(delivery)
            if self._host is not None:
                self._host.backlog_changed(1)
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
        if self._host is not None:
            self._host.dropped(self, dropped, policy)

    async def put(self, delivery: Delivery) -> None:
        """Enqueue, waiting for room (a producer that can wait, such as a durable consumer)."""
        while self._started and len(self._pending) >= self.max_pending:
            await _wait(self._putters)
        pending = self._pending
        if self._started:
            pending.append(delivery)
            if self._idle:
                _wake(self._idle)
            if self._fillers and (len(pending) >= self._fill_at or isinstance(delivery, Batch)):
                self._filled()

    async def _work(self, index: int) -> None:  # noqa: C901, PLR0912 - the hot loop, inlined on purpose
        pending = self._pending
        chain, host = self._chain, self._host
        if chain is None or host is None:  # pragma: no cover - start() sets both
            return
        handled = host.handled if host.wants_handled else None
        deferring = self._deferring
        current = self._current
        clock = time.perf_counter
        keys, batch_keys = self._keys, self._batch_keys
        collect = self._collect if self.batch is not None else None
        while True:
            if not pending or (keys is not None and keys.parked >= self.max_pending):
                await _wait(self._idle)
                continue
            after: _Place | None = None
            delivery: Delivery | None
            if batch_keys is not None:  # taken in order, under the batches' lock
                delivery, after = await self._ordered_batch(batch_keys)
            else:
                delivery = pending.popleft()
                if len(pending) >= self.max_pending or self._putters:
                    self._made_room()
                if keys is not None:
                    delivery = await self._claim(keys, delivery)
                elif collect is not None:
                    delivery = await collect(delivery)
            while delivery is not None:  # with a key: then its key's next, in order
                self._active += 1
                current[index] = delivery
                started = clock() if handled is not None else 0.0
                try:
                    await chain(delivery)
                except BaseException as exc:  # whatever a handler raises is its failure ...
                    if is_own_cancellation(exc):  # ... but stop() cancelling this worker
                        raise
                    await host.failed(self, delivery, exc)
                else:
                    if handled is not None and id(delivery) not in deferring:
                        handled(self, delivery, clock() - started)
                finally:
                    self._active -= 1
                    current[index] = None
                    if deferring:
                        deferring.discard(id(delivery))
                delivery = None if keys is None else keys.release(delivery, self._idle)
            if after is not None:
                batch_keys.leave(after)  # type: ignore[union-attr]  # set with after
            if self._drained is not None:
                self._check_drained()

    async def _collect(self, first: Delivery) -> Batch:
        """A batch: ``first`` and what is queued or arrives within ``batch_wait``.

        A batch queued again (a :class:`~pgbus.Nack`) comes back as it was.
        """
        if isinstance(first, Batch):
            return first
        pending, size = self._pending, self.batch or 1
        deliveries = [first]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait
        while len(deliveries) < size:
            if not pending:
                left = deadline - loop.time()
                if left <= 0:
                    break
                await self._fill(size - len(deliveries), left)
                continue
            take = min(size - len(deliveries), len(pending))
            if (
                len(pending) < self.max_pending  # none behind the full queue, ...
                and not self._putters  # ... no producer waiting for room, ...
                and not any(map(isinstance, islice(pending, take), repeat(Batch)))  # ... no batch
            ):
                pop = pending.popleft
                deliveries += [pop() for _ in range(take)]  # in one go
                continue
            if isinstance(pending[0], Batch):
                break  # a nacked batch is handled as it was, not inside this one
            deliveries.append(pending.popleft())
            if len(pending) >= self.max_pending or self._putters:
                self._made_room()
        return Batch.of(deliveries)

    async def _fill(self, need: int, left: float) -> None:
        """Wait until ``need`` deliveries are queued, or ``left`` seconds passed.

        One wake-up per batch, not one per dispatcher round: :meth:`offer` and
        :meth:`put` wake the collector only once the batch can be filled (or a batch
        queued again waits at its head), and one timer ends the wait.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        filler = (waiter, need)
        fillers = self._fillers
        fillers.append(filler)
        self._fill_at = min(self._fill_at, need)
        timer = loop.call_later(left, _wake_future, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            fillers.remove(filler)
            self._fill_at = min((n for _, n in fillers), default=_NO_FILLER)

    def _filled(self) -> None:
        """Wake the batch collectors whose batch the queue can now fill."""
        pending = self._pending
        for waiter, need in self._fillers:
            if len(pending) >= need or isinstance(pending[-1], Batch):
                _wake_future(waiter)

    async def _ordered_batch(self, order: _BatchKeys) -> tuple[Batch | None, _Place | None]:
        """A key-ordered batch, once every earlier batch sharing one of its keys is done.

        Batches are collected one at a time (so they hold events in queue order) and take
        their place behind each of their keys at once; the wait for the batches ahead
        happens outside, so a batch of other keys is collected and runs meanwhile. An
        event whose key function raises is a dead letter; the rest of its batch goes on.

        :returns: the batch (``None`` when nothing of it is left) and what to pass to
            :meth:`_BatchKeys.leave` once it is handled.
        """
        pending = self._pending
        async with order.collecting:
            if not pending:  # taken by the batch collected while this worker waited
                return None, None
            first = pending.popleft()
            if len(pending) >= self.max_pending or self._putters:
                self._made_room()
            batch = await self._collect(first)
            keys: list[Hashable] = []
            kept: list[Delivery] = []
            for delivery in batch.deliveries:
                try:
                    key = order.key(order.argument(delivery))
                    hash(key)
                except Exception as exc:  # the key function raised: a dead letter, never stuck
                    await self._key_failed(delivery, exc)
                    continue
                keys.append(key)
                kept.append(delivery)
            if not kept:
                return None, None
            if len(kept) < len(batch.deliveries):
                batch = Batch.of(kept)
            ahead, place = order.enter(keys)
        if ahead:
            self._active += 1  # in hand: stop() waits for it as for a running batch
            try:
                await asyncio.gather(*ahead)
            finally:
                self._active -= 1
        return batch, place

    async def _key_failed(self, delivery: Delivery, exc: Exception) -> None:
        logger.warning(
            "subscription %s: its key function failed on %s: %r",
            self.name,
            f"event {delivery.id}" if delivery.id else "a delivery",
            exc,
            extra={"channel": delivery.channel},
        )
        await self._host.failed(self, delivery, exc)  # type: ignore[union-attr]  # started

    async def _claim(self, keys: _KeyOrder, delivery: Delivery) -> Delivery | None:
        """``delivery`` if its key is free (now taken), else ``None``: parked, or dead."""
        try:
            return delivery if keys.claim(delivery) else None
        except Exception as exc:  # the key function raised: a dead letter, never stuck
            await self._key_failed(delivery, exc)
            return None

    def _made_room(self) -> None:
        """A worker took a delivery: one moves up from the backlog, or a producer may go on."""
        if len(self._pending) >= self.max_pending:
            if self._host is not None:
                self._host.backlog_changed(-1)
        elif self._putters:
            _wake(self._putters)

    def _check_drained(self) -> None:
        if self._drained is not None and not self._pending and not self._active:
            _wake_future(self._drained)

    async def stop(self, timeout: float) -> int:  # noqa: ASYNC109 - a drain deadline, not a cancel scope
        """Wait up to ``timeout`` s for queued deliveries, then cancel the workers.

        The last part of ``timeout`` (a tenth, at most :data:`CANCEL_GRACE`) is left for
        cancelled handlers to end. A handler that does not end when cancelled (it
        swallows the cancellation) is abandoned: logged at error level with what it was
        handling, counted in :attr:`abandoned`, and stop() returns by its deadline all
        the same.

        :returns: how many deliveries were still queued or running when it gave up.
        """
        if not self._started:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        grace = min(CANCEL_GRACE, timeout / 10)
        pending = self._pending
        left = 0
        if pending or self._active:
            self._drained = loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), max(0.0, timeout - grace))
            except TimeoutError:
                left = self.pending + self._active
                logger.warning(
                    "subscription %s: %s not handled within %.1f s of stop(); dropped",
                    self.name,
                    plural(left, "delivery", "deliveries"),
                    timeout,
                )
            self._drained = None
        self._started = False
        left += self._drop_delayed()
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        # at least one turn of the loop, for the workers to take their cancellation
        _, stuck = await asyncio.wait(workers, timeout=max(deadline - loop.time(), 0.01))
        for worker in stuck:
            delivery = self._current[workers.index(worker)]
            self.abandoned += 1
            self._stuck.append(worker)  # keep a reference: it is still running
            logger.error(
                "subscription %s: its handler did not end when cancelled (does it swallow"
                " asyncio.CancelledError?); abandoned while handling %s on %s",
                self.name,
                f"event {delivery.id}" if delivery is not None and delivery.id else "a delivery",
                delivery.channel if delivery is not None else "?",
            )
        self._forget_queued()
        return left

    def _drop_delayed(self) -> int:
        """Cancel the delayed retries (stop): how many there were, logged."""
        delayed, self._delayed = self._delayed, set()
        for timer in delayed:
            timer.cancel()
        if delayed:
            logger.warning(
                "subscription %s: %s waiting for a delayed retry at stop(); dropped",
                self.name,
                plural(len(delayed), "delivery", "deliveries"),
            )
        return len(delayed)

    def _forget_queued(self) -> None:
        """Drop what is still queued (stop), and let waiting producers go."""
        behind = len(self._pending) - self.max_pending
        if behind > 0 and self._host is not None:  # no longer counted by the bus
            self._host.backlog_changed(-behind)
        self._pending.clear()
        if self._keys is not None:
            self._keys.clear()
        if self._batch_keys is not None:
            self._batch_keys.last.clear()
        while self._putters:
            _wake(self._putters)


def is_own_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is the cancellation of the current task (e.g. by ``stop()``).

    A handler that raises :class:`asyncio.CancelledError` by itself (an inner task it
    awaited was cancelled) has failed; only a cancellation requested for the task that
    runs it is one to let through.

    .. versionadded:: 0.2.0
    """
    if not isinstance(error, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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


class _KeyOrder:
    """The keys being handled, and the deliveries parked behind each, in order."""

    __slots__ = ("argument", "held", "key", "parked", "taken")

    def __init__(self, key: Callable[[Any], Hashable], argument: Callable[[Delivery], Any]) -> None:
        self.key = key
        self.argument = argument
        #: Each key being handled: the deliveries of that key waiting behind it.
        self.held: dict[Hashable, deque[Delivery]] = {}
        #: The key of each delivery being handled, by ``id()``.
        self.taken: dict[int, Hashable] = {}
        self.parked = 0

    def claim(self, delivery: Delivery) -> bool:
        """Take ``delivery``'s key (``True``), or park it behind that key (``False``).

        :raises Exception: what the key function raised, or ``TypeError`` for a key
            that is not hashable.
        """
        key = self.key(self.argument(delivery))
        behind = self.held.get(key)
        if behind is not None:
            behind.append(delivery)
            self.parked += 1
            return False
        self.held[key] = deque()
        self.taken[id(delivery)] = key
        return True

    def release(self, delivery: Delivery, idle: deque[asyncio.Future[None]]) -> Delivery | None:
        """``delivery`` is done: the next one of its key (the key stays taken), or ``None``."""
        key = self.taken.pop(id(delivery))
        behind = self.held[key]
        if not behind:
            del self.held[key]
            return None
        after = behind.popleft()
        self.parked -= 1
        self.taken[id(after)] = key
        if idle:  # a worker may have stopped taking deliveries while too many were parked
            _wake(idle)
        return after

    def clear(self) -> int:
        """Forget every key (the subscription stops); returns how many were parked."""
        parked, self.parked = self.parked, 0
        self.held.clear()
        self.taken.clear()
        return parked


class _BatchKeys:
    """Key order of a batch handler: each key's last batch, which the next one waits for.

    A batch may hold events of many keys; it runs once every batch before it that holds
    one of its keys is done, so equal keys stay in queue order, and batches without a
    key in common run in parallel. Each batch waits only for earlier ones, so the
    earliest always runs: no batch waits for ever.
    """

    __slots__ = ("argument", "collecting", "key", "last")

    def __init__(self, key: Callable[[Any], Hashable], argument: Callable[[Delivery], Any]) -> None:
        self.key = key
        self.argument = argument
        #: Held while a batch is collected and takes its place (batches form in order).
        self.collecting = asyncio.Lock()
        #: Each key's last batch (its future is done once that batch was handled).
        self.last: dict[Hashable, asyncio.Future[None]] = {}

    def enter(self, keys: list[Hashable]) -> tuple[list[asyncio.Future[None]], _Place]:
        """Take the place behind ``keys``: the batches to wait for, and this batch's place."""
        place = _Place(keys, asyncio.get_running_loop().create_future())
        ahead: dict[int, asyncio.Future[None]] = {}
        last = self.last
        for key in keys:
            before = last.get(key)
            if before is not None and before is not place.done and not before.done():
                ahead[id(before)] = before
            last[key] = place.done
        return list(ahead.values()), place

    def leave(self, place: _Place) -> None:
        """The batch of ``place`` was handled: the batches behind it may run."""
        last = self.last
        for key in place.keys:
            if last.get(key) is place.done:
                del last[key]
        if not place.done.done():
            place.done.set_result(None)


@dataclasses.dataclass(slots=True)
class _Place:
    """A key-ordered batch's keys, and the future set once it was handled."""

    keys: list[Hashable]
    done: asyncio.Future[None]


#: :attr:`Subscription._fill_at` while no batch collector waits.
_NO_FILLER = 1 << 62

#: What a handler is given: the event (typed subscriptions) or the raw message.
_EVENT = operator.attrgetter("event")
_MESSAGE = operator.attrgetter("message")


def _EVENTS(batch: Delivery) -> list[Any]:  # noqa: N802 - named like the getters above
    return list(map(_EVENT, cast("Batch", batch).deliveries))


def _MESSAGES(batch: Delivery) -> list[Message]:  # noqa: N802 - named like the getters above
    return list(map(_MESSAGE, cast("Batch", batch).deliveries))


def check_position(value: object, what: str) -> str | dt.datetime:
    """``value`` as a durable position: ``"latest"``, ``"earliest"`` or an aware datetime.

    :param value: the position given.
    :param what: names the argument in the error.
    :returns: the position.
    :raises ConfigError: for anything else (a naive datetime too).
    """
    if value == "latest" or value == "earliest":  # noqa: PLR1714 - narrows to str
        return value
    if isinstance(value, dt.datetime) and value.utcoffset() is not None:
        return value
    raise ConfigError(f"{what} must be 'latest', 'earliest' or an aware datetime, not {value!r}")


def _start(name: str, start: object, durable: str | None) -> str | dt.datetime:
    """The start position of a subscription (only a durable one takes ``start=``)."""
    if start is None:
        return "latest"
    if durable is None:
        raise ConfigError(f"subscription {name!r}: start= needs a durable subscription")
    return check_position(start, f"subscription {name!r}: start")


def _key_orders(
    key: Callable[[Any], Hashable] | None,
    batch: int | None,
    argument: Callable[[Delivery], Any],
) -> tuple[_KeyOrder | None, _BatchKeys | None]:
    """The key order of a key-ordered subscription: per delivery, or per batch (batch=)."""
    if key is None:
        return None, None
    if batch is None:
        return _KeyOrder(key, argument), None
    return None, _BatchKeys(key, argument)


def _check_key_and_batch(
    name: str,
    key: object,
    batch: int | None,
    batch_wait: float | None,
) -> None:
    """Refuse ``key=`` and batch options that cannot work, saying what is wrong."""
    if key is not None and not callable(key):
        raise ConfigError(f"subscription {name!r}: key must be callable, not {key!r}")
    if batch is None:
        if batch_wait is not None:
            raise ConfigError(f"subscription {name!r}: batch_wait needs batch=")
        return
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(
            f"subscription {name!r}: batch must be an int of at least 1, not {batch!r}"
        )
    if batch_wait is not None and not (
        isinstance(batch_wait, int | float) and math.isfinite(batch_wait) and batch_wait >= 0
    ):
        raise ConfigError(
            f"subscription {name!r}: batch_wait must be a finite number of seconds >= 0,"
            f" not {batch_wait!r}"
        )


def _itself(delivery: Delivery) -> Delivery:
    return delivery


def _call(handler: Callable[[Any], Any], argument: Callable[[Delivery], Any]) -> CallNext:
    """Call ``handler`` with ``argument(delivery)``: awaited, or run in a worker thread."""
    if is_async(handler):

        async def call_async(delivery: Delivery) -> Any:
            return await handler(argument(delivery))

        return call_async

    async def call_in_thread(delivery: Delivery) -> Any:
        result = await asyncio.to_thread(handler, argument(delivery))
        if inspect.isawaitable(result):
            return await result
        return result

    return call_in_thread


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    # a plain function returning the middleware's awaitable: no extra coroutine per layer
    def step(delivery: Delivery) -> Awaitable[Any]:
        return mw(delivery, call_next)

    return step
