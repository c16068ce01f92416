"""A durable subscription served by ``pgbus run`` loses nothing to a SIGTERM and a restart."""

from __future__ import annotations

import signal
import textwrap
from typing import TYPE_CHECKING

from _helpers import ticket_type

if TYPE_CHECKING:
    from pathlib import Path

APP = """
    import asyncio, os, sys
    import pgbus
    from pgbus.durable import DurablePlugin

    class Ticket(pgbus.Event, channel=os.environ["APP_CHANNEL"]):
        n: int
        blob: str = ""

    bus = pgbus.Bus(load_entrypoints=False, plugins=[DurablePlugin(os.environ["APP_SCHEMA"])])

    @bus.subscribe(Ticket, durable="billing")
    async def bill(ticket: Ticket) -> None:
        print(f"start {ticket.n}", file=sys.stderr, flush=True)
        if ticket.blob == "block" and not os.environ.get("APP_UNBLOCK"):
            await asyncio.Event().wait()
        print(f"done {ticket.n}", file=sys.stderr, flush=True)
"""


async def test_unfinished_durable_events_are_handled_after_a_restart(
    spawn, durable_bus, pg_dsn, schema, channel, tmp_path: Path
):
    """Events a SIGTERM left unfinished are handed back and handled by the next process."""
    (tmp_path / "billing.py").write_text(textwrap.dedent(APP))
    env = {"PGBUS_DSN": pg_dsn, "APP_CHANNEL": channel, "APP_SCHEMA": schema}
    ticket = ticket_type(channel)
    first = await spawn("run", "billing:bus", "--stop-timeout", "0.5", **env)
    await first.until("bus listening on")
    publisher = durable_bus()
    await publisher.publish_many([ticket(n=0), ticket(n=1, blob="block"), ticket(n=2)])
    await first.until("start 1")
    first.signal(signal.SIGTERM)
    code, _, err = await first.finish()
    assert code == 0, err
    assert "done 0" in err
    assert "done 1" not in err
    assert "unfinished events handed back" in err
    second = await spawn("run", "billing:bus", APP_UNBLOCK="1", **env)
    await second.until("done 2")
    second.signal(signal.SIGTERM)
    code, _, err = await second.finish()
    assert code == 0, err
    started = [line for line in err.splitlines() if line.startswith("start")]
    assert started == ["start 1", "start 2"]
