"""control.tasks: the first failure ends the others as a plain exception; stop cancels."""

from __future__ import annotations

import asyncio

import pytest

from control.errors import ControlError
from control.tasks import run_together, until_stopped
from tests.fakes import run_async


@run_async
async def test_first_failure_cancels_the_rest_and_is_raised_plainly() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    async def fails() -> None:
        await asyncio.sleep(0.01)
        raise ControlError("etcd said no")

    with pytest.raises(ControlError, match="etcd said no"):
        await run_together(forever(), fails())
    assert cancelled.is_set()


@run_async
async def test_stop_ends_everything_and_a_task_that_returns_ends_nothing() -> None:
    stop = asyncio.Event()
    ran: list[str] = []

    async def quick() -> None:
        ran.append("quick")

    async def forever() -> None:
        await asyncio.Event().wait()

    asyncio.get_running_loop().call_later(0.05, stop.set)
    await run_together(quick(), forever(), stop=stop)
    assert ran == ["quick"] and stop.is_set()


@run_async
async def test_until_stopped_gives_the_result_or_none() -> None:
    async def value() -> int:
        return 7

    assert await until_stopped(value(), asyncio.Event()) == 7
    stop = asyncio.Event()
    stop.set()
    async def slow() -> int:
        await asyncio.sleep(10)
        return 1

    assert await until_stopped(slow(), stop) is None


def test_a_task_cancelled_by_someone_else_ends_all_with_one_error() -> None:
    async def main() -> None:
        async def victim() -> None:
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            await asyncio.sleep(10)

        async def forever() -> None:
            await asyncio.sleep(10)

        with pytest.raises(ControlError, match="cancelled unexpectedly"):
            await asyncio.wait_for(run_together(victim(), forever()), 5)
    asyncio.run(main())
