"""A loopback TCP proxy in front of Postgres that delays every answer: a slow database for one client."""

from __future__ import annotations

import asyncio

from tests.tcp_proxy import LoopbackProxy


class LatencyProxy(LoopbackProxy):
    """Forwards 127.0.0.1:<port> to Postgres; each chunk the server sends reaches the client ``delay_s`` later."""

    def __init__(self, port: int, *, delay_s: float, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        super().__init__(port, target=target)
        self.delay_s = delay_s
        self.listen()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delay_s: float) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self.loop.time() + delay_s, data))
            queue.put_nowait((0.0, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            writer.close()

    async def _relay(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        await asyncio.gather(
            self._pipe(client[0], upstream[1], delay_s=0.0), self._pipe(upstream[0], client[1], delay_s=self.delay_s)
        )
