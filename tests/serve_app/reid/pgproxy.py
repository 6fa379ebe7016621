"""A loopback TCP proxy in front of Postgres that a test can cut and restore (Postgres "down" for one client).

It can also break the next COMMIT a client sends, so that the client cannot know whether it landed:
``lost_after`` forwards it, lets Postgres commit and answer, then drops the connection before the answer
reaches the client; ``lost_before`` drops the connection without forwarding it (nothing commits);
``stall`` forwards it and withholds the answer, leaving the connection open (the client times out).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from tests.tcp_proxy import LoopbackProxy

CommitFault = Literal["lost_after", "lost_before", "stall"]

# A simple-protocol Query message carrying exactly "COMMIT" (psycopg's transaction blocks end with one).
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"


class _Link:
    """One proxied client connection and what a commit fault has done to it."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client, self.upstream = client, upstream
        self.fault: CommitFault | None = None


class PgProxy(LoopbackProxy):
    """Forwards 127.0.0.1:<port> to the real Postgres; ``cut()`` closes every connection and refuses new ones."""

    def __init__(self, port: int, *, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        super().__init__(port, target=target)
        self._commit_faults: list[CommitFault] = []
        self.commit_faults_done = 0
        self.restore()

    async def _client_to_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            while data := await reader.read(65536):
                if COMMIT_MESSAGE in data and self._commit_faults:
                    link.fault = self._commit_faults.pop(0)
                    if link.fault == "lost_before":
                        self.commit_faults_done += 1
                        break
                link.upstream.write(data)
                await link.upstream.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.upstream.close()
            if link.fault == "lost_before":
                link.client.close()

    async def _server_to_client(self, reader: asyncio.StreamReader, link: _Link) -> None:
        try:
            while data := await reader.read(65536):
                if link.fault in ("lost_after", "stall"):
                    # The COMMIT's answer: Postgres has committed; the client never hears of it.
                    self.commit_faults_done += 1
                    if link.fault == "lost_after":
                        link.upstream.close()
                        break
                    continue
                link.client.write(data)
                await link.client.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            link.client.close()

    async def _relay(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        link = _Link(client[1], upstream[1])
        await asyncio.gather(self._client_to_server(client[0], link), self._server_to_client(upstream[0], link))

    async def _add_fault(self, fault: CommitFault) -> None:
        self._commit_faults.append(fault)

    def restore(self) -> None:
        """Accept and forward connections again."""
        self.listen()

    def break_next_commit(self, fault: CommitFault) -> None:
        """Break the next COMMIT any client sends through the proxy (``commit_faults_done`` counts those done)."""
        self._call(self._add_fault(fault))
