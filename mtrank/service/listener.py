"""The listening socket, and an event loop that accepts every pending connection when it is readable.

libuv (under uvloop) accepts one connection per event-loop iteration since version 1.45. When the
loop is busy, an iteration runs every request callback that became ready, 20-50 ms of work here at
900 requests/s of 20 candidates, so new connections were accepted at 20-50 per second while the
clients opened them faster: 114 connections waited in the kernel's accept queue, their requests
(already sent) sat there up to 3 s, and p99 at 70 % of capacity was 50 × p50. ``Loop`` gives
uvicorn a server that accepts all pending connections (up to :data:`ACCEPT_BURST`) per wake-up, as
asyncio's own loop does, and hands each to uvloop as an accepted socket.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

try:
    import uvloop
except ImportError:
    uvloop = None

log = logging.getLogger("mtrank.listener")

ACCEPT_BURST = 512
"""Most connections accepted per wake-up of the listening socket."""
BACKLOG = 2048
"""The kernel's queue of connections not yet accepted (capped by net.core.somaxconn)."""
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
PAUSE_S = 1.0
"""How long accepting pauses when the process is out of file descriptors or memory."""


def listening_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """A non-blocking TCP socket listening on host:port; ``reuse_port``: other processes bind it too
    (the kernel spreads connections over them). Raises OSError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class AcceptingServer:
    """What ``create_server(sock=...)`` returns here: accepts in bursts, serves each connection with
    ``protocol_factory`` through ``loop.connect_accepted_socket``. The socket is the caller's to close."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol_factory: Callable[[], asyncio.BaseProtocol],
                 sock: socket.socket):
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.sock = sock
        self.serving = True
        self.connections: set[asyncio.Task] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self.sock,)

    def is_serving(self) -> bool:
        return self.serving

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_RESOURCES:
                    log.warning("not accepting connections for %.0f s: %s", PAUSE_S, e)
                    self.loop.remove_reader(self.sock.fileno())
                    self.loop.call_later(PAUSE_S, self._resume)
                    return
                continue  # the client went away before the accept (ECONNABORTED and the like)
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._serve(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    def _resume(self) -> None:
        if self.serving:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as e:  # the connection failed before its protocol started: nothing to answer
            log.debug("dropped a connection at accept: %s", e)
            conn.close()

    def close(self) -> None:
        if self.serving:
            self.serving = False
            self.loop.remove_reader(self.sock.fileno())

    async def wait_closed(self) -> None:
        return None


if uvloop is not None:

    class Loop(uvloop.Loop):
        """uvloop's loop, whose servers on a given socket accept in bursts (:class:`AcceptingServer`)."""

        async def create_server(self, protocol_factory, host=None, port=None, *, sock=None, ssl=None,
                                **kwargs):  # noqa: ANN001, ANN202 - asyncio's signature
            if sock is None or ssl is not None:
                return await super().create_server(protocol_factory, host, port, sock=sock, ssl=ssl, **kwargs)
            return AcceptingServer(self, protocol_factory, sock)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the service runs on: :class:`Loop`; None (asyncio's own, which accepts in
    bursts already) when uvloop is not installed."""
    return Loop if uvloop is not None else None
