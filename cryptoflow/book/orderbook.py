"""Optional in-memory order book, used for drift checks against REST snapshots.

Levels are keyed by the price string exactly as the venue sent it, so no float ever
decides which level an update touches (two floats can collide, two venue strings for one
price cannot: a venue formats a symbol's prices one way). Floats are used only to *sort*
when the top of the book is asked for, which never feeds back into the book.
"""

from __future__ import annotations

from decimal import Decimal

import attrs

from cryptoflow.models import Level

_ZERO_CHARS = "0."


def is_zero(qty: str) -> bool:
    """ "0", "0.000", "0." -> True: a level with this size is removed (exact, no float)."""
    return not qty.strip(_ZERO_CHARS)


def _apply_side(side: dict[str, str], levels: list) -> None:
    for price, qty in levels:
        if qty.strip(_ZERO_CHARS):
            side[price] = qty
        else:
            side.pop(price, None)


@attrs.define(slots=True)
class OrderBook:
    bids: dict[str, str] = attrs.field(factory=dict)
    asks: dict[str, str] = attrs.field(factory=dict)
    last_update_id: int | None = None

    def reset(self, bids: list, asks: list, last_update_id: int) -> None:
        """Replace the whole book (REST or in-stream snapshot); zero sizes are skipped."""
        self.bids = {p: q for p, q in bids if q.strip(_ZERO_CHARS)}
        self.asks = {p: q for p, q in asks if q.strip(_ZERO_CHARS)}
        self.last_update_id = last_update_id

    def apply(self, bids: list, asks: list, last_update_id: int) -> None:
        """Apply one diff: sizes are absolute, zero removes; order within a diff is free."""
        _apply_side(self.bids, bids)
        _apply_side(self.asks, asks)
        self.last_update_id = last_update_id

    def top(self, n: int) -> tuple[list[Level], list[Level]]:
        """Best `n` bids (highest first) and asks (lowest first) as venue strings."""
        bids = sorted(self.bids.items(), key=lambda kv: float(kv[0]), reverse=True)[:n]
        asks = sorted(self.asks.items(), key=lambda kv: float(kv[0]))[:n]
        return bids, asks

    def crossed(self) -> bool:
        bids, asks = self.top(1)
        return bool(bids and asks) and Decimal(bids[0][0]) >= Decimal(asks[0][0])

    def matches(self, bids: list, asks: list, n: int = 20) -> bool:
        """Whether the top `n` levels of a snapshot's sides equal this book's, compared as
        decimals (so "0.010" == "0.01"). Snapshot levels may arrive in any order."""
        other = OrderBook()
        other.reset(bids, asks, -1)
        return _canon(self.top(n)) == _canon(other.top(n))


def _canon(sides: tuple[list[Level], list[Level]]) -> tuple:
    return tuple(tuple((Decimal(p), Decimal(q)) for p, q in side) for side in sides)
