"""The worker: handles every OrderPlaced that any process publishes, until stopped.

Ctrl-C or `kill -TERM` (what Docker, systemd and Kubernetes send) stop it cleanly: it
stops listening, finishes the handlers already running or queued, and exits 0.
`pgbus run worker:bus` serves the same bus without main().

export PGBUS_DSN=postgresql://postgres@127.0.0.1:5432/postgres
python examples/two_processes/worker.py      # in one terminal
python examples/two_processes/publisher.py   # in another
"""

import asyncio

from events import OrderPlaced

import pgbus

bus = pgbus.Bus()  # the database comes from $PGBUS_DSN


@bus.subscribe
async def on_order(event: OrderPlaced) -> None:
    print(f"worker: order {event.order_id} for {event.total}", flush=True)


async def main() -> None:
    await bus.start()
    print(f"worker: listening on {', '.join(bus.channels)}", flush=True)
    await bus.run_forever()  # until SIGTERM or Ctrl-C (drained), or the bus gives up


if __name__ == "__main__":
    asyncio.run(main())
