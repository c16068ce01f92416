"""``pgbus run`` and ``Bus.run_forever()`` as services: real signals on real subprocesses."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import textwrap
from typing import TYPE_CHECKING

import pytest

import pgbus

if TYPE_CHECKING:
    from pathlib import Path

APP = """
    import asyncio, logging, os, sys
    import pgbus

    class Job(pgbus.Event, channel=os.environ["APP_CHANNEL"]):
        n: int
        seconds: float = 0.0
        block: bool = False

    bus = pgbus.Bus(load_entrypoints=False)

    @bus.subscribe(Job)
    async def work(job: Job) -> None:
        print(f"start {job.n}", file=sys.stderr, flush=True)
        if job.block:
            await asyncio.Event().wait()
        await asyncio.sleep(job.seconds)  # the work
        print(f"done {job.n}", file=sys.stderr, flush=True)

    def make_bus():
        return bus

    async def amake_bus():
        return bus

    not_a_bus = 42

    if __name__ == "__main__":
        logging.basicConfig(level=logging.INFO)
        asyncio.run(bus.run_forever())
"""


@pytest.fixture
def app(tmp_path: Path, channel: str) -> type[pgbus.Event]:
    """A module ``app`` in the subprocesses' directory, and its event type (on ``channel``)."""
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))

    class Job(pgbus.Event, channel=channel):
        n: int
        seconds: float = 0.0
        block: bool = False

    return Job


@pytest.fixture
async def publisher(make_bus):
    """A started bus to publish jobs with."""
    async with make_bus() as bus:
        yield bus


async def test_sigterm_drains_queued_handlers_and_exits_0(spawn, app, publisher, pg_dsn, channel):
    """SIGTERM stops listening, lets the running and queued handlers finish, and exits 0."""
    worker = await spawn("run", "app:bus", PGBUS_DSN=pg_dsn, APP_CHANNEL=channel)
    await worker.until("bus listening on")
    await publisher.publish_many([app(n=i, seconds=0.2) for i in range(3)])
    await worker.until("start 0")
    worker.signal(signal.SIGTERM)
    code, _, err = await worker.finish()
    assert code == 0, err
    assert "SIGTERM: stopping…" in err
    assert [line for line in err.splitlines() if line.startswith("done")] == [
        "done 0",
        "done 1",
        "done 2",
    ]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_a_second_signal_stops_at_once(
    spawn, app, publisher, pg_dsn, channel, signum, status
):
    """A second signal abandons what is still running, says so, and exits 128 + signal."""
    worker = await spawn("run", "app:bus", PGBUS_DSN=pg_dsn, APP_CHANNEL=channel)
    await worker.until("bus listening on")
    await publisher.publish_many([app(n=0, block=True), app(n=1)])
    await worker.until("start 0")
    worker.signal(signum)
    await worker.until("stopping…")
    worker.signal(signum)
    code, _, err = await worker.finish()
    assert code == status, err
    assert "stopping at once; 2 queued or running deliveries abandoned" in err


@pytest.mark.parametrize("target", ["app:make_bus", "app:amake_bus"])
async def test_run_takes_a_function_returning_a_bus(spawn, app, pg_dsn, channel, target):
    """ATTR may be a function, sync or async, that returns the Bus; SIGINT then exits 0."""
    worker = await spawn("run", target, PGBUS_DSN=pg_dsn, APP_CHANNEL=channel)
    await worker.until(f"serving {target}")
    await worker.until("bus listening on")
    worker.signal(signal.SIGINT)
    code, _, err = await worker.finish()
    assert code == 0, err


async def test_run_takes_the_dsn_as_an_option(spawn, app, pg_dsn, channel):
    """`pgbus run --dsn DSN` names the database of a bus built without one."""
    worker = await spawn("run", "app:bus", "--dsn", pg_dsn, APP_CHANNEL=channel)
    await worker.until("bus listening on")
    worker.signal(signal.SIGTERM)
    code, _, err = await worker.finish()
    assert code == 0, err


