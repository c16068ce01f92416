"""Every program in examples/ runs, as a user would run it, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _helpers import Process

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
#: Examples that need more than `python FILE` (a server, a second process): tested below.
SPECIAL = {"fastapi_app.py"}


def _env(dsn: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PGBUS_DSN"] = dsn
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


@pytest.fixture
async def start(pg_dsn: str) -> AsyncIterator[Callable[..., object]]:
    procs: list[asyncio.subprocess.Process] = []

    async def run(*args: str, cwd: Path = EXAMPLES) -> Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
            env=_env(pg_dsn),
        )
        procs.append(proc)
        return Process(proc)

    yield run
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    "example",
    sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SPECIAL),
)
def test_example_runs(example: str, pg_dsn: str) -> None:
    """`python examples/FILE.py` finishes on its own with status 0."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / example)],
        env=_env(pg_dsn),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


async def test_two_processes_publisher_and_worker(start) -> None:
    """Orders sent by publisher.py reach worker.py, a separate process; SIGTERM stops it (0)."""
    worker = await start("worker.py", cwd=EXAMPLES / "two_processes")
    await worker.until("worker: listening on orders", stream="stdout")
    publisher = await start("publisher.py", "3", cwd=EXAMPLES / "two_processes")
    await publisher.until("publisher: sent order 3", stream="stdout")
    for n in (1, 2, 3):
        line = await worker.until(f"worker: order {n} for", stream="stdout")
        assert line.strip().endswith(f"{9.90 * n:.2f}")
    assert await asyncio.wait_for(publisher.proc.wait(), 20) == 0
    assert await worker.stop(signal.SIGTERM) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_fastapi_app_publishes_and_streams_events(start) -> None:
    """POST /orders publishes; GET /events streams the order to the browser over SSE."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    port = _free_port()
    app = await start(
        "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_app:app", "--port", str(port)
    )
    await app.until("Application startup complete")
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        assert (await client.get("/ready")).json() == {"listening": True}
        assert "EventSource" in (await client.get("/")).text
        async with client.stream("GET", "/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            lines = stream.aiter_lines()

            async def next_event() -> tuple[str, str]:
                event = data = ""
                async for line in lines:
                    if line.startswith("event: "):
                        event = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        data = line.removeprefix("data: ")
                    elif not line and event:
                        return event, data
                raise AssertionError("the stream ended")

            assert (await asyncio.wait_for(next_event(), 10))[0] == "ready"
            posted = await client.post("/orders", json={"order_id": 7, "item": "tea"})
            assert posted.status_code == 202
            assert len(posted.json()["id"]) == 32
            event, data = await asyncio.wait_for(next_event(), 10)
        assert event == "OrderPlaced"
        assert json.loads(data) == {"order_id": 7, "item": "tea"}
        bad = await client.post("/orders", json={"order_id": "x"})
        assert bad.status_code == 422
    # uvicorn shuts down gracefully (the lifespan stops the bus), then re-raises SIGTERM
    assert await app.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    await app.until("Application shutdown complete")


@pytest.fixture(scope="session")
def installed_audit_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install examples/plugin_package into a private directory, as a user would."""
    target = tmp_path_factory.mktemp("audit_site")
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
            "--target", str(target), str(EXAMPLES / "plugin_package"),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )  # fmt: skip
    return target


def _with_plugin(pg_dsn: str, site: Path) -> dict[str, str]:
    env = _env(pg_dsn)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    env.pop("PGBUS_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def test_plugin_package_is_found_through_its_entry_point(
    installed_audit_plugin: Path, pg_dsn: str
) -> None:
    """Once installed, the example plugin shows in `pgbus plugins` as an entry point."""
    result = subprocess.run(
        [sys.executable, "-m", "pgbus", "plugins", "--json"],
        env=_with_plugin(pg_dsn, installed_audit_plugin),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["audit"]["source"] == "entry point"
    assert rows["audit"]["distribution"] == "pgbus-audit 0.1.0"
    assert rows["audit"]["hooks"] == ["pgbus_on_handled", "pgbus_on_published"]


AUDITED = """
import asyncio, logging, sys
import pgbus

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
logging.getLogger("pgbus").setLevel(logging.WARNING)

async def main():
    bus = pgbus.Bus()  # entry points load by default
    done = asyncio.Event()
    bus.subscribe(sys.argv[1], name="audited")(lambda message: done.set())
    async with bus:
        await bus.notify(sys.argv[1], "hello")
        await asyncio.wait_for(done.wait(), 10)

asyncio.run(main())
"""


def test_plugin_package_hooks_run_in_every_bus(
    installed_audit_plugin: Path, pg_dsn: str, channel: str
) -> None:
    """A Bus loads the installed plugin and its hooks log what was published and handled."""
    result = subprocess.run(
        [sys.executable, "-c", AUDITED, channel],
        env=_with_plugin(pg_dsn, installed_audit_plugin),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"pgbus_audit: published a raw payload on {channel}" in result.stdout
    assert f"pgbus_audit: audited handled a raw payload on {channel}" in result.stdout
