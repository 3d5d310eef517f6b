"""Evolving order-book model for the simulator (venue-neutral, no I/O).

Prices and quantities are kept as integers (price in units of ``10**-price_decimals``,
quantity in units of ``10**-qty_decimals``) and formatted as fixed-decimal strings only
when served. Prices always sit on the tick grid and the book is never crossed: every bid
is strictly below ``mid`` and every ask is at or above it.

Each tick changes several levels (updates, additions, removals, plus removals forced by
the mid moving or by the per-side depth cap) and consumes one update id per changed
level: the tick's diff has ``U`` = first id, ``u`` = last id, ``pu`` = previous tick's
``u``. ``Aggregate`` merges consecutive diffs into one event (last write per price wins),
keeping ``U`` of the first, ``u`` of the last and ``pu`` of the first — exactly what a
100/250/500 ms stream must send.
"""

from __future__ import annotations

import bisect
import gzip
import itertools
import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path


@dataclass(frozen=True)
class SymbolSpec:
    symbol: str
    mid_price: Decimal  # starting mid price
    price_decimals: int  # decimals in the price strings
    tick_units: int  # tick size in units of 10**-price_decimals
    qty_decimals: int  # decimals in the quantity strings
    max_qty_units: int  # largest random quantity, in qty units

    @property
    def tick_size(self) -> str:
        return _fmt(self.tick_units, self.price_decimals)

    @property
    def step_size(self) -> str:
        return _fmt(1, self.qty_decimals)


_KNOWN: dict[str, tuple[str, int, int, int, int]] = {
    # symbol: (mid, price_decimals, tick_units, qty_decimals, max_qty_units)
    "BTCUSDT": ("60000", 2, 10, 3, 5_000),
    "ETHUSDT": ("3000", 2, 1, 3, 50_000),
    "BTCUSDC": ("60000", 1, 1, 3, 5_000),
    "ETHUSDC": ("3000", 2, 1, 3, 50_000),
    "SOLUSDT": ("150", 4, 100, 2, 50_000),
    "BNBUSDT": ("600", 3, 10, 2, 10_000),
    "XRPUSDT": ("0.6", 4, 1, 1, 500_000),
    "DOGEUSDT": ("0.12", 6, 10, 0, 500_000),
}


def spec_for(symbol: str) -> SymbolSpec:
    """A plausible spec for a symbol (known table, or a generic small-price contract)."""
    if symbol in _KNOWN:
        mid, pd, tick, qd, mq = _KNOWN[symbol]
        return SymbolSpec(symbol, Decimal(mid), pd, tick, qd, mq)
    return SymbolSpec(symbol, Decimal("10"), 4, 1, 1, 100_000)


def _fmt(units: int, decimals: int) -> str:
    if decimals == 0:
        return str(units)
    sign = "-" if units < 0 else ""
    s = str(abs(units)).rjust(decimals + 1, "0")
    return f"{sign}{s[:-decimals]}.{s[-decimals:]}"


def _parse_units(text: str, decimals: int) -> int:
    return int((Decimal(text) * (10**decimals)).to_integral_value())


