"""Helpers for testing code that uses pgbus, against a real PostgreSQL or in memory.

The helpers work on any bus. ``pgbus.Bus("memory://")`` runs the whole receive path
(codec, routing, retries, dead letters, metrics, the handler context) without a server,
and ``Bus("memory://name", durable=True)`` durable subscriptions too (replay from a
position, consumer groups, delays, persisted retries: the journal kept in the process by
:class:`pgbus.durable.MemoryDurablePlugin`): prefer it for unit tests of handlers. Use a
real server (the pytest plugin's fixtures) for what only PostgreSQL does: publishing in
your transaction (``connection=``), reconnects, the durable tables themselves and the
server's limits.

:func:`wait_for` waits (with a timeout) for an event of a given type to arrive on a bus;
:class:`RecordingPlugin` records what a bus publishes, handles and fails on, and lets a
test wait until a handler has finished. The pytest plugin (:mod:`pgbus.pytest_plugin`)
builds fixtures on them::

    async def test_order_is_shipped(pgbus_bus: pgbus.Bus) -> None:
        await pgbus_bus.listen(OrderPlaced, ship_order)  # the handler under test
        async with wait_for(pgbus_bus, OrderShipped, timeout=5) as shipped:
            await pgbus_bus.publish(OrderPlaced(order_id=1))
        assert shipped.event.order_id == 1

.. versionadded:: 0.1.0
.. versionchanged:: 0.3.0 durable mode on the memory bus.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from pgbus._events import Event
from pgbus._markers import hookimpl

if TYPE_CHECKING:
    from collections.abc import Callable, Generator, Sequence
    from types import TracebackType

    from pgbus._bus import Bus
    from pgbus._events import Delivery, Message
    from pgbus._subscription import Subscription
    from pgbus.types import Outgoing

__all__ = ["DEFAULT_TIMEOUT", "Handled", "RecordingPlugin", "Waiter", "wait_for"]

E = TypeVar("E", bound=Event)

#: Seconds :func:`wait_for` and :meth:`RecordingPlugin.wait_handled` wait by default.
DEFAULT_TIMEOUT = 5.0


class Waiter(Generic[E]):
    """Waits for the first ``event_type`` event (that ``where`` accepts) on a bus.

    Made by :func:`wait_for`. Use it as an async context manager, so that it is
    listening before the code in the block publishes; leaving the block waits::

        async with wait_for(bus, OrderShipped) as shipped:
            await bus.publish(OrderPlaced(order_id=1))
        assert shipped.event.order_id == 1

    or await it directly, when the event is caused by something that happens later
    (``event = await wait_for(bus, OrderShipped)``).

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        bus: Bus,
        event_type: type[E],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        where: Callable[[E], bool] | None = None,
    ) -> None:
        self.bus = bus
        self.event_type = event_type
        self.timeout = timeout
        self.where = where
        self._future: asyncio.Future[E] | None = None
        self._subscription: Subscription | None = None

    @property
    def event(self) -> E:
        """The event that arrived.

        :raises RuntimeError: before it arrived.
        """
        if self._future is None or not self._future.done():
            raise RuntimeError(f"no {self.event_type.__name__} has arrived (yet)")
        return self._future.result()

    async def start(self) -> None:
        """Subscribe to the event type (LISTEN, if the bus is running)."""
        if self._future is not None:
            return
        future: asyncio.Future[E] = asyncio.get_running_loop().create_future()
        self._future = future
        where = self.where

        async def catch(event: E) -> None:
            if not future.done() and (where is None or where(event)):
                future.set_result(event)

        self._subscription = await self.bus.listen(
            self.event_type, catch, name=f"pgbus.testing.wait_for:{uuid.uuid4().hex[:8]}"
        )

    async def wait(self) -> E:
        """Wait for the event, then unsubscribe.

        :returns: the event.
        :raises TimeoutError: when none arrived within ``timeout`` seconds.
        """
        await self.start()
        assert self._future is not None  # noqa: S101 - start() set it
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), self.timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no {self.event_type.__name__} arrived on"
                f" {self.event_type.pgbus_channel!r} within {self.timeout:g} s"
            ) from None
        finally:
            await self.close()

    async def close(self) -> None:
        """Unsubscribe (harmless when already done)."""
        sub, self._subscription = self._subscription, None
        if sub is not None and self.bus.state.value in ("new", "starting", "running"):
            await self.bus.unlisten(sub)

    def __await__(self) -> Generator[Any, None, E]:
        return self.wait().__await__()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.wait()
        else:
            await self.close()


