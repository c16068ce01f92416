"""pgbus-relay: forward pgbus's durable journal to Kafka and NATS JetStream.

The transactional outbox, in one command: events are committed with the business data
(``Bus(dsn, durable=True)``), and the relay, a durable consumer of the journal, sends
each to the broker and moves its position only once the broker acknowledged it::

    bus = pgbus.Bus(dsn, durable=True)
    pgbus_relay.Relay(bus, to="kafka://127.0.0.1:9092", channels=["orders"], key="order_id")
    await bus.run_forever()

or ``pgbus relay --to kafka://127.0.0.1:9092 --channel orders --key order_id``, and
``pgbus relay status``. Brokers: ``kafka://`` (extra ``kafka``, aiokafka) and
``nats://host:port?stream=NAME`` (extra ``nats``, nats-py); another is one
:class:`Backend` class and :func:`register_backend`. See ``docs/plugins/relay.md``.

Names are imported on first use, so that ``pgbus --help`` (which lists ``relay``)
stays light.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from pgbus_relay._backends import (
        Backend,
        BrokerMisconfigured,
        BrokerRejected,
        BrokerUnavailable,
        Record,
        public_url,
        register_backend,
    )
    from pgbus_relay._prometheus import RelayCollector
    from pgbus_relay._relay import Relay
    from pgbus_relay._status import RelayStatus, relay_status

_LAZY = {
    "Backend": "pgbus_relay._backends",
    "BrokerMisconfigured": "pgbus_relay._backends",
    "BrokerRejected": "pgbus_relay._backends",
    "BrokerUnavailable": "pgbus_relay._backends",
    "Record": "pgbus_relay._backends",
    "Relay": "pgbus_relay._relay",
    "RelayCollector": "pgbus_relay._prometheus",
    "RelayStatus": "pgbus_relay._status",
    "public_url": "pgbus_relay._backends",
    "register_backend": "pgbus_relay._backends",
    "relay_status": "pgbus_relay._status",
}

__all__ = [
    "Backend",
    "BrokerMisconfigured",
    "BrokerRejected",
    "BrokerUnavailable",
    "Record",
    "Relay",
    "RelayCollector",
    "RelayStatus",
    "public_url",
    "register_backend",
    "relay_status",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pgbus_relay' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