def _decimals_of(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


@dataclass
class Diff:
    """One book change event: levels are (price_units, qty_units); qty 0 = removed."""

    symbol: str
    U: int
    u: int
    pu: int
    E: int  # event time, ms
    T: int  # transaction time, ms
    bids: dict[int, int]
    asks: dict[int, int]
    #: the market's tick number it was made in (`Market.tick_no`): events that merge ticks
    #: are cut at the same tick on every connection
    tick: int = 0

    @property
    def levels(self) -> int:
        return len(self.bids) + len(self.asks)


class Aggregate:
    """Merge of consecutive diffs of one symbol into one outgoing event."""

    def __init__(self, first: Diff) -> None:
        self.symbol = first.symbol
        self.U = first.U
        self.pu = first.pu
        self.u = first.u
        self.E = first.E
        self.T = first.T
        self.bids = dict(first.bids)
        self.asks = dict(first.asks)
        self.ticks = 1

    def add(self, d: Diff) -> None:
        self.u = d.u
        self.E = d.E
        self.T = d.T
        self.bids.update(d.bids)
        self.asks.update(d.asks)
        self.ticks += 1

    def extend(self, later: Aggregate) -> None:
        """Merge in the aggregate of the ticks right after this one's."""
        self.u = later.u
        self.E = later.E
        self.T = later.T
        self.bids.update(later.bids)
        self.asks.update(later.asks)
        self.ticks += later.ticks

    @property
    def levels(self) -> int:
        return len(self.bids) + len(self.asks)


@dataclass
class Book:
    """One symbol's evolving book. Deterministic for a given (seed, symbol)."""

    spec: SymbolSpec
    seed: int | str = 0
    depth: int = 1000  # max levels per side; limit=1000 therefore returns the full book
    last_update_id: int = 0
    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)
    mid: int = 0  # bids < mid <= asks, in price units, on the tick grid
    rng: random.Random = field(init=False)
    #: the prices of ``bids`` / ``asks``, ascending, kept in step with the dicts (every
    #: change goes through ``_set``/``_del``/slices): top-N views, the depth cap and the
    #: levels crossed by a mid move are slices instead of sorts or scans of the book
    bid_prices: list[int] = field(init=False, repr=False, compare=False)
    ask_prices: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}:{self.spec.symbol}")
        if not self.bids and not self.asks:
            self._generate()
        self.bid_prices = sorted(self.bids)
        self.ask_prices = sorted(self.asks)

    # --- construction ---------------------------------------------------------------

    def _generate(self) -> None:
        sp, rng = self.spec, self.rng
        t = sp.tick_units
        mid = _parse_units(str(sp.mid_price), sp.price_decimals)
        self.mid = (mid // t) * t
        if self.last_update_id == 0:
            self.last_update_id = 1_000_000_000 + rng.randrange(1_000_000)
        p = self.mid - t
        for _ in range(self.depth):
            self.bids[p] = self._rand_qty()
            p -= t * rng.choice((1, 1, 1, 2, 3))
            if p <= 0:
                break
        p = self.mid + t * rng.choice((0, 0, 1))
        for _ in range(self.depth):
            self.asks[p] = self._rand_qty()
            p += t * rng.choice((1, 1, 1, 2, 3))

    @classmethod
    def from_snapshot(
        cls, symbol: str, snapshot: dict, *, seed: int | str = 0, depth: int = 1000
    ) -> Book:
        """A book seeded from a recorded Binance REST depth snapshot."""
        bids_t = [(p, q) for p, q in snapshot["bids"]]
        asks_t = [(p, q) for p, q in snapshot["asks"]]
        allp = [p for p, _ in bids_t + asks_t]
        pd = max(_decimals_of(p) for p in allp)
        qd = max(_decimals_of(q) for _, q in bids_t + asks_t)
        bids = {_parse_units(p, pd): _parse_units(q, qd) for p, q in bids_t}
        asks = {_parse_units(p, pd): _parse_units(q, qd) for p, q in asks_t}
        prices = sorted(set(bids) | set(asks))
        tick = 0
        for a, b in itertools.pairwise(prices):
            tick = math.gcd(tick, b - a)
        tick = tick or 1
        qtys = sorted(q for q in list(bids.values()) + list(asks.values()) if q > 0)
        max_q = qtys[int(len(qtys) * 0.9)] if qtys else 1000
        best_ask = min(asks) if asks else max(bids) + tick
        spec = SymbolSpec(symbol, Decimal(_fmt(best_ask, pd)), pd, tick, qd, max(max_q, 1))
        book = cls(
            spec,
            seed=seed,
            depth=depth,
            last_update_id=int(snapshot["lastUpdateId"]),
            bids={p: q for p, q in bids.items() if q > 0},
            asks={p: q for p, q in asks.items() if q > 0},
            mid=best_ask,
        )
        book._trim({}, {})
        return book

    # --- evolution ------------------------------------------------------------------

    def _rand_qty(self) -> int:
        m = self.spec.max_qty_units
        return max(1, int(self.rng.paretovariate(1.5) * m / 20) % m or 1)

    def tick(self, now_ms: int | None = None) -> Diff:
        """Advance the book by one step and return the diff of what changed."""
        rng, t = self.rng, self.spec.tick_units
        bids, asks, bp, ap = self.bids, self.asks, self.bid_prices, self.ask_prices
        cb: dict[int, int] = {}
        ca: dict[int, int] = {}
        # 1. random walk of the mid; levels now on the wrong side are removed
        if rng.random() < 0.35:
            step = rng.choice((-3, -2, -1, -1, 1, 1, 2, 3)) * t
            if self.mid + step - t > 0:
                self.mid += step
                i = bisect.bisect_left(bp, self.mid)  # bids >= mid
                for p in bp[i:]:
                    del bids[p]
                    cb[p] = 0
                del bp[i:]
                i = bisect.bisect_left(ap, self.mid)  # asks < mid
                for p in ap[:i]:
                    del asks[p]
                    ca[p] = 0
                del ap[:i]
        # 2. several level changes near the top: update, add, remove
        for _ in range(rng.randint(2, 10)):
            is_bid = rng.random() < 0.5
            side, ch, prices = (bids, cb, bp) if is_bid else (asks, ca, ap)
            off = min(int(rng.expovariate(1 / 15)), self.depth)
            price = self.mid - t * (off + 1) if is_bid else self.mid + t * off
            if price <= 0:
                continue
            if price in side and rng.random() < 0.3:
                del side[price]
                del prices[bisect.bisect_left(prices, price)]
                ch[price] = 0
            else:
                q = self._rand_qty()
                if price not in side:
                    bisect.insort(prices, price)
                side[price] = q
                ch[price] = q
        # 3. never leave a side empty
        if not bids and self.mid - t > 0:
            bids[self.mid - t] = cb[self.mid - t] = self._rand_qty()
            bp.append(self.mid - t)
        if not asks:
            asks[self.mid] = ca[self.mid] = self._rand_qty()
            ap.append(self.mid)
        if not cb and not ca:  # always at least one change per tick
            p = bp[-1]
            bids[p] = cb[p] = self._rand_qty()
        self._trim(cb, ca)
        n = len(cb) + len(ca)
        pu = self.last_update_id
        U = pu + 1
        self.last_update_id = pu + n
        E = now_ms if now_ms is not None else int(time.time() * 1000)
        return Diff(self.spec.symbol, U, self.last_update_id, pu, E, E - 1, cb, ca)

    def _trim(self, cb: dict[int, int], ca: dict[int, int]) -> None:
        """The per-side depth cap: the levels furthest from the mid go."""
        bp, ap = self.bid_prices, self.ask_prices
        extra = len(bp) - self.depth
        if extra > 0:
            for p in bp[:extra]:
                del self.bids[p]
                cb[p] = 0
            del bp[:extra]
        extra = len(ap) - self.depth
        if extra > 0:
            for p in reversed(ap[-extra:]):
                del self.asks[p]
                ca[p] = 0
            del ap[-extra:]

    # --- views ----------------------------------------------------------------------

    def price_str(self, units: int) -> str:
        return _fmt(units, self.spec.price_decimals)

    def qty_str(self, units: int) -> str:
        return _fmt(units, self.spec.qty_decimals)

    def levels_str(self, levels: Iterable[tuple[int, int]]) -> list[list[str]]:
        fmt, pd, qd = _fmt, self.spec.price_decimals, self.spec.qty_decimals
        return [[fmt(p, pd), fmt(q, qd)] for p, q in levels]

    def best_bids(self, n: int | None = None) -> list[tuple[int, int]]:
        """The best ``n`` (default: all) bids, descending, as (price, qty) units."""
        prices = self.bid_prices if n is None else self.bid_prices[-n:] if n > 0 else []
        bids = self.bids
        return [(p, bids[p]) for p in reversed(prices)]

    def best_asks(self, n: int | None = None) -> list[tuple[int, int]]:
        """The best ``n`` (default: all) asks, ascending, as (price, qty) units."""
        prices = self.ask_prices if n is None else self.ask_prices[: max(n, 0)]
        asks = self.asks
        return [(p, asks[p]) for p in prices]

    def top(self, n: int) -> tuple[list[list[str]], list[list[str]]]:
        """Best ``n`` bids (descending) and asks (ascending) as string pairs."""
        return self.levels_str(self.best_bids(n)), self.levels_str(self.best_asks(n))

    def snapshot(self) -> dict:
        """The full current book: ``{"lastUpdateId", "bids": {price: qty}, "asks": {...}}``
        with price/qty strings exactly as served."""
        return {
            "symbol": self.spec.symbol,
            "lastUpdateId": self.last_update_id,
            "bids": {self.price_str(p): self.qty_str(q) for p, q in self.bids.items()},
            "asks": {self.price_str(p): self.qty_str(q) for p, q in self.asks.items()},
        }


def load_recorded_snapshot(path: str | Path, symbol: str) -> dict | None:
    """First Binance REST snapshot for ``symbol`` in a recorded ``.jsonl[.gz]`` file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    needle = f"symbol={symbol}&"
    with opener(path, "rt") as fh:
        for line in fh:
            if '"rest_snapshot"' not in line or needle not in line:
                continue
            rec = json.loads(line)
            if rec.get("kind") == "rest_snapshot" and needle in rec.get("channel", ""):
                return rec["msg"]
    return None


def find_recorded_snapshot(directory: str | Path, symbol: str) -> dict | None:
    """Search every recording in ``directory`` whose name mentions ``symbol``."""
    d = Path(directory)
    if not d.is_dir():
        return None
    for f in sorted(d.iterdir()):
        if symbol in f.name and (f.name.endswith(".jsonl") or f.name.endswith(".jsonl.gz")):
            snap = load_recorded_snapshot(f, symbol)
            if snap is not None:
                return snap
    return None