def wait_for(
    bus: Bus,
    event_type: type[E],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    where: Callable[[E], bool] | None = None,
) -> Waiter[E]:
    """Wait for an ``event_type`` event to arrive on ``bus``, for at most ``timeout`` s.

    ::

        async with wait_for(bus, OrderShipped, where=lambda e: e.order_id == 1) as shipped:
            await bus.publish(OrderPlaced(order_id=1))
        print(shipped.event)

    :param bus: the bus (new or running).
    :param event_type: the :class:`~pgbus.Event` subclass to wait for.
    :param timeout: seconds to wait before :class:`TimeoutError`.
    :param where: only accept events for which this returns true.
    :returns: a :class:`Waiter`: ``async with`` it, or ``await`` it for the event.

    .. versionadded:: 0.1.0
    """
    return Waiter(bus, event_type, timeout=timeout, where=where)


@dataclasses.dataclass(frozen=True, slots=True)
class Handled:
    """One handler run that :class:`RecordingPlugin` saw end.

    :ivar subscription: the subscription's name.
    :ivar delivery: what it handled.
    :ivar error: what it raised in the end, or ``None`` when it succeeded.

    .. versionadded:: 0.1.0
    """

    subscription: str
    delivery: Delivery
    error: BaseException | None = None

    @property
    def event(self) -> Event | None:
        """The decoded event (``None`` for raw messages)."""
        return self.delivery.event

    @property
    def ok(self) -> bool:
        """Whether the handler succeeded."""
        return self.error is None


class RecordingPlugin:
    """A plugin that records what a bus publishes, receives, handles and rejects.

    ::

        recorder = RecordingPlugin()
        bus = pgbus.Bus(dsn, plugins=[recorder])
        ...
        await recorder.wait_handled(OrderPlaced)        # a handler finished with one
        assert recorder.published_events == [OrderPlaced(order_id=1)]

    :ivar published: every :class:`~pgbus.types.Outgoing` the bus sent.
    :ivar received: every raw :class:`~pgbus.Message` the listener took in.
    :ivar handled: every handler run that ended, successful or not (:class:`Handled`).
    :ivar decode_errors: ``(message, error)`` for every payload no model accepted.

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self.published: list[Outgoing] = []
        self.received: list[Message] = []
        self.handled: list[Handled] = []
        self.decode_errors: list[tuple[Message, BaseException]] = []
        self._changed = asyncio.Event()

    @property
    def published_events(self) -> list[Event]:
        """The events published (raw payloads left out), in order."""
        return [out.event for out in self.published if out.event is not None]

    @property
    def handled_events(self) -> list[Event]:
        """The events handlers finished with successfully, in order."""
        return [h.event for h in self.handled if h.ok and h.event is not None]

    @property
    def failures(self) -> list[Handled]:
        """The handler runs that ended with an error."""
        return [h for h in self.handled if not h.ok]

    def clear(self) -> None:
        """Forget everything recorded so far."""
        self.published.clear()
        self.received.clear()
        self.handled.clear()
        self.decode_errors.clear()

    def _touch(self) -> None:
        self._changed.set()

    async def wait_handled(
        self,
        event_type: type[Event] | None = None,
        *,
        count: int = 1,
        ok: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - a bounded wait is the point
    ) -> list[Handled]:
        """Wait until handlers have finished with ``count`` matching deliveries.

        :param event_type: only count these events (``None``: any delivery).
        :param count: how many to wait for.
        :param ok: ``True``: only successes; ``False``: only failures; ``None``: both.
        :param timeout: seconds to wait before :class:`TimeoutError`.
        :returns: the matching :class:`Handled` records, in order.
        :raises TimeoutError: when fewer than ``count`` ended in time.
        """

        def matching() -> list[Handled]:
            return [
                h
                for h in self.handled
                if (event_type is None or isinstance(h.event, event_type))
                and (ok is None or h.ok is ok)
            ]

        async def until() -> list[Handled]:
            while len(found := matching()) < count:
                self._changed.clear()
                await self._changed.wait()
            return found

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            what = event_type.__name__ if event_type is not None else "deliveries"
            raise TimeoutError(
                f"{len(matching())} of {count} {what} handled within {timeout:g} s"
            ) from None

    @hookimpl
    def pgbus_on_published(self, outgoing: Sequence[Outgoing]) -> None:
        """Record what was sent."""
        self.published.extend(outgoing)
        self._touch()

    @hookimpl
    def pgbus_on_received(self, messages: Sequence[Message]) -> None:
        """Record what the listener took in."""
        self.received.extend(messages)
        self._touch()

    @hookimpl
    def pgbus_on_handled(
        self,
        subscription: Subscription,
        delivery: Delivery,
        duration: float,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        """Record a successful handler run."""
        if not subscription.name.startswith("pgbus.testing."):
            self.handled.append(Handled(subscription.name, delivery))
            self._touch()

    @hookimpl
    def pgbus_on_handler_error(
        self, subscription: Subscription, delivery: Delivery, error: BaseException
    ) -> None:
        """Record a failed handler run (after its retries)."""
        self.handled.append(Handled(subscription.name, delivery, error))
        self._touch()

    @hookimpl
    def pgbus_on_decode_error(self, message: Message, error: BaseException) -> None:
        """Record a payload that could not be decoded."""
        self.decode_errors.append((message, error))
        self._touch()
