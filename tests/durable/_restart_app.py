"""A durable consumer process for the restart tests, which SIGKILL it.

Usage: python _restart_app.py DSN SCHEMA CHANNEL NAME [START]. ``START`` is the new
subscription's start position ("earliest", "latest"); with ``APP_NACK=<seconds>`` in the
environment the handler nacks every first attempt with that delay. It prints "ready"
once listening, then one line per handler call, flushed at once:
``<handled|nacked> <n> <attempt> <redelivered> <time.time()>``. The handler returns
``{"n": n, "pid": pid}``, which answers a ``bus.request``.
"""

import asyncio
import os
import sys
import time

import pgbus
from pgbus.durable import DurablePlugin


async def main(dsn: str, schema: str, channel: str, name: str, start: str = "latest") -> None:
    class Ticket(pgbus.Event, channel=channel):
        n: int
        blob: str = ""

    nack = float(os.environ.get("APP_NACK", "0"))
    plugin = DurablePlugin(schema, lease=1.0, poll_interval=0.3, prune_interval=None)
    bus = pgbus.Bus(dsn, load_entrypoints=False, plugins=[plugin])

    @bus.subscribe(Ticket, durable=name, start=start)
    async def handle(event: Ticket, context: pgbus.Context) -> dict[str, int]:
        outcome = "nacked" if nack and context.attempt == 1 else "handled"
        sys.stdout.write(
            f"{outcome} {event.n} {context.attempt} {context.redelivered} {time.time()}\n"
        )
        sys.stdout.flush()
        if outcome == "nacked":
            raise pgbus.Nack(delay=nack)
        return {"n": event.n, "pid": os.getpid()}

    async with bus:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
