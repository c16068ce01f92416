"""The worker: handles every OrderPlaced that any process publishes, until Ctrl-C.

export PGBUS_DSN=postgresql://postgres@127.0.0.1:5432/postgres
python examples/two_processes/worker.py      # in one terminal
python examples/two_processes/publisher.py   # in another
"""

import asyncio
import contextlib

from events import OrderPlaced

import pgbus

bus = pgbus.Bus()  # the database comes from $PGBUS_DSN


@bus.subscribe
async def on_order(event: OrderPlaced) -> None:
    print(f"worker: order {event.order_id} for {event.total}", flush=True)


async def main() -> None:
    async with bus:
        print(f"worker: listening on {', '.join(bus.channels)}", flush=True)
        await bus.wait_closed()  # serve until cancelled (Ctrl-C) or the bus gives up


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
