"""The dispatcher: the receive path, from the listener's inbound queue to the handlers.

The listener appends notifications to :attr:`Dispatcher.inbound`; the dispatcher's task
takes them in rounds, decodes each once per channel, drops recently seen event ids,
routes the delivery and offers it to each subscription's queue. Subscriptions report
back here (successes, failures, drops, their backlog), and the dispatcher pauses the
listener's socket when too much waits in the process. It is the public host of the
listener (:class:`~pgbus._listener.ListenerHost`) and of the subscriptions
(:class:`~pgbus._subscription.SubscriptionHost`), and it never calls back into the Bus.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from itertools import repeat
from operator import attrgetter, is_
from typing import TYPE_CHECKING, Any, Protocol, cast

from pgbus._events import REFERENCE_MARK, Delivery, Event, Message, Notification, reference_of
from pgbus._listener import INBOUND_HIGH_WATER
from pgbus._status import Gap
from pgbus.errors import ConfigError, DecodeError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Iterable, Sequence

    from pgbus._events import Decoder
    from pgbus._plugins import PluginManager
    from pgbus._status import ResyncCallback
    from pgbus._subscription import CallNext, Middleware, Overflow, Router, Subscription
    from pgbus.errors import ListenerError

logger = logging.getLogger(__name__)

#: Notifications dispatched per round. After a round the dispatcher lets the handlers
#: run, so decoded events are handled and freed while they are young: the garbage
#: collector then never has to promote and rescan thousands of live events. (With 100
#: buses in one process, rounds of 300 made collection a third of the receive cost;
#: rounds of 32 cost one event-loop turn per 32 events.)
DISPATCH_BATCH = 32
#: Below this many notifications waiting in the process a paused listener reads again
#: (it pauses at :data:`~pgbus._listener.INBOUND_HIGH_WATER`): memory stays bounded when
#: handlers fall behind.
INBOUND_LOW_WATER = 250
#: How many recent event ids the receive path remembers (at least; at most twice as many)
#: to drop duplicates: an event published again by a publish retry whose first try had
#: in fact committed.
RECENT_IDS = 10_000


class Reader(Protocol):
    """What the dispatcher pauses and resumes: the listener's socket."""

    paused: bool

    def pause_reading(self) -> None:
        """Stop reading notifications."""

    def resume_reading(self) -> None:
        """Read notifications again."""


class _Channel:
    """What the dispatcher needs for one channel, rebuilt when subscriptions change."""

    __slots__ = ("decode", "route", "subscriptions")

    def __init__(self, decode: Decoder, route: Router, subscriptions: list[Subscription]) -> None:
        self.decode = decode
        self.route = route
        self.subscriptions = subscriptions


