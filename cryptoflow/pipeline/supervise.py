"""Restart a crashed per-symbol task with back-off instead of taking the process down."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("cryptoflow.supervise")


def backoff_delay(attempt: int, *, initial: float, maximum: float, rng: random.Random) -> float:
    """Capped exponential back-off with full jitter (attempt counts from 1)."""
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

    Cancellation is not an Exception, so shutdown passes straight through.
    """
    rng = rng or random.Random()
    attempt = 0
    while True:
        try:
            await fn()
            return
        except Exception:
            attempt += 1
            delay = backoff_delay(attempt, initial=initial, maximum=maximum, rng=rng)
            log.exception("%s crashed (attempt %d); restarting in %.1fs", name, attempt, delay)
            await trio.sleep(delay)
