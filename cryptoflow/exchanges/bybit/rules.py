"""Bybit v5 linear: the sequence rule and the venue constants the clients need.

Continuity (`orderbook.<depth>.<symbol>` topic): the first push after subscribing is a
`snapshot` that replaces the book; every `delta` must have `u` == previous `u` + 1
(checked on real captures; the docs only call `u` "continuous in general"). A new
`snapshot` at any time replaces the book, and `u == 1` means Bybit restarted the
service: that message is a full snapshot whatever its `type` says. On a break: record a
gap and unsubscribe/resubscribe for a fresh snapshot.

Normalized ids (see `DepthDiff`): a delta covers exactly one update, so
``first = last = u`` and ``prev = u - 1``; a snapshot has ``first = last = u`` and
``prev = None``. The shared sync machine's check ``prev == previous last`` is then exactly
Bybit's ``u == previous u + 1``. A REST snapshot's `last_update_id` is `result.u`.

Depth 1: an unchanged book is re-pushed as a `snapshot` every 3 s with the same `u`;
that is a book reset, not a gap.
"""

from __future__ import annotations

from typing import Final

from cryptoflow.book.sync import SyncRules

EXCHANGE: Final = "bybit"
#: for the shared book-sync machine: a break is healed by unsubscribe + resubscribe
RULES: Final = SyncRules(venue=EXCHANGE, resync_by="resubscribe")
CATEGORY: Final = "linear"

REST_BASE: Final = "https://api.bybit.com"
REST_DEPTH_PATH: Final = "/v5/market/orderbook"
REST_DEPTH_MAX_LIMIT: Final = 500  # linear: 1..500
REST_INSTRUMENTS_PATH: Final = "/v5/market/instruments-info"
WS_URL: Final = "wss://stream.bybit.com/v5/public/linear"

#: public depth topics for linear and their push intervals (ms)
WS_DEPTHS: Final = {1: 10, 50: 20, 200: 100, 1000: 200}
#: client sends {"op": "ping"} this often
PING_INTERVAL_S: Final = 20.0
#: Bybit caps the args of one subscribe request; stay well under it
MAX_TOPICS_PER_SUBSCRIBE: Final = 10

#: retCode values in HTTP-200 bodies
RET_OK: Final = 0
RET_RATE_LIMITED: Final = 10006  # too many visits (per-API / per-UID)
RET_IP_RATE_LIMITED: Final = 10018  # per-IP limit
RET_SERVER_ERROR: Final = 10016  # internal error / service restarting
RATE_LIMITED_CODES: Final = frozenset({RET_RATE_LIMITED, RET_IP_RATE_LIMITED})
SERVER_ERROR_CODES: Final = frozenset({RET_SERVER_ERROR, 10000})  # 10000: server timeout
#: no Retry-After in the body: wait at least this long after a retCode throttle
RATE_LIMIT_RETRY_AFTER_S: Final = 1.0
#: HTTP 403 = IP rate ban of about 10 minutes
IP_BAN_STATUS: Final = 403
IP_BAN_RETRY_AFTER_S: Final = 600.0

#: `u == RESET_UPDATE_ID` marks a service restart: treat the message as a snapshot
RESET_UPDATE_ID: Final = 1


def diff_ids(u: int, is_snapshot: bool) -> tuple[int, int, int | None]:
    """(first, last, prev) normalized ids for a push with update id `u`."""
    if is_snapshot:
        return u, u, None
    return u, u, u - 1


def is_continuous(prev_u: int | None, u: int) -> bool:
    """Bybit's own rule, for tests and tools: a delta continues the previous push."""
    return prev_u is not None and u == prev_u + 1
