"""A loopback TCP proxy on its own event-loop thread: the plumbing the Postgres fault proxies share."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import threading
from typing import Any


class LoopbackProxy(abc.ABC):
    """Forwards 127.0.0.1:<port> to ``target``; subclasses decide what ``_relay`` does with each connection."""

    def __init__(self, port: int, *, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.port = port
        self.target = target
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    @abc.abstractmethod
    async def _relay(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        """Carry one connection's bytes between ``client`` and ``upstream`` (with the subclass's faults)."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})
        await self._relay((reader, writer), (up_reader, up_writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.close()
        self._writers.clear()

    def listen(self) -> None:
        """Accept and forward connections."""
        self._call(self._start())

    def cut(self) -> None:
        """Close every proxied connection and stop listening."""
        self._call(self._stop())

    def close(self) -> None:
        """Stop the proxy, its thread and its event loop."""
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
