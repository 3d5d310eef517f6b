"""KuCoin Futures: the sequence rule and the venue constants the clients need.

Continuity (`/contractMarket/level2:<symbol>`): every message carries one change and a
`sequence`; each must be the previous + 1. A message whose price is 0 changes no level
but its `sequence` still counts. The stream has no snapshot: buffer messages, fetch
`GET /api/v1/level2/snapshot` (its `data.sequence` = S), drop messages with
``sequence <= S``, apply from S + 1. On a break: gap, new snapshot, replay the buffer.

Normalized ids (see `DepthDiff`): ``first = last = sequence``, ``prev = sequence - 1``;
a REST snapshot's `last_update_id` is `data.sequence`. The shared check
``prev == previous last`` is KuCoin's +1 rule. (The shared anchor test
``first <= S + 1 <= last + 1`` also accepts the message with ``sequence == S``; it is
already in the snapshot and re-applying it is harmless because sizes are absolute.)

Numbers: the REST snapshot sends prices and sizes as JSON numbers and the stream sends
them inside the "price,side,size" string. Both are turned into one canonical decimal
text (`canonical_decimal`: no exponent, no trailing zeros, "5000.0" -> "5000",
1e-05 -> "0.00001") so a book keyed by price text matches between the two.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

from cryptoflow.book.sync import SyncRules

EXCHANGE: Final = "kucoin"
#: for the shared book-sync machine: a break is healed with a new REST snapshot
RULES: Final = SyncRules(venue=EXCHANGE, resync_by="rest")

REST_BASE: Final = "https://api-futures.kucoin.com"
REST_SNAPSHOT_PATH: Final = "/api/v1/level2/snapshot"
REST_INSTRUMENTS_PATH: Final = "/api/v1/contracts/active"
REST_BULLET_PATH: Final = "/api/v1/bullet-public"  # POST; token + instanceServers
LEVEL2_TOPIC_PREFIX: Final = "/contractMarket/level2:"

#: defaults when the bullet response does not say (it does: pingInterval/pingTimeout ms)
DEFAULT_PING_INTERVAL_S: Final = 18.0
DEFAULT_PING_TIMEOUT_S: Final = 10.0
MAX_TOPICS_PER_SUBSCRIBE: Final = 100
MAX_UPLINK_MESSAGES: Final = 100  # per UPLINK_WINDOW_S
UPLINK_WINDOW_S: Final = 10.0

CODE_OK: Final = "200000"
RATE_LIMITED_CODES: Final = frozenset({"429000"})
SERVER_ERROR_CODES: Final = frozenset({"500000", "503000"})
RATE_LIMIT_RETRY_AFTER_S: Final = 1.0  # the real wait is gw-ratelimit-reset (ms), a header


def diff_ids(sequence: int) -> tuple[int, int, int]:
    """(first, last, prev) normalized ids for a level2 message."""
    return sequence, sequence, sequence - 1


#: text that is already canonical (most prices and sizes): returned as it is. ASCII digits
#: only, no leading zeros, no exponent, no trailing zero after a '.'. A negative number
#: below 1 ("-0.5", "-0") goes the long way (`Decimal` decides; "-0" becomes "0").
_CANONICAL = re.compile(r"(?:0|-?[1-9][0-9]*)(?:\.[0-9]*[1-9])?")
is_canonical = _CANONICAL.fullmatch


#: an exponent form beyond 10**±40 is refused (no price or size comes near it)
MAX_EXPONENT = 40


def canonical_decimal(text: str) -> str:
    """Decimal text without exponent or trailing zeros: "5000.0" -> "5000", "1e-05" ->
    "0.00001", "27690.50" -> "27690.5". Exact (no float in between). ValueError if not a
    finite number."""
    if is_canonical(text) is not None:
        return text
    return _canonical_decimal_slow(text)


def _canonical_decimal_slow(text: str) -> str:
    """`canonical_decimal` by way of `Decimal` (the reference; also for any odd input)."""
    try:
        d = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"not a decimal number: {text!r}") from None
    if not d.is_finite():
        raise ValueError(f"not a finite number: {text!r}")
    if not -MAX_EXPONENT <= d.adjusted() <= MAX_EXPONENT and "e" in text.lower():
        # "1e999999999" would become a billion-digit string (memory, and the loop); a
        # long plain number is only as long as its text
        raise ValueError(f"out of range: {text!r}")
    s = format(d, "f")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def ns_to_ms(ts: int) -> int:
    """KuCoin REST `ts` is ns; stream `timestamp` is ms. Accept either (by magnitude:
    ns > 1e17, µs > 1e14, else ms) and return ms. The parsers then check the result
    against `fields.TIME_MIN_MS`.. (2000 .. 2100): within that window the three units
    lie in disjoint ranges, so the guess by magnitude is never ambiguous."""
    if ts > 10**17:
        return ts // 1_000_000
    if ts > 10**14:
        return ts // 1_000
    return ts
