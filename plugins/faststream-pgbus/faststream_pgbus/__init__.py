"""A FastStream broker on PostgreSQL LISTEN/NOTIFY, through pgbus.

::

    broker = PgbusBroker("postgresql://localhost/app")
    app = FastStream(broker)

    @broker.subscriber("orders")
    async def on_order(order: Order) -> None: ...
"""

from faststream_pgbus._broker import (
    PgbusBroker,
    PgbusMessage,
    PgbusPublisher,
    PgbusRouter,
    PgbusSubscriber,
)
from faststream_pgbus.testing import TestPgbusBroker

__all__ = [
    "PgbusBroker",
    "PgbusMessage",
    "PgbusPublisher",
    "PgbusRouter",
    "PgbusSubscriber",
    "TestPgbusBroker",
]
