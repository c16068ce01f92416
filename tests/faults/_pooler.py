"""A proxy that behaves like a transaction-pooling PgBouncer for LISTEN: it drops every
notification (``NotificationResponse``, message type ``A``) the server sends.

Behind PgBouncer with ``pool_mode=transaction``, LISTEN runs on whichever server
connection the statement got, and notifications never reach the client that asked for
them. Dropping them in the protocol gives the same symptom without installing PgBouncer.
The client must not use TLS (``sslmode=disable``), so that the stream can be parsed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Self
from urllib.parse import urlsplit, urlunsplit

_HEADER = 5  # type byte + int32 length (which counts itself)


class NotificationDroppingProxy:
    """Forward ``127.0.0.1:<port>`` to ``host:port``, minus server notifications."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.drop = True
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def dsn_for(self, dsn: str) -> str:
        """``dsn`` through this proxy, without TLS."""
        parts = urlsplit(dsn)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc, query="sslmode=disable"))

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers.add(up_writer)
        pumps = [
            asyncio.create_task(self._raw(reader, up_writer)),
            asyncio.create_task(self._messages(up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            up_writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()

    async def _messages(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(_HEADER)
                body = await reader.readexactly(int.from_bytes(header[1:], "big") - 4)
                if self.drop and header[:1] == b"A":
                    self.dropped += 1
                    continue
                writer.write(header + body)
                await writer.drain()