class Dispatcher:
    """The receive path of one Bus.

    :param plugins: the bus's plugin facade.
    :param owner: what the connection hooks receive as ``bus``.
    """

    def __init__(self, plugins: PluginManager, owner: object) -> None:
        self.plugins = plugins
        self.owner = owner
        #: Notifications for the dispatcher, as plain tuples until dispatched: the
        #: garbage collector stops tracking a tuple of strings and numbers, so a long
        #: backlog costs it nothing. The listener appends, the dispatcher takes.
        self.inbound: deque[Notification] = deque()
        #: Whether :meth:`handled` is wanted (some plugin implements ``pgbus_on_handled``).
        self.wants_handled = False
        #: Envelopes received again with an id seen among the last RECENT_IDS, dropped.
        self.duplicates = 0
        self.reader: Reader | None = None
        self._channels: dict[str, _Channel] = {}
        self._backlogged = 0
        # two generations: when the newer is full it becomes the older, the older is freed
        self._recent_ids: set[str] = set()
        self._older_ids: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._draining = False
        self._resync: dict[str, tuple[ResyncCallback, asyncio.Event]] = {}
        self._resync_tasks: dict[str, asyncio.Task[None]] = {}
        self._subscriptions: dict[str, Subscription] = {}
        self._resolving: set[asyncio.Task[None]] = set()
        #: Notifications a round could not decode, with the error, to report after it.
        self._failures: deque[tuple[Message, Exception]] = deque()

    # -- the channel table ----------------------------------------------------------------

    @property
    def channels(self) -> tuple[str, ...]:
        """Every channel some subscription listens on."""
        return tuple(self._channels)

    def set_subscriptions(self, subscriptions: Iterable[Subscription]) -> None:
        """Rebuild the channel table: decoders and routers for the subscriptions now.

        Durable subscriptions are listened for (their channels' NOTIFYs wake their
        consumers) but fed by the durable plugin, not routed here.

        :raises ConfigError: when two event types share a channel and a type name, or
            no plugin provides a decoder or a router.
        """
        subs = {s.name: s for s in subscriptions}
        by_channel: dict[str, list[Subscription]] = {}
        for sub in subs.values():
            for channel in sub.channels:
                routed = by_channel.setdefault(channel, [])  # LISTEN even if all are durable
                if sub.durable is None:
                    routed.append(sub)
        channels: dict[str, _Channel] = {}
        for channel, routed in by_channel.items():
            old = self._channels.get(channel)
            if old is not None and old.subscriptions == routed:
                channels[channel] = old
                continue
            channels[channel] = self._channel(channel, routed)
        self._channels = channels
        self._subscriptions = subs
        for name in set(self._resync) - set(subs):
            del self._resync[name]

    def _channel(self, channel: str, subs: list[Subscription]) -> _Channel:
        types = list(
            dict.fromkeys(t for s in subs for t in s.event_types if t.pgbus_channel == channel)
        )
        names: dict[str, type[Event]] = {}
        for t in types:
            other = names.setdefault(t.pgbus_type, t)
            if other is not t:
                raise ConfigError(
                    f"{other.__qualname__} and {t.__qualname__} share channel {channel!r}"
                    f" and type name {t.pgbus_type!r}; give one an event_type="
                )
        decode = self.plugins.decoder(channel, types)
        route = self.plugins.router(channel, subs)
        if decode is None or route is None:
            raise ConfigError(
                f"no plugin provides a {'decoder' if decode is None else 'router'}"
                f" for channel {channel!r} (was the built-in one disabled?)"
            )
        return _Channel(decode, route, subs)

    def set_resync(self, subscription: Subscription, callback: ResyncCallback) -> None:
        """Call ``callback`` with the :class:`~pgbus.Gap` after each reconnect."""
        gate = asyncio.Event()
        gate.set()
        self._resync[subscription.name] = (callback, gate)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the dispatch task is alive."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the dispatch task."""
        self.wants_handled = self.plugins.has_impls("pgbus_on_handled")
        self._task = asyncio.create_task(self._dispatch(), name="pgbus-dispatcher")

    def start_subscription(self, sub: Subscription) -> None:
        """Compose ``sub``'s middleware (a resync gate outermost) and start its workers."""
        middleware = self.plugins.middleware(sub)
        if sub.name in self._resync:  # outermost: hold deliveries while on_resync runs
            middleware.insert(0, _resync_gate(self._resync[sub.name][1]))
        sub.start(middleware, self)

    async def stop_resyncs(self) -> None:
        """Cancel running ``on_resync`` callbacks."""
        tasks = list(self._resync_tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - a drain deadline
        """Dispatch what is in the inbound queue (up to ``timeout`` s), then end the task."""
        task = self._task
        if task is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        if not task.done():
            self._draining = True
            self._wakeup.set()
            await asyncio.wait({task}, timeout=timeout)
            task.cancel()
            await asyncio.wait({task})
        if task.cancelled():
            if not self._draining:
                logger.error(
                    "the dispatcher task had been cancelled; %d notifications undispatched",
                    len(self.inbound),
                )
        elif (error := task.exception()) is not None:
            logger.error(
                "the dispatcher task had failed; %d notifications undispatched",
                len(self.inbound),
                exc_info=error,
            )
        resolving = set(self._resolving)  # references being fetched: delivered, or given up
        if resolving:
            left = max(0.0, deadline - asyncio.get_running_loop().time())
            _, late = await asyncio.wait(resolving, timeout=left)
            for late_task in late:
                late_task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # -- the listener's host --------------------------------------------------------------

    def inbound_ready(self) -> None:
        """The listener put a notification into the empty inbound queue."""
        self._wakeup.set()

    async def on_connected(
        self, channels: Sequence[str], disconnected_at: float | None, reconnected_at: float
    ) -> None:
        """LISTEN is in place on a new connection (after a gap, when ``disconnected_at``)."""
        await self.plugins.on_connect(self.owner, channels)
        if disconnected_at is not None:
            self._start_resyncs(disconnected_at, reconnected_at)
            await self.plugins.on_resync(self.owner, channels, disconnected_at, reconnected_at)

    async def on_disconnected(self, error: BaseException | None) -> None:
        """The LISTEN connection was lost."""
        await self.plugins.on_disconnect(self.owner, error)

    async def on_terminal_error(self, error: ListenerError) -> None:
        """The listener gave up reconnecting."""
        await self.plugins.on_terminal_error(self.owner, error)

    def backoff(self, attempt: int, error: BaseException | None) -> float | None:
        """Seconds before reconnect attempt ``attempt``, or ``None`` to give up."""
        return self.plugins.backoff(attempt, error)

    async def undecodable(self, message: Message, error: BaseException) -> None:
        """Report a notification that could not be decoded (log, hook, dead letter)."""
        await self.plugins.undecodable(message, error)

    # -- the receive path -----------------------------------------------------------------

    async def _dispatch(self) -> None:
        inbound = self.inbound
        wakeup = self._wakeup
        on_received = self.plugins.on_received
        decode, route = self._decode, self._route
        while True:
            if not inbound:
                if self._draining:
                    return
                wakeup.clear()
                await wakeup.wait()
                continue
            batch = [Message(*inbound.popleft()) for _ in range(min(len(inbound), DISPATCH_BATCH))]
            on_received(batch)
            # In two passes: decoding the round's messages one after the other keeps the
            # validator's code in the CPU's instruction cache (a fifth fewer misses).
            deliveries = list(map(decode, batch))
            if not self._route_round(batch, deliveries):
                for delivery in deliveries:
                    if delivery is not None:
                        try:
                            route(delivery)
                        except Exception as exc:  # a plugin's router: never fatal
                            await self.undecodable(delivery.message, exc)
            failures = self._failures
            while failures:
                await self.undecodable(*failures.popleft())
            self._check_pressure()
            if inbound:
                await asyncio.sleep(0)  # the handlers' turn

    def _deliver(self, message: Message) -> Exception | None:
        """Decode, drop a duplicate, route one message (what the dispatcher does in rounds).

        :returns: the decoder's error (the raw message is routed to untyped
            subscriptions all the same), for the dispatcher to report. An error of the
            router propagates: the dispatcher reports the message as undeliverable.
        """
        failures = self._failures  # the dispatcher may be reporting a round's meanwhile
        before = len(failures)
        delivery = self._decode(message)
        error = failures.pop()[1] if len(failures) > before else None
        if delivery is not None:
            self._route(delivery)
        return error

    def _decode(self, message: Message) -> Delivery | None:
        """Decode one notification: no await, for every one.

        A decoder's error is queued in :attr:`_failures` for the dispatcher to report; the
        raw message is routed to untyped subscriptions all the same.

        :returns: the delivery, or ``None`` when it goes to no subscription here
            (UNLISTENed meanwhile, only durable subscriptions, a reference being fetched).
        """
        channel = self._channels.get(message.channel)
        if channel is None or not channel.subscriptions:
            return None  # a NOTIFY of durable subscriptions is a wake-up
        # a stored event is never a reference; the mark's look saves parsing the rest
        if message.stored_at is None and REFERENCE_MARK in message.payload:
            reference = reference_of(message.payload)
            if reference is not None:
                try:
                    error = self._resolve(message, reference)
                except Exception as exc:  # a plugin's resolve_reference: never fatal
                    error = exc
                if error is not None:
                    self._failures.append((message, error))
                return None
        try:
            return channel.decode(message)
        except Exception as exc:
            self._failures.append((message, exc))
            return Delivery(message)

    def _route(self, delivery: Delivery) -> None:
        """Drop a duplicate, else offer ``delivery`` to the subscriptions it is routed to."""
        channel = self._channels.get(delivery.message.channel)
        if channel is None:
            return  # UNLISTENed while the round was reported
        event_id = delivery.id
        if event_id is not None:
            recent = self._recent_ids
            if event_id in recent or event_id in self._older_ids:
                # a publish retried after its first try had committed: seen already
                self.duplicates += 1
                logger.debug("dropped duplicate event %s on %s", event_id, delivery.channel)
                return
            recent.add(event_id)
            if len(recent) >= RECENT_IDS:
                self._older_ids = recent
                self._recent_ids = set()
        _offer(channel.route(delivery), delivery)

    def _route_round(self, batch: list[Message], deliveries: list[Delivery | None]) -> bool:
        """Route a round at once, the common case of a busy channel; else leave it.

        At once: every notification decoded, all on one channel, each with an id not seen
        before. Their de-duplication is then two set operations, and a round that the
        router sends to the same subscriptions is queued with one call per subscription.
        Otherwise nothing was done, and the round is routed one by one (so is a round
        whose plugin router raised: a ``where=`` may then run twice for the events
        before the one that raised).

        :returns: whether the round was routed.
        """
        if any(map(is_, deliveries, repeat(None))):
            return False
        channels = set(map(_CHANNEL, batch))
        channel = self._channels.get(channels.pop()) if len(channels) == 1 else None
        if channel is None:
            return False
        ready = cast("list[Delivery]", deliveries)
        ids = list(map(_ID, ready))
        new = set(ids)
        recent = self._recent_ids
        if (
            None in new
            or len(new) != len(ids)
            or len(recent) + len(new) >= RECENT_IDS  # the generations turn: one by one
            or not recent.isdisjoint(new)
            or not self._older_ids.isdisjoint(new)
        ):
            return False
        try:
            targets = list(map(channel.route, ready))
        except Exception:
            return False
        recent.update(cast("set[str]", new))
        first = targets[0]
        if all(map(is_, targets, repeat(first))):  # the router's answer for a class, cached
            for index, sub in enumerate(first):
                sub.offer_many(list(map(_copy, ready)) if index else ready)
            return True
        for delivery, subs in zip(ready, targets, strict=True):
            _offer(subs, delivery)
        return True

    def _resolve(self, message: Message, reference: dict[str, Any]) -> Exception | None:
        """Have a plugin fetch the event a reference points to, then deliver that.

        :returns: a :class:`~pgbus.DecodeError` when no plugin resolves references.
        """
        taken = self.plugins.resolve_reference(self.owner, message, reference)
        if taken is None:
            return DecodeError(
                message.channel,
                message.payload,
                "a reference to an event stored in the durable journal (too large for"
                " NOTIFY): only a bus with the durable plugin can read it",
            )
        task = asyncio.create_task(
            self._deliver_stored(message, taken), name=f"pgbus-reference-{message.channel}"
        )
        self._resolving.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._resolving.discard(task)
            if task.cancelled() and inspect.iscoroutine(taken):
                taken.close()  # cancelled before it started (stop): never awaited otherwise

        task.add_done_callback(done)
        return None

    async def _deliver_stored(self, reference: Message, taken: Awaitable[Message | None]) -> None:
        try:
            stored = await taken
        except Exception as exc:  # the plugin could not fetch it: reported like a bad payload
            await self.plugins.undecodable(reference, exc)
            return
        if stored is None:
            logger.info(
                "reference on %s: the event is no longer stored",
                reference.channel,
                extra={"channel": reference.channel},
            )
            return
        try:
            error = self._deliver(stored)
        except Exception as exc:  # a router or a where= of a plugin's: never fatal
            error = exc
        if error is not None:
            await self.plugins.undecodable(stored, error)

    def _check_pressure(self) -> None:
        """Pause or resume reading the LISTEN socket by what waits in this process."""
        reader = self.reader
        if reader is None:
            return
        waiting = len(self.inbound) + self._backlogged
        if reader.paused:
            if waiting <= INBOUND_LOW_WATER:
                reader.resume_reading()
        elif waiting >= INBOUND_HIGH_WATER:
            reader.pause_reading()

    # -- the subscriptions' host ----------------------------------------------------------

    def handled(self, subscription: Subscription, delivery: Delivery, duration: float) -> None:
        """A handler run succeeded."""
        self.plugins.on_handled(subscription, delivery, duration)

    async def failed(
        self, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> None:
        """A handler run failed for good: report it and make a dead letter."""
        await self.plugins.gave_up(subscription, delivery, error)

    def dropped(self, subscription: Subscription, delivery: Delivery, policy: Overflow) -> None:
        """An overflow policy dropped a delivery."""
        self.plugins.on_dropped(subscription, delivery, policy)

    def backlog_changed(self, delta: int) -> None:
        """A subscription's backlog (deliveries behind its full queue) grew or shrank."""
        self._backlogged += delta
        self._check_pressure()

    # -- resync ---------------------------------------------------------------------------

    def _start_resyncs(self, disconnected_at: float, reconnected_at: float) -> None:
        """Run every subscription's ``on_resync`` in a task, its deliveries held meanwhile."""
        for name, (callback, gate) in self._resync.items():
            sub = self._subscriptions.get(name)
            if sub is None:
                continue
            gate.clear()
            gap = Gap(sub.channels, disconnected_at, reconnected_at)
            previous = self._resync_tasks.get(name)
            if previous is not None:
                previous.cancel()
            self._resync_tasks[name] = asyncio.create_task(
                self._resync_one(sub, callback, gate, gap), name=f"pgbus-resync-{name}"
            )

    async def _resync_one(
        self, sub: Subscription, callback: ResyncCallback, gate: asyncio.Event, gap: Gap
    ) -> None:
        try:
            result = callback(gap)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("on_resync of %s failed", sub.name)
        finally:
            if self._resync_tasks.get(sub.name) is asyncio.current_task():
                del self._resync_tasks[sub.name]
                gate.set()


def _resync_gate(gate: asyncio.Event) -> Middleware:
    """A middleware that holds deliveries while ``gate`` is closed (a resync runs)."""

    async def wait_for_resync(delivery: Delivery, call_next: CallNext) -> None:
        if not gate.is_set():
            await gate.wait()
        await call_next(delivery)

    return wait_for_resync


_CHANNEL = attrgetter("channel")
_ID = attrgetter("id")


def _offer(subscriptions: Sequence[Subscription], delivery: Delivery) -> None:
    """Offer ``delivery`` to each of ``subscriptions``: the first gets it, the others copies.

    Each subscription gets its own Delivery: retries count attempts on it.
    """
    shared = False
    for sub in subscriptions:
        sub.offer(_copy(delivery) if shared else delivery)
        shared = True


def _copy(delivery: Delivery) -> Delivery:
    return Delivery(
        delivery.message,
        delivery.event,
        delivery.id,
        delivery.published_at,
        delivery.headers,
        delivery.attempt,
        delivery.redelivered,
    )
