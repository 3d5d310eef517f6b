"""The simulator's books, its clock loop and diff fan-out to stream subscribers."""

from __future__ import annotations

import math
import time

import trio

from cryptoflow.sim.book import Aggregate, Book, Diff
from cryptoflow.sim.faults import Stats


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # a step outside trio (no clock): counts as long ago
        return -math.inf


class Subscriber:
    """One stream (symbol) on one connection: diffs since the last send, merged.

    ``pushes`` counts the ticks handed in; a task can wait for the next one
    (``wait_push``), so a paced stream sends right after the tick that ends its interval
    (as a venue stamps and sends an event when it makes it) instead of on a timer of its
    own that lags the ticks by up to one interval."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.agg: Aggregate | None = None
        self.pushes = 0
        self.pushed_at = -math.inf  # trio clock of the last push
        self._event: trio.Event | None = None

    def push(self, d: Diff) -> None:
        if self.agg is None:
            self.agg = Aggregate(d)
        else:
            self.agg.add(d)
        self.pushes += 1
        self.pushed_at = _now()
        if self._event is not None:
            self._event.set()
            self._event = None

    def take(self) -> Aggregate | None:
        a, self.agg = self.agg, None
        return a

    async def wait_push(self, seen: int) -> None:
        """Until a tick after the ``seen``-th has been pushed."""
        while self.pushes == seen:
            if self._event is None:
                self._event = trio.Event()
            await self._event.wait()

    async def next_batch(self, due: float, tick_interval: float) -> None:
        """Wait for the event due at ``due`` (trio clock) to be ready to send: right after
        the first tick within half a tick of ``due``; when no tick comes by then (clock
        late, or paused), at ``due`` + half a tick if changes are waiting, else right
        after the next tick that brings some."""
        half = tick_interval / 2
        await trio.sleep_until(due - half)
        if self.agg is not None and self.pushed_at >= due - half:
            return  # that tick came while this task waited to run
        seen = self.pushes
        with trio.move_on_at(due + half):
            await self.wait_push(seen)
        while self.agg is None:
            await self.wait_push(self.pushes)


class Market:
    def __init__(self, books: dict[str, Book], stats: Stats) -> None:
        self.books = books
        self.stats = stats
        self.subscribers: dict[str, set[Subscriber]] = {s: set() for s in books}
        self.paused = False
        self.tick_interval = 0.1  # set by `run`
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
        self.tick_interval = tick_interval
        next_t = trio.current_time()
        while True:
            next_t += tick_interval
            await trio.sleep_until(next_t)
            if not self.paused:
                self.step()
