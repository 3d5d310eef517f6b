"""Per-venue REST cost facts and stream choices, as data, so budgets and validation
share one source.

The numbers are the venues' documented public per-IP limits at the time of writing
(see docs/exchanges.md). They drive `cryptoflow shards list` and the depth and stream
checks in `cryptoflow.config`; the live rate limiter still trusts the venues' usage
headers first.
"""

from __future__ import annotations

import attrs

BINANCE_DEPTH_LIMITS: tuple[int, ...] = (5, 10, 20, 50, 100, 500, 1000)
#: Binance diff-depth stream speeds: `<sym>@depth@<speed>` (250ms is plain `@depth`)
BINANCE_STREAM_SPEEDS: tuple[str, ...] = ("100ms", "250ms", "500ms")
#: Bybit linear `orderbook.<depth>.<sym>` topics (push intervals in bybit/rules.WS_DEPTHS)
BYBIT_STREAM_DEPTHS: tuple[int, ...] = (1, 50, 200, 1000)


@attrs.frozen
class VenueLimits:
    """One venue's per-IP REST budget, normalized to a minute."""

    limit_per_minute: int  # weight (or requests, where every request weighs 1) per IP
    unit: str  # "weight" or "requests": what the limit counts
    #: the WS diff stream starts without a book, so every (re)sync costs a REST snapshot.
    #: Bybit and OKX send a snapshot in-band: resyncing is a resubscribe, not a REST call.
    ws_needs_rest_snapshot: bool
    source: str  # where the figure comes from
    #: the venue's own accounting window in seconds: the budget paces within it, so a
    #: start-up burst cannot spend a minute's allowance in the venue's 2 s window (OKX)
    window: float = 60.0


VENUE_LIMITS: dict[str, VenueLimits] = {
    "binance": VenueLimits(2400, "weight", True, "Binance USD-M REQUEST_WEIGHT 2400/min/IP"),
    "bybit": VenueLimits(600 * 12, "requests", False, "Bybit v5 600 requests/5 s/IP", window=5.0),
    "okx": VenueLimits(
        40 * 30, "requests", False, "OKX books 40/2 s/IP (books-full 10/2 s)", window=2.0
    ),
    "kucoin": VenueLimits(
        2000 * 2, "weight", True, "KuCoin public pool 2000/30 s/IP, VIP0", window=30.0
    ),
}

#: KuCoin Futures "Get Full OrderBook - Level 2" weight in the public pool. (check) — the
#: official figure was not found; a third-party compliance note says 2, we assume 3.
KUCOIN_LEVEL2_SNAPSHOT_WEIGHT = 3

#: OKX `books` serves at most 400 levels; deeper books need `books-full` (max 5000), which
#: has its own, lower limit.
OKX_BOOKS_MAX = 400
OKX_BOOKS_FULL_MAX = 5000
OKX_BOOKS_FULL_PER_MINUTE = 10 * 30
BYBIT_LINEAR_MAX = 500


def binance_depth_weight(depth_limit: int) -> int:
    """Weight of one `/fapi/v1/depth` call; Binance prices by the requested level count."""
    if depth_limit <= 50:
        return 2
    if depth_limit <= 100:
        return 5
    if depth_limit <= 500:
        return 10
    return 20


def snapshot_cost(exchange: str, depth_limit: int) -> tuple[int, int]:
    """(weight per snapshot request, per-IP limit per minute in the same unit)."""
    if exchange == "binance":
        return binance_depth_weight(depth_limit), VENUE_LIMITS["binance"].limit_per_minute
    if exchange == "bybit":
        return 1, VENUE_LIMITS["bybit"].limit_per_minute
    if exchange == "okx":
        if depth_limit > OKX_BOOKS_MAX:
            return 1, OKX_BOOKS_FULL_PER_MINUTE
        return 1, VENUE_LIMITS["okx"].limit_per_minute
    if exchange == "kucoin":
        return KUCOIN_LEVEL2_SNAPSHOT_WEIGHT, VENUE_LIMITS["kucoin"].limit_per_minute
    raise KeyError(f"unknown exchange {exchange!r}")


def depth_limit_problem(exchange: str, depth_limit: int) -> str | None:
    """Why a venue would reject this REST depth, as '<wrong>, <expected>'; None if fine.

    KuCoin's level2 snapshot is always the full book, so any positive depth is accepted
    (it only matters for the other venues).
    """
    if exchange == "binance" and depth_limit not in BINANCE_DEPTH_LIMITS:
        allowed = ", ".join(str(n) for n in BINANCE_DEPTH_LIMITS)
        return f"{depth_limit} is not a Binance depth limit, expected one of {allowed}"
    if exchange == "bybit" and not 1 <= depth_limit <= BYBIT_LINEAR_MAX:
        return f"{depth_limit} is out of range, expected 1..{BYBIT_LINEAR_MAX} for Bybit linear"
    if exchange == "okx" and not 1 <= depth_limit <= OKX_BOOKS_FULL_MAX:
        return f"{depth_limit} is out of range, expected 1..{OKX_BOOKS_FULL_MAX} for OKX"
    return None


def stream_setting_problem(exchange: str, key: str, value: object) -> str | None:
    """Why `source.<exchange>.<key>` (stream_speed / stream_depth) names a stream the
    venue does not offer, as '<wrong>, <expected>'; None if fine.

    Only Binance reads stream_speed and only Bybit stream_depth (the schema is shared),
    but a value no venue offers is refused in every block: the Bybit client used to
    replace an unknown depth with 200 without a word.
    """
    if key == "stream_speed":
        allowed: tuple[object, ...] = BINANCE_STREAM_SPEEDS
        what = "a Binance stream speed" if exchange == "binance" else "a stream speed"
        note = "" if exchange == "binance" else " (only Binance reads it)"
    elif key == "stream_depth":
        allowed = BYBIT_STREAM_DEPTHS
        what = "a Bybit stream depth" if exchange == "bybit" else "a stream depth"
        note = "" if exchange == "bybit" else " (only Bybit reads it)"
    else:
        return None
    if value in allowed:
        return None
    shown = repr(value) if isinstance(value, str) else str(value)
    return f"{shown} is not {what}, expected one of {', '.join(map(str, allowed))}{note}"
