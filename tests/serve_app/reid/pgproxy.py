"""A loopback TCP proxy in front of Postgres that a test can cut and restore (Postgres "down" for one client)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class PgProxy:
    """Forwards 127.0.0.1:<port> to the real Postgres; ``cut()`` closes every connection and refuses new ones."""

    def __init__(self, port: int, *, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.port = port
        self.target = target
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update({writer, up_writer})
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def restore(self) -> None:
        """Accept and forward connections again."""
        self._call(self._start())

    def cut(self) -> None:
        """Close every proxied connection and stop listening."""
        self._call(self._stop())

    def close(self) -> None:
        """Stop the proxy and its thread."""
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
