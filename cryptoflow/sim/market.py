"""The simulator's books, its clock loop and diff fan-out to stream subscribers."""

from __future__ import annotations

import math
import time
from collections import deque

import trio

from cryptoflow.sim.book import Aggregate, Book, Diff
from cryptoflow.sim.faults import Stats

#: ticks a stream keeps one by one for its next events; the older ticks of a stream that
#: falls further behind (a client that stopped reading, so its sends block) are merged
#: into one pending event, as before events were cut at tick numbers: the simulator's
#: memory stays bounded and the stream continuous (1,000 ticks: 100 s at 100 ms ticks)
MAX_QUEUED_TICKS = 1000


class Subscriber:
    """One stream (symbol) on one connection: the ticks since its last event.

    An event takes the ticks up to its cut (`take_through`), a tick number on the
    market's grid, once the clock loop has made that tick (`Market.through`): every
    connection then cuts the same ticks into the same events, as a venue's subscribers
    all get the same event ids, and an event leaves right after the tick that ends its
    interval. A stream more than `MAX_QUEUED_TICKS` behind gets its oldest ticks merged
    (`lagged`); its next event carries them all, whatever its cut."""

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.diffs: deque[Diff] = deque()
        #: the ticks before `diffs` of a stream that fell behind, merged into one event
        self.lagged: Aggregate | None = None

    def push(self, d: Diff) -> None:
        self.diffs.append(d)
        if len(self.diffs) > MAX_QUEUED_TICKS:
            oldest = self.diffs.popleft()
            if self.lagged is None:
                self.lagged = Aggregate(oldest)
            else:
                self.lagged.add(oldest)

    def take_through(self, cut: int, into: Aggregate | None = None) -> Aggregate | None:
        """The ticks numbered up to `cut` merged into one event (into `into`, if given),
        if any; a lagging stream's merged ticks first, whatever their numbers."""
        agg = into
        if self.lagged is not None:
            if agg is None:
                agg = self.lagged
            else:
                agg.extend(self.lagged)
            self.lagged = None
        diffs = self.diffs
        while diffs and diffs[0].tick <= cut:
            d = diffs.popleft()
            if agg is None:
                agg = Aggregate(d)
            else:
                agg.add(d)
        return agg


class Market:
    def __init__(self, books: dict[str, Book], stats: Stats) -> None:
        self.books = books
        self.stats = stats
        self.subscribers: dict[str, set[Subscriber]] = {s: set() for s in books}
        self.paused = False
        self.tick_interval = 0.1  # set by `run`
        self.phase = 0.0  # trio clock of tick 0's due time, set by `run`
        #: the clock loop's last tick number (made, or skipped while paused)
        self.tick_no = 0
        self._progress = trio.Event()
        for s, b in books.items():
            stats.symbols[s].last_update_id = b.last_update_id

    def subscribe(self, symbol: str) -> Subscriber:
        sub = Subscriber(symbol)
        self.subscribers[symbol].add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.get(sub.symbol, set()).discard(sub)

    def step(self) -> None:
        """Advance every book by one tick and hand the diffs to subscribers (a manual step
        belongs to the clock loop's current tick number)."""
        now_ms = int(time.time() * 1000)
        for sym, book in self.books.items():
            d = book.tick(now_ms)
            d.tick = self.tick_no
            st = self.stats.symbols[sym]
            st.ticks += 1
            st.last_update_id = book.last_update_id
            for sub in self.subscribers[sym]:
                sub.push(d)

    def cut(self, k: int, seconds: float) -> int:
        """The k-th cut of a stream with that interval: the tick number that ends its k-th
        interval from the clock's start (a 250 ms stream on 100 ms ticks cuts after 2, 5,
        7, 10, …: 250 ms on average). Streams that merge ticks into events cut them there,
        not on a timer of their connection's own: every connection then gets the same
        events with the same ids, as from a venue, and a client can hand a stream over
        from one connection to the next with nothing missing or repeated."""
        return max(k, math.floor(k * seconds / self.tick_interval + 1e-9))

    def next_k(self, seconds: float) -> int:
        """The number of the first cut after the current tick."""
        k = max(1, math.floor(self.tick_no * self.tick_interval / seconds))
        while self.cut(k, seconds) <= self.tick_no:
            k += 1
        return k

    def due(self, tick_no: int) -> float:
        """When the clock loop makes that tick (trio clock)."""
        return self.phase + tick_no * self.tick_interval

    async def run(self, tick_interval: float) -> None:
        """The clock loop: one tick per interval, no drift, runs with or without clients."""
        self.tick_interval = tick_interval
        self.phase = trio.current_time()
        while True:
            await trio.sleep_until(self.due(self.tick_no + 1))
            self.tick_no += 1
            if not self.paused:
                self.step()
            self._progress.set()
            self._progress = trio.Event()

    async def through(self, tick_no: int) -> None:
        """Until the clock loop has made (or, paused, skipped) that tick."""
        while self.tick_no < tick_no:
            await self._progress.wait()
