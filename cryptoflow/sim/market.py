"""The simulator's books, its clock loop and diff fan-out to stream subscribers."""

from __future__ import annotations

import time

import trio

from cryptoflow.sim.book import Aggregate, Book, Diff
from cryptoflow.sim.faults import Stats


class Subscriber:
    """One stream (symbol) on one connection: diffs since the last send, merged."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.agg: Aggregate | None = None

    def push(self, d: Diff) -> None:
        if self.agg is None:
            self.agg = Aggregate(d)
        else:
            self.agg.add(d)

    def take(self) -> Aggregate | None:
        a, self.agg = self.agg, None
        return a


class Market:
    def __init__(self, books: dict[str, Book], stats: Stats) -> None:
        self.books = books
        self.stats = stats
        self.subscribers: dict[str, set[Subscriber]] = {s: set() for s in books}
        self.paused = False
        for s, b in books.items():
            stats.symbols[s].last_update_id = b.last_update_id

    def subscribe(self, symbol: str) -> Subscriber:
        sub = Subscriber(symbol)
        self.subscribers[symbol].add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.get(sub.symbol, set()).discard(sub)

    def step(self) -> None:
        """Advance every book by one tick and hand the diffs to subscribers."""
        now_ms = int(time.time() * 1000)
        for sym, book in self.books.items():
            d = book.tick(now_ms)
            st = self.stats.symbols[sym]
            st.ticks += 1
            st.last_update_id = book.last_update_id
            for sub in self.subscribers[sym]:
                sub.push(d)

    async def run(self, tick_interval: float) -> None:
        """The clock loop: one tick per interval, no drift, runs with or without clients."""
        next_t = trio.current_time()
        while True:
            next_t += tick_interval
            await trio.sleep_until(next_t)
            if not self.paused:
                self.step()
