"""Task helpers: restart a crashed per-symbol task with back-off instead of taking the
process down; run a call unless a stop comes first; end the process when a stop cannot."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from cryptoflow.errors import RateLimited, single_error_unwrapped
from cryptoflow.net.ratelimit import blocked_wait

log = logging.getLogger("cryptoflow.supervise")
T = TypeVar("T")


def backoff_delay(attempt: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Capped exponential back-off, jittered to 50-100 % of the cap (attempt counts from 1)."""
    ceiling = min(maximum, initial * (2 ** max(attempt - 1, 0)))
    return rng.uniform(ceiling / 2, ceiling)


def retry_delay(exc: BaseException | None, backoff: float) -> float:
    """When to try a REST request (or a connect that needs one) again after `exc`: the
    back-off, or the wait the venue gave with a throttle or ban (`RateLimited`) if that
    is longer. The shard's `RateBudget` holds every request of the IP that long anyway:
    a retry scheduled at the back-off only waited in it, and its log line (`retry in
    0.8s` after a KuCoin 429 whose `gw-ratelimit-reset` held the IP for 22 s) named a
    wait that did not apply."""
    if isinstance(exc, RateLimited):
        return max(backoff, blocked_wait(exc.retry_after))
    return backoff


async def supervised(
    name: str,
    fn: Callable[[], Awaitable[None]],
    *,
    initial: float = 1.0,
    maximum: float = 60.0,
    rng: random.Random | None = None,
) -> None:
    """Run `fn` until it returns; if it raises, log it and start it again after back-off.
    A run that lasted `maximum` seconds was healthy: its crash counts as a first again.

    Cancellation is not an Exception, so shutdown passes straight through.
    """
    rng = rng or random.Random()
    attempt = 0
    while True:
        started = trio.current_time()
        try:
            await fn()
            return
        except Exception:
            if trio.current_time() - started >= maximum:
                attempt = 0
            attempt += 1
            delay = backoff_delay(attempt, initial=initial, maximum=maximum, rng=rng)
            log.exception("%s crashed (attempt %d); restarting in %.1fs", name, attempt, delay)
            await trio.sleep(delay)


async def unless_stopped(stopping: trio.Event, fn: Callable[[], Awaitable[T]]) -> T | None:
    """`fn()`, or None as soon as `stopping` is set (then `fn` is cancelled). An error of
    `fn` comes out as itself, not wrapped in the nursery's ExceptionGroup."""
    result: list[T] = []
    with single_error_unwrapped():
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                await stopping.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            result.append(await fn())
            nursery.cancel_scope.cancel()
    return result[0] if result else None


def exit_after(seconds: float, code: int = 130) -> None:
    """End the process in `seconds` whatever runs then: a worker thread blocked in a call
    (an S3 request to a hung endpoint) cannot be cancelled, and a forced stop must end."""
    timer = threading.Timer(seconds, os._exit, args=(code,))
    timer.daemon = True
    timer.start()
