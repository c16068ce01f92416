"""The built-in metrics: in-memory counters per channel and per subscription.

``bus.metrics.snapshot()`` returns a typed, immutable copy of the counters. The counting
is a few dictionary updates per event, so it stays on by default; block it with
``Bus(disable_plugins=["metrics"])``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TYPE_CHECKING

from pgbus import hookimpl

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pgbus._bus import Bus
    from pgbus._events import Delivery, Message
    from pgbus._subscription import Subscription
    from pgbus.types import Outgoing


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelStats:
    """Counters of one channel.

    .. versionadded:: 0.1.0
    """

    published: int = 0
    received: int = 0
    decode_failures: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """Counters of one subscription.

    .. versionadded:: 0.1.0
    """

    handled: int = 0
    failed: int = 0
    handler_seconds: float = 0.0


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """A point-in-time copy of every counter.

    .. versionadded:: 0.1.0
    """

    channels: dict[str, ChannelStats]
    subscriptions: dict[str, SubscriptionStats]
    connects: int
    disconnects: int

    @property
    def published(self) -> int:
        """Events and raw payloads published, over all channels."""
        return sum(c.published for c in self.channels.values())

    @property
    def received(self) -> int:
        """Notifications received, over all channels."""
        return sum(c.received for c in self.channels.values())

    @property
    def handled(self) -> int:
        """Successful handler runs, over all subscriptions."""
        return sum(s.handled for s in self.subscriptions.values())

    @property
    def failed(self) -> int:
        """Failed handler runs, over all subscriptions."""
        return sum(s.failed for s in self.subscriptions.values())

    @property
    def decode_failures(self) -> int:
        """Notifications that could not be decoded, over all channels."""
        return sum(c.decode_failures for c in self.channels.values())


class Metrics:
    """In-memory counters, one instance per Bus (``bus.metrics``).

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        self._published: Counter[str] = Counter()
        self._received: Counter[str] = Counter()
        self._decode_failures: Counter[str] = Counter()
        self._handled: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._seconds: dict[str, float] = {}
        self._connects = 0
        self._disconnects = 0

    def snapshot(self) -> MetricsSnapshot:
        """Return a copy of the counters as they are now."""
        channels = set(self._published) | set(self._received) | set(self._decode_failures)
        subscriptions = set(self._handled) | set(self._failed)
        return MetricsSnapshot(
            channels={
                c: ChannelStats(self._published[c], self._received[c], self._decode_failures[c])
                for c in sorted(channels)
            },
            subscriptions={
                s: SubscriptionStats(self._handled[s], self._failed[s], self._seconds.get(s, 0.0))
                for s in sorted(subscriptions)
            },
            connects=self._connects,
            disconnects=self._disconnects,
        )

    @hookimpl
    def pgbus_on_published(self, outgoing: Sequence[Outgoing]) -> None:
        """Count published events per channel."""
        for out in outgoing:
            self._published[out.channel] += 1

    @hookimpl
    def pgbus_on_received(self, messages: Sequence[Message]) -> None:
        """Count received notifications per channel."""
        if len(messages) == 1:
            self._received[messages[0].channel] += 1
        else:
            self._received.update(m.channel for m in messages)

    @hookimpl
    def pgbus_on_decode_error(self, message: Message, error: BaseException) -> None:  # noqa: ARG002 - part of the hook's signature
        """Count decode failures per channel."""
        self._decode_failures[message.channel] += 1

    @hookimpl
    def pgbus_on_handled(
        self,
        subscription: Subscription,
        delivery: Delivery,  # noqa: ARG002 - part of the hook's signature
        duration: float,
    ) -> None:
        """Count successful handler runs and their time per subscription."""
        self._handled[subscription.name] += 1
        self._seconds[subscription.name] = self._seconds.get(subscription.name, 0.0) + duration

    @hookimpl
    def pgbus_on_handler_error(
        self,
        subscription: Subscription,
        delivery: Delivery,  # noqa: ARG002 - part of the hook's signature
        error: BaseException,  # noqa: ARG002 - part of the hook's signature
    ) -> None:
        """Count failed handler runs per subscription."""
        self._failed[subscription.name] += 1

    @hookimpl
    def pgbus_on_connect(self, bus: Bus, channels: Sequence[str]) -> None:  # noqa: ARG002 - part of the hook's signature
        """Count listener connections."""
        self._connects += 1

    @hookimpl
    def pgbus_on_disconnect(self, bus: Bus, error: BaseException | None) -> None:  # noqa: ARG002 - part of the hook's signature
        """Count lost listener connections."""
        self._disconnects += 1
