"""A NATS server with JetStream for the relay's tests: the machine's, or one of their own.

:func:`running_nats` finds one already answering with JetStream on 127.0.0.1:4222;
:class:`NatsServer` starts Debian's ``nats-server -js`` on a free port with a temporary
store, and can stop, kill and start it again on the same store (the fault tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from typing import TYPE_CHECKING

import nats
import pytest
from relay_helpers import free_port, in_ci

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

#: Where Debian's package installs it (not on a normal user's PATH).
DEBIAN_BINARY = "/usr/sbin/nats-server"


def nats_binary() -> str:
    """``nats-server``'s path; skips the test (fails it in CI) when there is none."""
    found = shutil.which("nats-server") or (
        DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None
    )
    if found is None:
        reason = "nats-server is not installed (apt-get install nats-server)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    return found


async def has_jetstream(url: str, timeout: float = 2.0) -> bool:
    """Whether a NATS server with JetStream answers at ``url``."""
    try:
        nc = await nats.connect(url, connect_timeout=timeout, allow_reconnect=False)
    except (nats.errors.Error, OSError, TimeoutError):
        return False
    try:
        await nc.jetstream(timeout=timeout).account_info()
    except (nats.errors.Error, OSError, TimeoutError):
        return False
    finally:
        await nc.close()
    return True


def running_nats() -> str | None:
    """``nats://127.0.0.1:4222`` if a server with JetStream answers there, else ``None``."""
    url = "nats://127.0.0.1:4222"
    return url if asyncio.run(has_jetstream(url)) else None


class NatsServer:
    """``nats-server -js`` of a test's own, on one port and one store across restarts."""

    def __init__(self, workdir: Path, port: int | None = None, args: Sequence[str] = ()) -> None:
        self.binary = nats_binary()
        self.args = list(args)  # more options: --user U --pass P, --auth TOKEN
        self.port = port or free_port()
        self.store = workdir / "jetstream"
        self.log = workdir / "nats-server.log"
        self.url = f"nats://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._drainer: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> NatsServer:
        """Start it, and return once it is ready (JetStream included)."""
        argv = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        argv += self.args
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._proc = proc
        assert proc.stderr is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while b"Server is ready" not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                self.kill()
                raise RuntimeError(f"nats-server did not start:\n{seen.decode(errors='replace')}")
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                chunk = os.read(proc.stderr.fileno(), 65536)
                if not chunk:
                    continue
                seen += chunk
        self.log.write_bytes(seen)
        self._drainer = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        self._drainer.start()
        return self

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        """Copy its log to :attr:`log`, so that it never blocks on a full pipe."""
        assert proc.stderr is not None
        with self.log.open("ab") as log, contextlib.suppress(OSError, ValueError):
            for line in proc.stderr:
                log.write(line)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop it gracefully (SIGTERM) and wait."""
        self._end(signal.SIGTERM, timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """Kill it (SIGKILL) and wait."""
        self._end(signal.SIGKILL, timeout)

    def _end(self, sig: signal.Signals, timeout: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        proc.wait(timeout)
        if self._drainer is not None:
            self._drainer.join(timeout)
        if proc.stderr is not None:
            proc.stderr.close()


class StreamReader:
    """Every message of ``subject`` in ``stream``, from the first, as it arrives."""

    def __init__(self, nc: Client, stream: str, subject: str) -> None:
        self.js = nc.jetstream()
        self.stream, self.subject = stream, subject
        self.messages: list[Msg] = []
        self._sub: JetStreamContext.PushSubscription | None = None

    async def take(self, count: int, timeout: float = 30.0) -> list[Msg]:
        """Wait until ``count`` messages came (in all), and return them all."""
        if self._sub is None:
            await self.wait_for_stream(timeout)
            self._sub = await self.js.subscribe(
                self.subject, stream=self.stream, ordered_consumer=True
            )

        async def fill() -> None:
            assert self._sub is not None
            while len(self.messages) < count:
                self.messages.append(await self._sub.next_msg(timeout))

        await asyncio.wait_for(fill(), timeout)
        return self.messages

    async def wait_for_stream(self, timeout: float) -> None:
        """Wait until the relay created the stream."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                await self.js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
            else:
                return

    async def count(self) -> int:
        """How many messages the stream holds."""
        info = await self.js.stream_info(self.stream)
        return int(info.state.messages)
