"""Work whose client hangs up is dropped: :func:`unless_disconnected` (vLLM's ``with_cancellation``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from starlette.types import Receive

from mtrank.service.errors import ClientGone


async def unless_disconnected(receive: Receive, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (its queued rows are then
    dropped by the batcher) and raise ClientGone.

    The work runs in this task (no task of its own whose failure could go unobserved); a watcher
    task waits for the disconnect and cancels this one.
    """
    current = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone:
            current.uncancel()
            raise ClientGone("client disconnected") from None
        raise
    finally:
        watcher.cancel()
        watcher.add_done_callback(_consume_outcome)


def _consume_outcome(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()
