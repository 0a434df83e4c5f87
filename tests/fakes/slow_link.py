"""A TCP link with latency: a loopback proxy that delivers every byte, and every close, late.

A server that closes an idle keep-alive connection races a client that has just written a
request on it. On loopback the close reaches the client at once and the race is a matter of
microseconds; across hosts (replicas "wherever the GPUs are") it lasts the round trip. This
link makes that round trip `latency_s` each way, so a test can send a request exactly inside
the window: after `keep_alive - 2 * latency` seconds of idleness the client still sees an open
connection, while the server closes it before the request arrives, and answers it with a reset.
"""
from __future__ import annotations

import asyncio
import contextlib


class SlowLink:
    """`async with SlowLink(target_port, latency_s=0.3) as link:` then use `link.url`."""

    def __init__(self, target_port: int, latency_s: float) -> None:
        self.target_port = target_port
        self.latency_s = latency_s
        self.url = ""
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "SlowLink":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.transport.abort()
            return
        for reader, writer in ((client_r, server_w), (server_r, client_w)):
            task = asyncio.create_task(self._pump(reader, writer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward reader -> writer, each chunk (and the end) `latency_s` after it was read;
        a reset on the way in is passed on as a reset."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes | None]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if data is None:
                    with contextlib.suppress(OSError):
                        writer.close()
                    return
                if data == b"":  # the other side was reset: reset this one
                    writer.transport.abort()
                    return
                try:
                    writer.write(data)
                    await writer.drain()
                except (ConnectionError, OSError):
                    return

        sender = asyncio.create_task(deliver())
        try:
            while True:
                try:
                    data = await reader.read(65536)
                except (ConnectionError, OSError):
                    queue.put_nowait((loop.time() + self.latency_s, b""))
                    break
                queue.put_nowait((loop.time() + self.latency_s, data or None))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()
