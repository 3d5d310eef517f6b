"""Per-IP, per-venue request budget.

Every REST request of a shard on one venue goes through one `RateBudget`, so the snapshot
lane and the delta lane's resync fetches share the same accounting. Three signals govern
it, strongest first:

1. A ban (Binance 418, Bybit 403) or a throttle (429 + Retry-After): nothing is sent from
   this IP before the time the venue gave. `acquire` sleeps until then.
2. The venue's own usage counter (Binance `X-MBX-USED-WEIGHT-1M`, KuCoin
   `gw-ratelimit-remaining`): past `safety` x limit we pause (`hold`) until the venue's
   window rolls over, so we slow down *before* a 429. A hold is not a throttle in the
   stats: `throttles` counts only the venue's refusals.
3. Our own sliding window of sent weight, as long as the venue's accounting window (60 s
   Binance, 5 s Bybit, 2 s OKX, 30 s KuCoin), for venues without a usage header and to
   pace bursts (e.g. 30 symbols polling at once after a start): `limit_per_minute` is
   scaled to that window.

What the metrics report (`used_last_minute`) is the weight sent in the last 60 s,
whatever the venue's window, so it compares with `limit` (per minute); the pacing
window above is an internal detail (a 2 s sum next to a per-minute limit reads as ~3 %
of a budget that is in fact spent to its safety share).

Time comes from `trio.current_time()` (so tests run under `MockClock`); the venue's minute
window is aligned to wall-clock minutes, read through an injectable `wall_clock`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import attrs
import trio

WINDOW = 60.0
#: the shortest a throttle or ban blocks the IP, whatever wait the venue names
MIN_BLOCK_S = 1.0


def blocked_wait(retry_after: float) -> float:
    """How long a throttle or ban told to wait `retry_after` s holds the IP's requests."""
    return max(retry_after, MIN_BLOCK_S)


class _SlidingSum:
    """Weight sent in the last `window` seconds (trio clock)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.sent: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, now: float, weight: int) -> None:
        # expired here too, not only when read: the metric's 60 s sum is read only by a
        # /metrics scrape, and without one (metrics off) it held every request ever sent
        self.expire(now)
        self.sent.append((now, weight))
        self.total += weight

    def expire(self, now: float) -> int:
        while self.sent and self.sent[0][0] + self.window <= now:
            _, w = self.sent.popleft()
            self.total -= w
        return self.total


@attrs.define
class BudgetStats:
    requests: int = 0
    weight_sent: int = 0
    throttles: int = 0
    bans: int = 0
    paced_waits: int = 0
    last_used_header: int | None = None


class RateBudget:
    def __init__(
        self,
        limit_per_minute: int,
        *,
        safety: float = 0.8,
        window: float = WINDOW,
        name: str = "",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if limit_per_minute <= 0 or window <= 0:
            raise ValueError("limit_per_minute and window must be positive")
        self.limit = limit_per_minute
        self.window = window
        self.window_limit = limit_per_minute * window / WINDOW
        self.safety = safety
        self.name = name
        self._wall_clock = wall_clock
        self._sent = _SlidingSum(window)  # paces within the venue's window
        self._minute = _SlidingSum(WINDOW)  # what the metrics report, beside `limit`
        self._blocked_until = 0.0  # trio clock
        self._lock = trio.Lock()
        self.stats = BudgetStats()

    # -- signals from responses -------------------------------------------------------

    def observe_used(self, used: int) -> None:
        """The venue's own count of weight used by this IP in its current minute."""
        self.stats.last_used_header = used
        if used >= self.safety * self.limit:
            wall = self._wall_clock()
            until_rollover = WINDOW - (wall % WINDOW) + 0.05
            self.hold(until_rollover)

    def hold(self, seconds: float) -> None:
        """The venue's usage headers say this IP's allowance is nearly spent: send nothing
        for `seconds`. Not a throttle (the venue refused nothing), so not counted as one."""
        self._block_for(seconds)

    def throttle(self, retry_after: float) -> None:
        """429: stop sending from this IP for `retry_after` seconds."""
        self.stats.throttles += 1
        self._block_for(blocked_wait(retry_after))

    def ban(self, retry_after: float) -> None:
        """418 / 403 ban: stop sending until the ban ends."""
        self.stats.bans += 1
        self._block_for(blocked_wait(retry_after))

    def _block_for(self, seconds: float) -> None:
        self._blocked_until = max(self._blocked_until, trio.current_time() + seconds)

    # -- sending ----------------------------------------------------------------------

    @property
    def blocked_for(self) -> float:
        return max(0.0, self._blocked_until - trio.current_time())

    def used_in_window(self) -> int:
        """Weight sent within the venue's own (pacing) window, `self.window` seconds."""
        return self._sent.expire(trio.current_time())

    def used_last_minute(self) -> int:
        """Weight sent in the last 60 s: the same span as `limit` (per minute)."""
        return self._minute.expire(trio.current_time())

    async def acquire(self, weight: int) -> None:
        """Wait until `weight` may be sent from this IP, then account for it."""
        async with self._lock:
            while True:
                now = trio.current_time()
                if now < self._blocked_until:
                    await trio.sleep_until(self._blocked_until)
                    continue
                used = self._sent.expire(now)
                if self._sent.sent and used + weight > self.safety * self.window_limit:
                    self.stats.paced_waits += 1
                    await trio.sleep_until(self._sent.sent[0][0] + self.window)
                    continue
                break
            self._sent.add(now, weight)
            self._minute.add(now, weight)
            self.stats.requests += 1
            self.stats.weight_sent += weight


class RequestCap:
    """Requests of one kind in a sliding window against a venue's cap: OKX allows 480
    subscribe/unsubscribe/login requests per hour per WebSocket connection (one per
    message, however many args it carries). `room()` keeps `safety` of the cap usable:
    the venue starts its hour when a request arrives, a little after we count it sent.
    Time is the trio clock (tests run it under `MockClock`)."""

    def __init__(self, limit: int, window: float, *, safety: float = 0.9) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("limit and window must be positive")
        self.limit = limit
        self.usable = max(1, int(limit * safety))
        self._sent = _SlidingSum(window)

    def note(self, requests: int) -> None:
        """`requests` were sent now."""
        if requests > 0:
            self._sent.add(trio.current_time(), requests)

    def used(self) -> int:
        return self._sent.expire(trio.current_time())

    def room(self) -> int:
        """How many more may be sent now."""
        return max(0, self.usable - self.used())


class ConnectPacer:
    """New connections from one IP against a venue's cap per second (OKX: 3). A shard's
    connections all open at its start, and a hand-over opens one more: past the cap the
    venue refuses the upgrade, and the refused connection backs off as if it had failed.
    `wait` spaces the openings instead, with `margin` seconds of slack on the window for
    the venue's clock. Time is the trio clock."""

    def __init__(self, limit: int, window: float = 1.0, *, margin: float = 0.1) -> None:
        if limit <= 0 or window <= 0:
            raise ValueError("limit and window must be positive")
        self.limit = limit
        self.window = window + margin
        self._opened: deque[float] = deque()
        self.waited = 0  # openings that had to wait (tests, logs)

    async def wait(self) -> None:
        """Return when one more connection may be opened now (and count it opened)."""
        opened = self._opened
        while True:
            now = trio.current_time()
            while opened and now - opened[0] >= self.window:
                opened.popleft()
            if len(opened) < self.limit:
                opened.append(now)
                return
            self.waited += 1
            await trio.sleep_until(opened[0] + self.window)
