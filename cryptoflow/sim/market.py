"""The simulator's books, its clock loop and diff fan-out to stream subscribers."""

from __future__ import annotations

import math
import time
from collections import deque

import trio

from cryptoflow.sim.book import Aggregate, Book, Diff
from cryptoflow.sim.faults import Stats


def _now() -> float:
    try:
        return trio.current_time()
    except RuntimeError:  # a step outside trio (no clock): counts as long ago
        return -math.inf


class Subscriber:
    """One stream (symbol) on one connection: the ticks since its last event.

    An event takes the ticks made up to its due time (`take_through`), once the clock
    loop has passed that time (`Market.through`): every connection then cuts the same
    ticks into the same events, as a venue's subscribers all get the same event ids, and
    an event leaves right after the tick that ends its interval."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.diffs: deque[Diff] = deque()

    def push(self, d: Diff) -> None:
        self.diffs.append(d)

    def take_through(self, t: float) -> Aggregate | None:
        """The ticks made at or before `t` (trio clock) merged into one event, if any."""
        diffs = self.diffs
        if not diffs or diffs[0].at > t:
            return None
        agg = Aggregate(diffs.popleft())
        while diffs and diffs[0].at <= t:
            agg.add(diffs.popleft())
        return agg


class Market:
    def __init__(self, books: dict[str, Book], stats: Stats) -> None:
        self.books = books
        self.stats = stats
        self.subscribers: dict[str, set[Subscriber]] = {s: set() for s in books}
        self.paused = False
        self.tick_interval = 0.1  # set by `run`
        self.phase = 0.0  # trio clock of the first tick's interval start, set by `run`
        #: trio clock: the clock loop has made (or, paused, skipped) every tick due by then
        self.done_through = -math.inf
        self._progress = trio.Event()
        for s, b in books.items():
            stats.symbols[s].last_update_id = b.last_update_id

    def subscribe(self, symbol: str) -> Subscriber:
        sub = Subscriber(symbol)
        self.subscribers[symbol].add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.get(sub.symbol, set()).discard(sub)

    def step(self, at: float | None = None) -> None:
        """Advance every book by one tick and hand the diffs to subscribers; `at` is the
        tick's due time (trio clock; now for a manual step)."""
        now_ms = int(time.time() * 1000)
        at = _now() if at is None else at
        for sym, book in self.books.items():
            d = book.tick(now_ms)
            d.at = at
            st = self.stats.symbols[sym]
            st.ticks += 1
            st.last_update_id = book.last_update_id
            for sub in self.subscribers[sym]:
                sub.push(d)

    def on_grid(self, now: float, every: float, offset: float = 0.0) -> float:
        """The first time at or after `now` on the grid of `every` seconds from the first
        tick's interval start (shifted by `offset`).

        Streams that merge ticks into events time them on this grid, not on a timer of
        their connection's own: every connection then gets the same events with the same
        ids, as from a venue, and a client can hand a stream over from one connection
        to the next with nothing missing or repeated."""
        k = math.ceil((now - self.phase - offset) / every)
        return self.phase + offset + k * every

    async def run(self, tick_interval: float) -> None:
        """The clock loop: one tick per interval, no drift, runs with or without clients."""
        self.tick_interval = tick_interval
        next_t = self.phase = trio.current_time()
        while True:
            next_t += tick_interval
            await trio.sleep_until(next_t)
            if not self.paused:
                self.step(next_t)
            self.done_through = next_t
            self._progress.set()
            self._progress = trio.Event()

    async def through(self, t: float) -> None:
        """Until the clock loop has passed every tick due at or before `t`."""
        while self.done_through < t:
            await self._progress.wait()
