"""Running coroutines until a stop event: the agent's lifecycle in two helpers.

Both cancel what is still running when they return, and raise a failure as the
plain exception it is (not an ExceptionGroup), so ``flannelette run`` can turn it
into one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import TypeVar

from control.errors import ControlError

T = TypeVar("T")


async def until_stopped(work: Coroutine[object, object, T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None (``work`` cancelled) if ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    return None if task.cancelled() else task.result()


async def run_together(*forever: Coroutine[object, object, None],
                       stop: asyncio.Event | None = None) -> None:
    """Run ``forever`` side by side until ``stop`` (or all of them ended); the first to
    fail ends all of them with its error (a plain exception for main(), not an
    ExceptionGroup as from a TaskGroup)."""
    stop = stop or asyncio.Event()
    tasks = [asyncio.ensure_future(c) for c in forever]
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set() and not all(t.done() for t in tasks):
            await asyncio.wait({stopper, *(t for t in tasks if not t.done())},
                               return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and t.cancelled() and not stop.is_set():
                    # nobody asked it to stop: a library cancelled it (e.g. gRPC when a
                    # shared client closed); running on without it would hide the loss
                    raise ControlError(f"internal task {getattr(t.get_coro(), '__qualname__', t)} "
                                       "was cancelled "
                                       "unexpectedly; stopping (a supervisor restarts us)")
                failure = t.exception() if t.done() and not t.cancelled() else None
                if failure is not None:
                    raise failure
    finally:
        stopper.cancel()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