async def test_run_refuses_what_is_not_a_bus(spawn, app, channel):
    """A target that is not a Bus is one line on stderr and status 1."""
    worker = await spawn("run", "app:not_a_bus", APP_CHANNEL=channel)
    code, _, err = await worker.finish()
    assert code == 1
    assert err.strip() == "Error: app:not_a_bus is not a pgbus.Bus nor a callable returning one"


async def test_run_without_a_database_names_the_ways(spawn, app, channel):
    """With no --dsn, PGBUS_DSN or libpq variable, one line says how to name the database."""
    env = dict.fromkeys(("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"), "")
    worker = await spawn("run", "app:bus", APP_CHANNEL=channel, **env)
    code, _, err = await worker.finish()
    assert code == 1
    assert "no database: pass a DSN to Bus(), set PGBUS_DSN, or set the libpq" in err


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_health_endpoints(spawn, app, publisher, pg_dsn, channel):
    """--health serves /livez, /readyz (from bus.ready) and Prometheus /metrics."""
    worker = await spawn(
        "run", "app:bus", "--health", "127.0.0.1:0", PGBUS_DSN=pg_dsn, APP_CHANNEL=channel
    )
    line = await worker.until("health on http://")
    port = int(re.search(r":(\d+) ", line)[1])  # type: ignore[index]
    await worker.until("bus listening on")
    await publisher.publish(app(n=0))
    await worker.until("done 0")
    assert await _get(port, "/livez") == (200, "ok\n")
    assert await _get(port, "/readyz") == (200, "ready\n")
    status, metrics = await _get(port, "/metrics")
    assert status == 200
    assert "pgbus_ready 1" in metrics
    assert 'pgbus_subscription_handled_total{subscription="work"} 1' in metrics
    assert (await _get(port, "/nope"))[0] == 404
    worker.signal(signal.SIGTERM)
    assert (await worker.finish())[0] == 0


async def test_workers_are_supervised_and_restarted(spawn, app, pg_dsn, channel):
    """--workers 2 runs two workers (on --dsn); one that dies is restarted; SIGTERM: exit 0."""
    supervisor = await spawn(
        "run", "app:bus", "--workers", "2", "--dsn", pg_dsn, APP_CHANNEL=channel
    )
    pids = {}
    for _ in range(2):
        found = re.search(r"worker (\d) started \(pid (\d+)\)", await supervisor.until("started"))
        assert found is not None
        pids[found[1]] = int(found[2])
    assert set(pids) == {"0", "1"}
    os.kill(pids["1"], signal.SIGKILL)
    await supervisor.until("worker 1 (pid")
    assert "exited with status -9" in supervisor.seen[-1]
    await supervisor.until("worker 1 started")
    await supervisor.until("bus listening on")
    supervisor.signal(signal.SIGTERM)
    code, _, err = await supervisor.finish()
    assert code == 0, err
    assert "SIGTERM: stopping 2 workers…" in err


async def test_reload_restarts_the_worker_when_a_file_changes(
    spawn, app, pg_dsn, channel, tmp_path
):
    """--reload restarts the worker after a .py file in the directory changes."""
    supervisor = await spawn("run", "app:bus", "--reload", PGBUS_DSN=pg_dsn, APP_CHANNEL=channel)
    await supervisor.until("worker 0 started")
    await supervisor.until("bus listening on")
    stat = (tmp_path / "app.py").stat()
    os.utime(tmp_path / "app.py", (stat.st_atime, stat.st_mtime + 10))
    await supervisor.until("reload: app.py changed")
    await supervisor.until("worker 0 started")
    await supervisor.until("bus listening on")
    supervisor.signal(signal.SIGINT)
    code, _, err = await supervisor.finish()
    assert code == 0, err


async def test_run_forever_handles_sigterm(spawn, app, publisher, pg_dsn, channel):
    """A program that calls bus.run_forever() drains and exits 0 on SIGTERM too."""
    program = await spawn("app.py", python=True, PGBUS_DSN=pg_dsn, APP_CHANNEL=channel)
    await program.until("bus listening on 1 channel at")
    await publisher.publish_many([app(n=0, seconds=0.2), app(n=1)])
    await program.until("start 0")
    program.signal(signal.SIGTERM)
    code, _, err = await program.finish()
    assert code == 0, err
    assert "done 0" in err
    assert "done 1" in err
