"""Records passed between pipeline stages, and the stored dataset schemas.

Times: exchange times are integer milliseconds since the epoch (UTC), local receive times
integer nanoseconds (`time.time_ns()`), so no stage does float arithmetic on timestamps.
Price levels stay exactly as the venue sent them (decimal strings) until the normalizer
casts whole columns at once: book keys are never floats while syncing.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

import attrs
import polars as pl

MARKET_FUTURES: Final = "futures"

#: One price level as the venue sent it: (price, size) decimal strings. Venues that send
#: extra fields per level (OKX: deprecated field, order count) are trimmed by their parser;
#: venues that send JSON numbers (KuCoin) are turned into strings by their parser.
Level = tuple[str, str]


class Dataset(StrEnum):
    SNAPSHOTS = "snapshots"
    DELTAS = "deltas"
    GAPS = "gaps"
    RAW = "raw"


class SnapshotSource(StrEnum):
    POLL = "poll"  # the periodic REST snapshot lane
    RESYNC = "resync"  # fetched by the delta lane to (re)anchor its book
    STREAM = "stream"  # an in-stream snapshot message (Bybit, OKX)
    REPLAY = "replay"  # read back from a recording


class GapKind(StrEnum):
    SEQUENCE_BREAK = "sequence_break"  # an update did not continue the previous one
    RECONNECT = "reconnect"  # the connection was lost and the stream did not continue
    CONSUMER_OVERLOAD = "consumer_overload"  # we dropped messages because downstream was full
    RESYNC = "resync"  # the book was re-anchored on a fresh snapshot after a break
    CHECKSUM = "checksum"  # OKX CRC32 of the top 25 levels did not match
    #: the collector (or a replay) started here: nothing stored before this row's
    #: first_id_after is known to be continuous with it (a restart's downtime)
    START = "start"


@attrs.frozen(slots=True)
class DepthSnapshot:
    """A full (or top-N) book at one update id: the original's RawFOBSMessage."""

    exchange: str
    market: str
    symbol: str  # normalized name, e.g. BTCUSDT
    event_time: int  # ms; venue's message time
    transaction_time: int | None  # ms; matching-engine time where the venue gives one
    last_update_id: int
    bids: list[Level]
    asks: list[Level]
    receive_time: int  # ns, local clock
    source: SnapshotSource = SnapshotSource.POLL


@attrs.frozen(slots=True)
class SnapshotBody:
    """A REST depth snapshot as the venue sent it, not parsed yet (Binance polls).

    A poll snapshot of a symbol whose book is already in sync is only stored, so its body
    can wait for the writer's flush and be parsed there with the other snapshots of that
    flush in one polars call (`pipeline/bodies.py`), off the event loop and without a
    Python object per level. The normalizer parses it at once when the book needs it."""

    exchange: str
    market: str
    symbol: str  # normalized name
    body: bytes
    receive_time: int  # ns, local clock
    source: SnapshotSource = SnapshotSource.POLL


@attrs.frozen(slots=True)
class DepthDiff:
    """One incremental update from a WebSocket diff stream, ids normalized per venue.

    `first_update_id`..`last_update_id` is the range of venue updates this message covers
    and `prev_update_id` the `last_update_id` the previous message must have had for the
    stream to be continuous (Binance U/u/pu; KuCoin and Bybit seq-1/seq/seq;
    OKX prevSeqId+1/seqId/prevSeqId). `is_snapshot` marks an in-stream snapshot (Bybit
    `snapshot`, OKX `action: snapshot`), which replaces the book instead of updating it.
    """

    exchange: str
    market: str
    symbol: str
    event_time: int
    transaction_time: int | None
    first_update_id: int
    last_update_id: int
    prev_update_id: int | None
    bids: list[Level]
    asks: list[Level]
    receive_time: int
    is_snapshot: bool = False
    checksum: int | None = None  # OKX CRC32 of the top 25 levels; None/0 = not checked


@attrs.frozen(slots=True)
class StreamEvent:
    """A control marker a stream reader puts in line with the diffs of one symbol.

    It tells the normalizer that continuity may be lost before the next diff: the
    connection was replaced (`RECONNECT`) or the reader dropped messages because the
    channel was full (`CONSUMER_OVERLOAD`, with how many). A `final` marker comes at the
    stop, when no next diff will: its gap is recorded at once.
    """

    exchange: str
    market: str
    symbol: str
    kind: GapKind
    time: int  # ns, local clock
    reason: str = ""
    dropped: int = 0
    final: bool = False


@attrs.frozen(slots=True)
class Gap:
    """A stretch of a symbol's stream that a reader of the data cannot trust."""

    exchange: str
    market: str
    symbol: str
    kind: GapKind
    last_good_id: int | None
    first_id_after: int | None
    start_time: int | None  # ms, event time of the last good message
    end_time: int | None  # ms, event time of the first message after the gap
    reason: str
    detected_at: int  # ns, local clock


# --- stored schemas ------------------------------------------------------------------

UTC_MS = pl.Datetime("ms", "UTC")
UTC_US = pl.Datetime("us", "UTC")

SNAPSHOT_SCHEMA: Final = pl.Schema(
    {
        "exchange": pl.String,
        "market": pl.String,
        "symbol": pl.String,
        "timestamp": UTC_MS,  # exchange event time
        "transaction_time": UTC_MS,
        "receive_time": UTC_US,
        "last_update_id": pl.Int64,
        "side": pl.String,  # "bid" | "ask"
        "level": pl.Int32,  # 0 = best price of that side
        "price": pl.Float64,
        "quantity": pl.Float64,  # base-asset units
        "raw_quantity": pl.Float64,  # venue units (contracts, lots); = quantity on Binance/Bybit
        "source": pl.String,  # SnapshotSource
    }
)

DELTA_SCHEMA: Final = pl.Schema(
    {
        "exchange": pl.String,
        "market": pl.String,
        "symbol": pl.String,
        "timestamp": UTC_MS,
        "transaction_time": UTC_MS,
        "receive_time": UTC_US,
        "first_update_id": pl.Int64,
        "last_update_id": pl.Int64,
        "prev_update_id": pl.Int64,
        "side": pl.String,
        "price": pl.Float64,
        "quantity": pl.Float64,  # 0 = level removed
        "raw_quantity": pl.Float64,
    }
)

GAP_SCHEMA: Final = pl.Schema(
    {
        "exchange": pl.String,
        "market": pl.String,
        "symbol": pl.String,
        "timestamp": UTC_MS,  # partition time: end_time, else start_time, else detected_at
        "kind": pl.String,
        "last_good_id": pl.Int64,
        "first_id_after": pl.Int64,
        "start_time": UTC_MS,
        "end_time": UTC_MS,
        "reason": pl.String,
        "detected_at": UTC_US,
    }
)

SCHEMAS: Final = {
    Dataset.SNAPSHOTS: SNAPSHOT_SCHEMA,
    Dataset.DELTAS: DELTA_SCHEMA,
    Dataset.GAPS: GAP_SCHEMA,
}
