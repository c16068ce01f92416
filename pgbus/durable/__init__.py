"""Durable delivery: a journal table, durable subscriptions, consumer groups, dead letters.

Plain NOTIFY is at-most-once: what is published while a listener is away is lost. The
``durable`` plugin makes delivery at-least-once with de-duplication by event id, while
NOTIFY stays the low-latency wake-up::

    bus = pgbus.Bus(dsn, durable=True)      # or plugins=[pgbus.durable.DurablePlugin()]

    @bus.subscribe(OrderPlaced, durable="billing")
    async def bill(event: OrderPlaced) -> None: ...

    await bus.migrate()                     # once, or `pgbus migrate`
    async with bus:
        await bus.publish(OrderPlaced(order_id=1))

On a ``memory://`` bus, ``durable=True`` registers :class:`MemoryDurablePlugin`: the
same behaviour, with the journal kept in the process (for tests).

See ``docs/durable.md`` for the guarantees, the ordering rules and the numbers.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from pgbus.durable._dead_letters import (
    StoredDeadLetter,
    discard,
    list_dead_letters,
    redeliver,
)
from pgbus.durable._memory import MemoryDurablePlugin
from pgbus.durable._plugin import DEFAULT_RETENTION, DurablePlugin
from pgbus.durable._schema import (
    DEFAULT_SCHEMA,
    SCHEMA_VERSION,
    SchemaError,
    check_schema,
    migrate,
    schema_version,
)
from pgbus.durable._subscriptions import (
    DurableSubscription,
    drop_subscription,
    list_subscriptions,
    seek,
)

__all__ = [
    "DEFAULT_RETENTION",
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "DurablePlugin",
    "DurableSubscription",
    "MemoryDurablePlugin",
    "SchemaError",
    "StoredDeadLetter",
    "check_schema",
    "discard",
    "drop_subscription",
    "list_dead_letters",
    "list_subscriptions",
    "migrate",
    "redeliver",
    "schema_version",
    "seek",
]
