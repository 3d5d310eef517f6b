"""A MockClock that does not jump while a worker thread is running.

Why: the writer flushes, merges and uploads in `trio.to_thread.run_sync`. While a thread
works every task is blocked, so a plain autojump clock sees an idle loop and jumps to the
next deadline (a flush interval, the shutdown deadline) because the machine is slow, not
because the test meant time to pass. Under CPU load (a 2-core CI box, or busy processes
beside the tests) that failed tests such as a spool-full run losing its last rows to a
shutdown deadline that had "passed" during one fsync. Counting the threads in flight
(`install` wraps `trio.to_thread.run_sync`) keeps virtual time still until they are back.

MockClock is final, so the hook is replaced on the instance: the run loop calls
`clock._autojump()` (private, trio 0.2x-0.3x) after `autojump_threshold` of real idleness.
"""

from __future__ import annotations

import functools
from typing import Any

import trio
from trio.testing import MockClock

assert callable(getattr(MockClock, "_autojump", None)), "trio.testing.MockClock changed"


def install(monkeypatch: Any, autojump_threshold: float = 0.02) -> MockClock:
    """A MockClock whose autojump waits until no worker thread is in flight."""
    clock = MockClock(autojump_threshold=autojump_threshold)
    in_flight = 0
    jump = clock._autojump

    def autojump_unless_a_thread_runs() -> None:
        if not in_flight:
            jump()

    run_sync = trio.to_thread.run_sync

    @functools.wraps(run_sync)
    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight
        in_flight += 1
        try:
            return await run_sync(*args, **kwargs)
        finally:
            in_flight -= 1

    clock._autojump = autojump_unless_a_thread_runs  # type: ignore[method-assign]
    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return clock
