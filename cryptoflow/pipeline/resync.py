"""Resync requests from the book-sync machine to the REST fetcher.

The normalizer must never block on asking for a snapshot, and asking twice for the same
symbol must not fetch twice, so this is a de-duplicating set with a wake-up, not a channel.
Resync snapshots go through the shard's REST budget like every poll.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from cryptoflow.errors import ExchangeError
from cryptoflow.models import DepthSnapshot

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


async def run_resync_fetcher(
    queue: ResyncQueue,
    fetch: Callable[[str], Awaitable[DepthSnapshot]],
    out: trio.MemorySendChannel,
    *,
    exchange: str,
    retry_delay: float = 2.0,
) -> None:
    """Fetch a snapshot for each requested symbol; failed fetches are asked for again."""
    async with out:
        while True:
            symbol = await queue.next()
            try:
                snapshot = await fetch(symbol)
            except ExchangeError as exc:
                log.warning("%s/%s: resync snapshot failed: %s", exchange, symbol, exc)
                await trio.sleep(retry_delay)
                queue.request(symbol)
                continue
            await out.send(snapshot)


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
