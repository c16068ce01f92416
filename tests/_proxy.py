"""A small asyncio TCP proxy that injects network faults between a client and PostgreSQL.

Controls, all changeable while connections are live:

* :meth:`TcpProxy.cut` aborts every live connection pair (RST, or FIN with ``rst=False``);
* :attr:`TcpProxy.blackhole` reads and discards bytes in both directions while keeping
  the sockets open: a half-open peer that no TCP keepalive of the client can detect;
* :attr:`TcpProxy.refuse` accepts new connections and closes them at once;
* :attr:`TcpProxy.latency` delays each forwarded chunk, keeping the order.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_CHUNK = 64 * 1024


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Close a stream at once: with RST (``SO_LINGER`` 0) or with FIN."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


@dataclass(eq=False)
class _Pair:
    """A client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def abort(self, *, rst: bool) -> None:
        _abort(self.client, rst=rst)
        _abort(self.upstream, rst=rst)
        self.done.set()


class TcpProxy:
    """Forward TCP connections from ``127.0.0.1:<port>`` to ``target_host:target_port``.

    :param target_host: the upstream host.
    :param target_port: the upstream port.
    :param connect_timeout: seconds allowed to connect upstream for each client.
    """

    def __init__(self, target_host: str, target_port: int, *, connect_timeout: float = 5.0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self.blackhole = False
        self.refuse = False
        self.latency = 0.0
        self.host = "127.0.0.1"
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._port is None:
            raise RuntimeError("the proxy has not been started")
        return self._port

    @property
    def connections(self) -> int:
        """The number of live client/upstream pairs."""
        return len(self._pairs)

    async def wait_idle(self) -> None:
        """Wait until no connection pair is live (wrap it in a timeout)."""
        await self._idle.wait()

    async def start(self) -> None:
        """Listen on a free port of ``127.0.0.1``."""
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self._port = self._server.sockets[0].getsockname()[1]

    def dsn_for(self, dsn: str) -> str:
        """Rewrite ``dsn`` so that it connects through the proxy.

        :param dsn: a ``postgresql://`` URI; its user, password, database and other
            parameters are kept, its host and port replaced.
        :returns: the rewritten URI.
        """
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{self.host}:{self.port}" if userinfo else f"{self.host}:{self.port}"
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in {"host", "port"}]
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query)))

    def cut(self, rst: bool = True) -> None:
        """Abort every live connection pair.

        :param rst: send RST (a crash or a firewall) rather than FIN (a clean close).
        """
        for pair in list(self._pairs):
            pair.abort(rst=rst)

    async def close(self) -> None:
        """Stop listening, abort every pair and wait for the handlers to finish."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        self.cut(rst=False)
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse or self._closing:
            _abort(writer, rst=False)
            return
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port),
                self.connect_timeout,
            )
        except (OSError, TimeoutError):
            _abort(writer, rst=True)
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        self._idle.clear()
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, pair)),
            asyncio.create_task(self._pump(up_reader, writer, pair)),
        ]
        try:
            await pair.done.wait()
        finally:
            self._pairs.discard(pair)
            if not self._pairs:
                self._idle.set()
            pair.abort(rst=False)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for stream in (writer, up_writer):
                with contextlib.suppress(OSError):
                    await stream.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        try:
            while chunk := await reader.read(_CHUNK):
                if self.latency > 0:
                    await asyncio.sleep(self.latency)
                if self.blackhole:
                    continue
                writer.write(chunk)
                await writer.drain()
        except OSError:
            pass
        finally:
            pair.done.set()
