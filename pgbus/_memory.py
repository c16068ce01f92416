"""The in-memory transport of ``Bus("memory://")``: NOTIFY and LISTEN without PostgreSQL.

Buses built with the same ``memory://name`` in one process share one :class:`Broker`.
A publish hands each notification to every listener of its channel at once (the
publishing bus included, as PostgreSQL does), and from there the bus's own receive path
runs unchanged: decoding, routing, middleware (retry, timeouts), dead letters, metrics,
the handler context and outcomes. Only the wire is replaced, so handlers tested on it
behave as they do on a server.

What has no meaning without a database is refused with a :class:`~pgbus.ConfigError`:
``connection=`` (there is no transaction to join) and the publish pool.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING

from pgbus._listener import Inlet
from pgbus._status import ListenerState
from pgbus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._listener import ListenerHost

SCHEME = "memory://"

_brokers: weakref.WeakValueDictionary[str, Broker] = weakref.WeakValueDictionary()


def is_memory(dsn: str | None) -> bool:
    """Whether ``dsn`` names an in-memory broker (``memory://`` or ``memory://name``)."""
    return dsn is not None and dsn.strip().startswith(SCHEME)


def broker(dsn: str) -> Broker:
    """The broker ``dsn`` names, shared by every bus of this process that names it."""
    name = dsn.strip()[len(SCHEME) :]
    found = _brokers.get(name)
    if found is None:
        found = _brokers[name] = Broker(name)
    return found


def no_database(what: str) -> ConfigError:
    """The error for something a ``memory://`` bus cannot do."""
    return ConfigError(f"a memory:// bus has no database: {what}")


class Broker:
    """The channels of one ``memory://name``, and who listens to each."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid = id(self) & 0x7FFFFFFF  # what Message.pid says for its notifications
        self._listeners: set[MemoryListener] = set()

    def attach(self, listener: MemoryListener) -> None:
        self._listeners.add(listener)

    def detach(self, listener: MemoryListener) -> None:
        self._listeners.discard(listener)

    def notify(self, channels: Sequence[str], payloads: Sequence[str]) -> None:
        """Deliver ``payloads[i]`` on ``channels[i]``, in order, to every listener of it."""
        for listener in tuple(self._listeners):
            for channel, payload in zip(channels, payloads, strict=True):
                if channel in listener.wanted:
                    listener.take(self.pid, channel, payload)


class MemoryListener(Inlet):
    """What :class:`~pgbus._listener.Listener` is to a bus, on a :class:`Broker`."""

    def __init__(self, broker: Broker, host: ListenerHost) -> None:
        super().__init__(host)
        self._broker = broker
        self._stopped: asyncio.Event | None = None

    @property
    def connected(self) -> bool:
        """Whether the listener is attached to its broker."""
        return self.state is ListenerState.CONNECTED

    @property
    def backend_pid(self) -> int | None:
        """The broker's pid while connected (what its notifications carry)."""
        return self._broker.pid if self.connected else None

    async def start(self, timeout: float) -> None:  # noqa: ARG002, ASYNC109 - the Listener's signature
        """Attach to the broker; the plugins' connect hooks run as after a LISTEN."""
        self._stopped = asyncio.Event()
        self._broker.attach(self)
        self._set_state(ListenerState.CONNECTED)
        await self._host.on_connected(self.channels, None, self.state_since)

    async def wait(self) -> None:
        """Wait until stopped."""
        if self._stopped is not None:
            await self._stopped.wait()

    async def stop(self) -> None:
        """Detach from the broker."""
        self._broker.detach(self)
        self._set_state(ListenerState.STOPPED)
        if self._stopped is not None:
            self._stopped.set()

    async def listen(self, channel: str) -> None:
        """Add ``channel``."""
        self.wanted[channel] = None

    async def unlisten(self, channel: str) -> None:
        """Remove ``channel``."""
        self.wanted.pop(channel, None)
