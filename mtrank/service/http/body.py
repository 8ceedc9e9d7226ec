"""Receiving a request's body: within the request's deadline (:class:`BodyDeadline`, else a 408)
and the size limit (:func:`read_body`, else a 413)."""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive

from mtrank.service.errors import BodyTimeout, BodyTooLarge, ClientGone


class BodyDeadline:
    """``receive`` that raises :class:`BodyTimeout` when the body has not arrived by ``deadline``
    (event-loop time); after the body's last part it passes messages straight through."""

    __slots__ = ("receive", "deadline", "timeout_s", "done")

    def __init__(self, receive: Receive, deadline: float, timeout_s: float):
        self.receive = receive
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.done = False

    async def __call__(self) -> Message:
        if self.done:
            return await self.receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.receive()
        except TimeoutError:
            # A busy loop may not have read yet what the client did send: look once more after
            # one loop iteration (it polls the sockets) before calling the client slow.
            await asyncio.sleep(0)
            try:
                async with asyncio.timeout(0):
                    message = await self.receive()
            except TimeoutError:
                raise BodyTimeout(
                    f"request body not received within {self.timeout_s * 1000:.0f} ms (MTRANK_REQUEST_TIMEOUT_MS)"
                ) from None
        self.done = message["type"] != "http.request" or not message.get("more_body", False)
        return message


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole body; :class:`BodyTooLarge` as soon as it (or its declared Content-Length) is
    over ``limit`` bytes, :class:`ClientGone` if the client hangs up while sending it."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes is over the limit of {limit} (MTRANK_MAX_BODY_BYTES)")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body is over the limit of {limit} bytes (MTRANK_MAX_BODY_BYTES)")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
