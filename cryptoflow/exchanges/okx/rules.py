"""OKX v5 swaps: the sequence rule and the venue constants the clients need.

Continuity (`books`, `books-l2-tbt`, `books50-l2-tbt` channels): the in-stream snapshot
has ``prevSeqId == -1``; every update's ``prevSeqId`` must equal the previous message's
``seqId`` (ids jump by arbitrary steps: identity, not +1). ``seqId == prevSeqId`` is a
heartbeat (no change). ``seqId`` may go *backwards* after OKX maintenance: not a gap as
long as ``prevSeqId`` matches. Anchoring on a REST `books` snapshot (OKX announced
dropping the in-stream snapshot): the first update to apply has
``prevSeqId <= seqId_REST < seqId``. On a break: gap, unsubscribe + resubscribe.

Normalized ids (see `DepthDiff`), from `diff_ids`:
- update: ``first = prevSeqId + 1``, ``last = seqId``, ``prev = prevSeqId``;
- heartbeat (``seqId == prevSeqId``) and a backwards reset (``seqId < prevSeqId``):
  ``first = last = seqId``, ``prev = prevSeqId`` (so a heartbeat has ``prev == last``);
- snapshot (``prevSeqId == -1`` or ``action: snapshot``): ``first = last = seqId``,
  ``prev = None``, ``is_snapshot = True``.
The shared check ``prev == previous last`` is then exactly OKX's rule, and the anchor
test ``first <= L + 1 <= last + 1`` is ``prevSeqId <= L <= seqId`` (``L == seqId``
re-applies an update already in the snapshot, which is harmless: sizes are absolute).

Frames without ``seqId``/``prevSeqId`` (captures before OKX added them, e.g. the 2021/2022
recordings): continuity can only be checked with the CRC32 ``checksum`` (`checksum.py`).
The parser then synthesizes ids from a per-connection `LegacySequencer` (snapshot n=1,
each update n+1, ``prev`` = previous n), so the id chain never breaks by itself and the
checksum is the only check; without a sequencer ``first = last = LEGACY_ID`` (0) and
``prev = None`` ("no previous id": the sync machine's rules let such a diff continue).
A REST `books` body without ``seqId`` gets ``last_update_id =
NO_SEQ_ID`` (-1): it cannot anchor a stream (no update has ``prevSeqId <= -1``), it only
serves the snapshot lane.

Checksum: frames since 23 Jun 2026 carry ``checksum: 0``; only non-zero values are checked.
"""

from __future__ import annotations

from typing import Final

import attrs

from cryptoflow.book.sync import SyncRules
from cryptoflow.exchanges.okx.checksum import book_checksum

EXCHANGE: Final = "okx"

REST_BASE: Final = "https://www.okx.com"
REST_BOOKS_PATH: Final = "/api/v5/market/books"  # sz <= 400, 40 req / 2 s / IP
REST_BOOKS_FULL_PATH: Final = "/api/v5/market/books-full"  # sz <= 5000, 10 req / 2 s / IP
REST_INSTRUMENTS_PATH: Final = "/api/v5/public/instruments"  # ?instType=SWAP
WS_URL: Final = "wss://ws.okx.com:8443/ws/v5/public"
BOOK_CHANNELS: Final = frozenset({"books", "books-l2-tbt", "books50-l2-tbt", "books5"})

#: send the text "ping" when nothing arrived for this long; OKX closes idle sockets at 30 s
PING_IDLE_S: Final = 25.0
IDLE_CLOSE_S: Final = 30.0
NEW_CONNECTIONS_PER_S: Final = 3
SUBSCRIBE_REQUESTS_PER_HOUR: Final = 480

CODE_OK: Final = "0"
RATE_LIMITED_CODES: Final = frozenset({"50011", "50061"})
SERVER_ERROR_CODES: Final = frozenset({"50001", "50004", "50013", "50026"})
RATE_LIMIT_RETRY_AFTER_S: Final = 2.0  # limits are per 2 s windows
#: notice code: the connection will be closed for a service upgrade, reconnect now
NOTICE_RECONNECT_CODE: Final = "64008"

SNAPSHOT_PREV_SEQ_ID: Final = -1
NO_SEQ_ID: Final = -1
LEGACY_ID: Final = 0

#: for the shared book-sync machine: a break is healed by unsubscribe + resubscribe
#: the book is kept so a non-zero `checksum` (captures before 23 Jun 2026) is validated
RULES: Final = SyncRules(venue=EXCHANGE, resync_by="resubscribe", checksum=book_checksum)


def diff_ids(seq_id: int, prev_seq_id: int, is_snapshot: bool) -> tuple[int, int, int | None]:
    """(first, last, prev) normalized ids for an OKX book message."""
    if is_snapshot or prev_seq_id == SNAPSHOT_PREV_SEQ_ID:
        return seq_id, seq_id, None
    if seq_id <= prev_seq_id:  # heartbeat or post-maintenance reset
        return seq_id, seq_id, prev_seq_id
    return prev_seq_id + 1, seq_id, prev_seq_id


@attrs.define
class LegacySequencer:
    """Per-connection counter giving frames without seqId/prevSeqId a continuous id chain.

    One instance per WebSocket connection; a snapshot restarts the symbol's chain at 1.
    """

    last: dict[str, int] = attrs.field(factory=dict)

    def next_ids(self, inst_id: str, is_snapshot: bool) -> tuple[int, int, int | None]:
        if is_snapshot or inst_id not in self.last:
            self.last[inst_id] = 1
            return 1, 1, None
        prev = self.last[inst_id]
        self.last[inst_id] = prev + 1
        return prev + 1, prev + 1, prev
