"""Resync requests from the book-sync machine to the REST fetcher.

The normalizer must never block on asking for a snapshot, and asking twice for the same
symbol must not fetch twice, so this is a de-duplicating set with a wake-up, not a channel.
Resync snapshots go through the shard's REST budget like every poll.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from cryptoflow.errors import ExchangeError
from cryptoflow.models import DepthSnapshot
from cryptoflow.pipeline.supervise import backoff_delay, retry_delay

log = logging.getLogger("cryptoflow.resync")


class ResyncQueue:
    def __init__(self) -> None:
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._wakeup = trio.Event()
        self.requested = 0

    def request(self, symbol: str) -> None:
        if symbol not in self._pending:
            self._pending[symbol] = None
            self.requested += 1
            self._wakeup.set()

    def __len__(self) -> int:
        return len(self._pending)

    async def next(self) -> str:
        while not self._pending:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        symbol = next(iter(self._pending))
        del self._pending[symbol]
        return symbol

    async def next_batch(self) -> list[str]:
        """Every symbol pending now (at least one), in the order asked: a connection
        resubscribes them in one request instead of one per symbol."""
        while not self._pending:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
        batch = list(self._pending)
        self._pending.clear()
        return batch


async def run_resync_fetcher(
    queue: ResyncQueue,
    fetch: Callable[[str], Awaitable[DepthSnapshot]],
    out: trio.MemorySendChannel,
    *,
    exchange: str,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
    rng: random.Random | None = None,
) -> None:
    """Fetch a snapshot for each requested symbol; a failed fetch is asked for again
    after a capped exponential back-off of its own symbol (reset by a success), so a
    venue answering 5xx is not asked every few seconds forever and one symbol's
    retries never hold the others back. After a throttle or ban the retry waits the
    venue's time if that is longer (`retry_delay`): the budget holds the IP that long,
    and the log line's `retry in` is the wait that applies.

    Any error of a fetch is a failure of that symbol, not of the fetcher: an error
    outside our tree (a library's) would otherwise end the task, and the symbol it had
    taken out of the queue would never be asked for again (its book stays unsynced)."""
    rng = rng or random.Random()
    failures: dict[str, int] = {}  # consecutive failed fetches per symbol
    retrying: set[str] = set()  # a retry is scheduled: a new request adds nothing
    async with out, trio.open_nursery() as retries:
        while True:
            symbol = await queue.next()
            if symbol in retrying:
                continue
            try:
                snapshot = await fetch(symbol)
            except Exception as exc:
                n = failures[symbol] = failures.get(symbol, 0) + 1
                backoff = backoff_delay(n, initial=backoff_initial, maximum=backoff_max, rng=rng)
                delay = retry_delay(exc, backoff)  # a throttle's own wait, if longer
                _log_failure(exchange, symbol, exc, n, delay)
                retrying.add(symbol)
                retries.start_soon(_retry_later, queue, symbol, delay, retrying)
                continue
            failures.pop(symbol, None)
            await out.send(snapshot)


def _log_failure(exchange: str, symbol: str, exc: Exception, n: int, delay: float) -> None:
    where = f"{exchange}/{symbol}"
    if isinstance(exc, ExchangeError):
        text = str(exc) if exc.symbol else f"{where}: {exc}"
        log.warning("resync snapshot failed (%d in a row): %s; retry in %.1fs", n, text, delay)
    else:  # not one of ours: keep the traceback, it is a bug to map in the REST edge
        log.error(
            "resync snapshot failed (%d in a row): %s: %s: %s; retry in %.1fs",
            n,
            where,
            type(exc).__name__,
            exc,
            delay,
            exc_info=exc,
        )


async def _retry_later(queue: ResyncQueue, symbol: str, delay: float, retrying: set[str]) -> None:
    await trio.sleep(delay)
    retrying.discard(symbol)
    queue.request(symbol)


class ResyncRouter:
    """Routes the normalizer's resync requests by the venue's rule (`SyncRules.resync_by`).

    "rest" venues (and any symbol without a resubscribing connection): the shard's REST
    fetcher queue. "resubscribe" venues: the queue of the WebSocket connection serving the
    symbol, which unsubscribes + subscribes it for a fresh in-stream snapshot.
    """

    def __init__(self, rest: ResyncQueue) -> None:
        self.rest = rest
        self._by_symbol: dict[str, ResyncQueue] = {}

    def route(self, symbols: list[str], queue: ResyncQueue) -> None:
        """Send requests for these (normalized) symbols to a connection's queue."""
        for sym in symbols:
            self._by_symbol[sym] = queue

    def request(self, symbol: str) -> None:
        queue = self._by_symbol.get(symbol)  # (an empty queue is falsy: no `or`)
        (self.rest if queue is None else queue).request(symbol)

    def request_rest(self, symbol: str) -> None:
        """Fallback when no in-stream snapshot came: a REST snapshot."""
        self.rest.request(symbol)
