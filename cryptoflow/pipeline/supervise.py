"""Restart a crashed per-symbol task with back-off instead of taking the process down."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("cryptoflow.supervise")


def backoff_delay(attempt: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Capped exponential back-off, jittered to 50-100 % of the cap (attempt counts from 1)."""
    ceiling = min(maximum, initial * (2 ** max(attempt - 1, 0)))
    return rng.uniform(ceiling / 2, ceiling)


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
