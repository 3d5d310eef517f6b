"""Normalizer: venue records -> row batches, gap records and resync requests (pure).

One `Normalizer` per shard. It keeps one `BookSync` per (exchange, symbol) and flattens
every diff into `deltas` columns (all diffs received, see `book/sync.py`), every REST
snapshot (POLL, RESYNC, REPLAY) and in-stream snapshot (STREAM) into `snapshots` columns,
and every gap into `gaps` columns. Columns are plain lists grown with `list.extend`
(no per-row object); `frame_from_columns` turns a whole buffer into a typed polars frame
at flush time, with the one cast that makes decimal strings floats.

`feed` handles one item (live); `feed_many` handles a batch and returns one `RowBatch`
per (dataset, exchange, symbol) for the whole batch (replay, benchmarks). Both run the
same code per item, so their rows are identical.

`feed_frames` / `feed_snapshot_bodies` are the batch fast path (`pipeline/batch.py`):
raw frames / REST bodies are parsed in polars, only the per-message header goes through
the same `BookSync` (via `feed_many`), and the rows come out as one wire-typed polars
frame per symbol (`NormalizeOutput.frames`) instead of column lists. They return None
when the batch must take the simple path (book tracking on, a venue without a batch
parser, or anything unusual in the batch); the output is then identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from operator import itemgetter

import attrs
import polars as pl

from cryptoflow.book.sync import BookSync, Decision, SyncCounters, SyncRules
from cryptoflow.errors import ExchangeError
from cryptoflow.models import (
    SCHEMAS,
    UTC_MS,
    UTC_US,
    Dataset,
    DepthDiff,
    DepthSnapshot,
    Gap,
    SnapshotBody,
    SnapshotSource,
    StreamEvent,
)
from cryptoflow.pipeline import batch as fast
from cryptoflow.pipeline.bodies import BodyBatch, SnapshotCodec
from cryptoflow.pipeline.rows import RowBatch

_price = itemgetter(0)
_qty = itemgetter(1)

DELTA_COLUMNS = (
    "timestamp",
    "transaction_time",
    "receive_time",
    "first_update_id",
    "last_update_id",
    "prev_update_id",
    "side",
    "price",
    "raw_quantity",
)
SNAPSHOT_COLUMNS = (
    "timestamp",
    "transaction_time",
    "receive_time",
    "last_update_id",
    "side",
    "level",
    "price",
    "raw_quantity",
    "source",
)
GAP_COLUMNS = (
    "timestamp",
    "kind",
    "last_good_id",
    "first_id_after",
    "start_time",
    "end_time",
    "reason",
    "detected_at",
)
_COLUMNS = {
    Dataset.DELTAS: DELTA_COLUMNS,
    Dataset.SNAPSHOTS: SNAPSHOT_COLUMNS,
    Dataset.GAPS: GAP_COLUMNS,
}


@attrs.define(slots=True)
class NormalizeOutput:
    batches: list[RowBatch] = attrs.field(factory=list)
    gaps: list[Gap] = attrs.field(factory=list)
    #: (exchange, symbol) whose book needs a fresh snapshot (REST fetch or resubscribe)
    resync_requests: list[tuple[str, str]] = attrs.field(factory=list)
    #: this call's counts: delta_rows, snapshot_rows, gap_rows, diffs, snapshots, dropped
    counters: dict[str, int] = attrs.field(factory=dict)
    #: fast path only: wire-typed frames (the same columns as `batches`' lists)
    frames: list[FrameBatch] = attrs.field(factory=list)
    #: poll snapshots left unparsed for the writer (`pipeline/bodies.py`)
    bodies: list[BodyBatch] = attrs.field(factory=list)
    #: snapshot bodies that could not be parsed: (symbol, message naming exchange, symbol, why)
    errors: list[tuple[str, str]] = attrs.field(factory=list)


@attrs.define(slots=True)
class FrameBatch:
    """Rows of one (dataset, exchange, market, symbol) as a wire-typed polars frame
    (the columns and types `RowBatch.columns` would hold), from the fast path."""

    dataset: Dataset
    exchange: str
    market: str
    symbol: str
    frame: pl.DataFrame
    multiplier: str = "1"

    @property
    def rows(self) -> int:
        return self.frame.height


#: venues whose raw frames `pipeline/batch.py` can read (Binance USD-M today)
FAST_VENUES = frozenset({"binance"})
_NO_LEVELS: list = []


class Normalizer:
    def __init__(
        self,
        rules: Mapping[str, SyncRules],
        *,
        track_book: bool = False,
        codecs: Mapping[str, SnapshotCodec] | None = None,
        mark_start: bool = False,
    ) -> None:
        """`mark_start`: each symbol's first diff also gives a `START` gap row (the live
        collector: where a restart's downtime begins to show; see `BookSync`)."""
        self._rules = dict(rules)
        self._mark_start = mark_start
        #: per exchange: how its `SnapshotBody` items are read (venues that send them)
        self._codecs = dict(codecs or {})
        self._track_book = track_book
        self._syncs: dict[tuple[str, str], BookSync] = {}
        self._multipliers: dict[tuple[str, str], str] = {}

    def set_multiplier(self, exchange: str, symbol: str, multiplier: str) -> None:
        """Venue size unit -> base units as decimal text (OKX ctVal, KuCoin multiplier)."""
        self._multipliers[(exchange, symbol)] = multiplier

    def multiplier(self, exchange: str, symbol: str) -> str:
        return self._multipliers.get((exchange, symbol), "1")

    def sync(self, exchange: str, market: str, symbol: str) -> BookSync:
        key = (exchange, symbol)
        s = self._syncs.get(key)
        if s is None:
            s = BookSync(
                exchange,
                market,
                symbol,
                self._rules[exchange],
                track_book=self._track_book,
                mark_start=self._mark_start,
            )
            self._syncs[key] = s
        return s

    def syncs(self) -> dict[tuple[str, str], BookSync]:
        return dict(self._syncs)

    def totals(self) -> SyncCounters:
        total = SyncCounters()
        for s in self._syncs.values():
            total.add(s.counters)
        return total

    def feed(self, item: DepthSnapshot | SnapshotBody | DepthDiff | StreamEvent) -> NormalizeOutput:
        return self.feed_many((item,))

    def feed_many(
        self,
        items: Iterable[DepthSnapshot | SnapshotBody | DepthDiff | StreamEvent],
        *,
        recorded: list[bool] | None = None,
        header_only: bool = False,
    ) -> NormalizeOutput:
        """`recorded`, when given, receives `Decision.record` of every diff in order;
        `header_only`: the diffs carry only their ids (the batch path builds their rows)."""
        out = NormalizeOutput()
        acc: dict[tuple[Dataset, str, str, str], dict[str, list]] = {}
        rows: dict[tuple[Dataset, str, str, str], int] = {}
        counters = {"diffs": 0, "snapshots": 0, "dropped": 0}

        def cols_for(dataset: Dataset, exchange: str, market: str, symbol: str) -> dict[str, list]:
            key = (dataset, exchange, market, symbol)
            cols = acc.get(key)
            if cols is None:
                cols = acc[key] = {name: [] for name in _COLUMNS[dataset]}
                rows[key] = 0
            return cols

        def decided(d: Decision, item: DepthDiff) -> None:
            if d.gaps:
                out.gaps.extend(d.gaps)
                for gap in d.gaps:
                    _gap_rows(cols_for(Dataset.GAPS, gap.exchange, gap.market, gap.symbol), gap)
                    rows[(Dataset.GAPS, gap.exchange, gap.market, gap.symbol)] += 1
            if d.need_snapshot:
                out.resync_requests.append((item.exchange, item.symbol))

        syncs = self._syncs
        for item in items:
            cls = type(item)
            if cls is DepthDiff:
                counters["diffs"] += 1
                s = syncs.get((item.exchange, item.symbol)) or self.sync(
                    item.exchange, item.market, item.symbol
                )
                d = s.on_diff(item)
                if recorded is not None:
                    recorded.append(d.record)
                if d.record:
                    if item.is_snapshot:
                        cols = cols_for(Dataset.SNAPSHOTS, item.exchange, item.market, item.symbol)
                        key = (Dataset.SNAPSHOTS, item.exchange, item.market, item.symbol)
                        rows[key] += _snapshot_rows(
                            cols, item, item.last_update_id, SnapshotSource.STREAM
                        )
                    elif not header_only:
                        cols = cols_for(Dataset.DELTAS, item.exchange, item.market, item.symbol)
                        rows[(Dataset.DELTAS, item.exchange, item.market, item.symbol)] += (
                            _delta_rows(cols, item)
                        )
                else:
                    counters["dropped"] += 1
                if d.gaps or d.need_snapshot:
                    decided(d, item)
            elif cls is DepthSnapshot or cls is SnapshotBody:
                counters["snapshots"] += 1
                s = self.sync(item.exchange, item.market, item.symbol)
                if cls is SnapshotBody:
                    item = self._parse_body(item, s, out)
                    if item is None:  # left for the writer, or malformed
                        continue
                cols = cols_for(Dataset.SNAPSHOTS, item.exchange, item.market, item.symbol)
                key = (Dataset.SNAPSHOTS, item.exchange, item.market, item.symbol)
                rows[key] += _snapshot_rows(cols, item, item.last_update_id, item.source)
                decided(s.on_snapshot(item), item)
            elif cls is StreamEvent:
                d = self.sync(item.exchange, item.market, item.symbol).on_event(item)
                for gap in d.gaps:  # a final marker: no diff will follow to carry it
                    out.gaps.append(gap)
                    _gap_rows(cols_for(Dataset.GAPS, gap.exchange, gap.market, gap.symbol), gap)
                    rows[(Dataset.GAPS, gap.exchange, gap.market, gap.symbol)] += 1
            else:
                raise TypeError(f"cannot normalize {cls.__name__}")

        counters.update(delta_rows=0, snapshot_rows=0, gap_rows=0)
        for (dataset, exchange, market, symbol), cols in acc.items():
            n = rows[(dataset, exchange, market, symbol)]
            counters[f"{dataset.value[:-1]}_rows"] += n
            if n:
                out.batches.append(
                    RowBatch(
                        dataset=dataset,
                        exchange=exchange,
                        market=market,
                        symbol=symbol,
                        columns=cols,
                        rows=n,
                        multiplier=self._multipliers.get((exchange, symbol), "1"),
                    )
                )
        counters["snapshot_rows"] += sum(b.rows for b in out.bodies)
        out.counters = counters
        return out

    def _parse_body(
        self, body: SnapshotBody, sync: BookSync, out: NormalizeOutput
    ) -> DepthSnapshot | None:
        """An unparsed poll snapshot: handed to the writer as it is when the book has no
        use for it (`out.bodies`), else parsed now. None when it is left for the writer or
        malformed (`out.errors`)."""
        codec = self._codecs[body.exchange]
        # a body without levels costs nothing to parse now, and one that is not a depth
        # snapshot at all (an error page) is then reported at once
        levels = codec.count_levels(body.body)
        if levels and sync.on_unread_snapshot():
            out.bodies.append(
                BodyBatch(
                    body.exchange,
                    body.market,
                    body.symbol,
                    [body],
                    levels,
                    codec,
                    self._multipliers.get((body.exchange, body.symbol), "1"),
                    on_rejected=sync.on_body_rejected,
                )
            )
            return None
        try:
            return codec.parse(body.body, body.symbol, body.receive_time, body.source)
        except ExchangeError as exc:  # malformed, or an error code the fetch let through
            out.errors.append((body.symbol, str(exc)))
            return None

    # --- batch fast path ---------------------------------------------------------------

    def _fast_ok(self, exchange: str) -> bool:
        """The fast path feeds header-only records (no levels): only where no book is
        kept (no `track_book`, no venue checksum) and the venue has a batch reader."""
        rules = self._rules.get(exchange)
        return (
            not self._track_book
            and exchange in FAST_VENUES
            and rules is not None
            and getattr(rules, "checksum", None) is None
        )

    def feed_frames(
        self,
        exchange: str,
        market: str,
        frames: Sequence[bytes],
        receive_ns: Sequence[int],
        symbols: Mapping[str, str] | None = None,
    ) -> NormalizeOutput | None:
        """Raw WebSocket frames (with their receive times) -> rows, parsed as one batch.

        Same book sync, counters and gaps as parsing each frame and calling `feed_many`;
        delta rows come back as `out.frames`. None: use the simple path for this batch
        (nothing was fed).
        """
        if not self._fast_ok(exchange):
            return None
        parsed = fast.read_diff_frames(frames)
        if parsed is None:
            return None
        heads = parsed.heads
        if symbols:
            heads = heads.with_columns(pl.col("s").replace(dict(symbols)))
        sym, e, t, first, last, prev = (
            heads.get_column(c).to_list() for c in ("s", "E", "T", "U", "u", "pu")
        )
        diffs = [
            DepthDiff(exchange, market, s, ev, tt, u0, u1, pu, _NO_LEVELS, _NO_LEVELS, recv)
            for s, ev, tt, u0, u1, pu, recv in zip(
                sym, e, t, first, last, prev, receive_ns, strict=True
            )
        ]
        recorded: list[bool] = []
        out = self.feed_many(diffs, recorded=recorded, header_only=True)
        rows = parsed.rows
        per_frame = pl.DataFrame(
            {
                "_s": pl.Series(sym, dtype=pl.String),
                "receive_time": pl.Series(receive_ns, dtype=pl.Int64),
                "_keep": pl.Series(recorded, dtype=pl.Boolean),
            }
        )
        idx = pl.col("_i")
        rows = rows.with_columns(
            pl.lit(per_frame.get_column(c)).gather(idx).alias(c) for c in per_frame.columns
        )
        if not all(recorded):  # dropped exact duplicates
            rows = rows.filter("_keep")
        if len(set(sym)) == 1:
            parts = {sym[0]: rows}
        else:
            parts = {
                k[0]: v
                for k, v in rows.partition_by("_s", as_dict=True, maintain_order=True).items()
            }
        for symbol, part in parts.items():
            if part.height:
                out.counters["delta_rows"] += part.height
                out.frames.append(
                    FrameBatch(
                        Dataset.DELTAS,
                        exchange,
                        market,
                        symbol,
                        part.select(DELTA_COLUMNS),
                        self._multipliers.get((exchange, symbol), "1"),
                    )
                )
        return out

    def feed_snapshot_bodies(
        self,
        exchange: str,
        market: str,
        symbols: Sequence[str],
        bodies: Sequence[bytes],
        receive_ns: Sequence[int],
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> NormalizeOutput | None:
        """Raw REST snapshot bodies (of `symbols[i]`) -> snapshot rows as frames, and each
        snapshot through its book sync, as `parse_rest_snapshot` + `feed_many` would.
        None: use the simple path for this batch (nothing was fed)."""
        if not self._fast_ok(exchange):
            return None
        parsed = fast.read_snapshot_bodies(bodies, receive_ns, source.value)
        if parsed is None:
            return None
        ids, times, ttimes = (
            parsed.heads.get_column(c).to_list() for c in ("lastUpdateId", "event_time", "T")
        )
        out = self.feed_many(
            [
                DepthSnapshot(
                    exchange, market, s, ev, tt, lid, _NO_LEVELS, _NO_LEVELS, recv, source
                )
                for s, ev, tt, lid, recv in zip(
                    symbols, times, ttimes, ids, receive_ns, strict=True
                )
            ]
        )
        rows = parsed.rows
        if len(set(symbols)) == 1:
            parts = {symbols[0]: rows}
        else:
            rows = rows.with_columns(
                pl.lit(pl.Series(list(symbols), dtype=pl.String)).gather("_i").alias("_s")
            )
            parts = {
                k[0]: v
                for k, v in rows.partition_by("_s", as_dict=True, maintain_order=True).items()
            }
        for symbol, part in parts.items():
            if part.height:
                out.counters["snapshot_rows"] += part.height
                out.frames.append(
                    FrameBatch(
                        Dataset.SNAPSHOTS,
                        exchange,
                        market,
                        symbol,
                        part.select(SNAPSHOT_COLUMNS),
                        self._multipliers.get((exchange, symbol), "1"),
                    )
                )
        return out


def _delta_rows(cols: dict[str, list], d: DepthDiff) -> int:
    b, a = d.bids, d.asks
    nb = len(b)
    n = nb + len(a)
    if n == 1:
        # one change (every KuCoin message, ~2/3 of all at the full table): appends
        # cost 0.5 µs where building nine one-item lists to extend with cost 2.2 µs
        price, qty = b[0] if nb else a[0]
        return _one_row(cols, d, "bid" if nb else "ask", price, qty)
    if not n:
        return _marker_row(cols, d)
    cols["timestamp"].extend([d.event_time] * n)
    cols["transaction_time"].extend([d.transaction_time] * n)
    cols["receive_time"].extend([d.receive_time] * n)
    cols["first_update_id"].extend([d.first_update_id] * n)
    cols["last_update_id"].extend([d.last_update_id] * n)
    cols["prev_update_id"].extend([d.prev_update_id] * n)
    side = cols["side"]
    side.extend(["bid"] * nb)
    side.extend(["ask"] * (n - nb))
    price = cols["price"]
    price.extend(map(_price, b))
    price.extend(map(_price, a))
    qty = cols["raw_quantity"]
    qty.extend(map(_qty, b))
    qty.extend(map(_qty, a))
    return n


def _marker_row(cols: dict[str, list], d: DepthDiff) -> int:
    """A diff that changes no level (KuCoin's price-0 change, an empty OKX update) but
    moves the id chain on is stored as one row with side, price and quantity null: without
    it the stored ids would show a hole where nothing was lost, and `verify` and `book`
    (which check the chain on the stored rows alone) could not tell it from a lost file.
    A heartbeat that repeats its id (OKX `seqId == prevSeqId`) moves nothing: no row."""
    if d.prev_update_id is None or d.prev_update_id == d.last_update_id:
        return 0
    return _one_row(cols, d, None, None, None)


def _one_row(
    cols: dict[str, list], d: DepthDiff, side: str | None, price: str | None, qty: str | None
) -> int:
    cols["timestamp"].append(d.event_time)
    cols["transaction_time"].append(d.transaction_time)
    cols["receive_time"].append(d.receive_time)
    cols["first_update_id"].append(d.first_update_id)
    cols["last_update_id"].append(d.last_update_id)
    cols["prev_update_id"].append(d.prev_update_id)
    cols["side"].append(side)
    cols["price"].append(price)
    cols["raw_quantity"].append(qty)
    return 1


def _snapshot_rows(
    cols: dict[str, list], s: DepthSnapshot | DepthDiff, update_id: int, source: SnapshotSource
) -> int:
    b, a = s.bids, s.asks
    nb, na = len(b), len(a)
    n = nb + na
    cols["timestamp"].extend([s.event_time] * n)
    cols["transaction_time"].extend([s.transaction_time] * n)
    cols["receive_time"].extend([s.receive_time] * n)
    cols["last_update_id"].extend([update_id] * n)
    cols["side"].extend(["bid"] * nb)
    cols["side"].extend(["ask"] * na)
    level = cols["level"]
    level.extend(_level_numbers(nb))
    level.extend(_level_numbers(na))
    cols["price"].extend(map(_price, b))
    cols["price"].extend(map(_price, a))
    cols["raw_quantity"].extend(map(_qty, b))
    cols["raw_quantity"].extend(map(_qty, a))
    cols["source"].extend([source.value] * n)
    return n


#: 0, 1, 2, ...: level numbers as shared int objects (`range` makes new ints above 256)
_LEVELS: list[int] = list(range(1024))


def _level_numbers(n: int) -> list[int]:
    """[0, 1, ..., n-1], copied from one shared list: cheaper than `range` for deep books."""
    if n > len(_LEVELS):
        _LEVELS.extend(range(len(_LEVELS), n))
    return _LEVELS[:n]


def _gap_rows(cols: dict[str, list], g: Gap) -> None:
    if g.end_time is not None:
        ts = g.end_time
    elif g.start_time is not None:
        ts = g.start_time
    else:
        ts = g.detected_at // 1_000_000
    cols["timestamp"].append(ts)
    cols["kind"].append(g.kind.value)
    cols["last_good_id"].append(g.last_good_id)
    cols["first_id_after"].append(g.first_id_after)
    cols["start_time"].append(g.start_time)
    cols["end_time"].append(g.end_time)
    cols["reason"].append(g.reason)
    cols["detected_at"].append(g.detected_at)


# --- frames ------------------------------------------------------------------------------

_MS_COLUMNS = ("timestamp", "transaction_time", "start_time", "end_time")
_NS_COLUMNS = ("receive_time", "detected_at")
_INT_COLUMNS = (
    "first_update_id",
    "last_update_id",
    "prev_update_id",
    "last_good_id",
    "first_id_after",
)
_MAX_EXACT_DIGITS = 15


def _is_unit(multiplier: str) -> bool:
    try:
        return float(multiplier) == 1.0
    except ValueError:
        return False


def _scale_of(expr: pl.Expr) -> pl.Expr:
    """Digits after the decimal point of a decimal-string column."""
    return expr.str.extract(r"\.(\d*)$", 1).str.len_chars().fill_null(0)


def frame_from_columns(
    dataset: Dataset,
    exchange: str,
    market: str,
    symbol: str,
    columns: dict[str, list],
    multiplier: str | pl.Series = "1",
) -> pl.DataFrame:
    """Column lists (wire types, see `pipeline/rows.py`) -> a frame with exactly
    `models.SCHEMAS[dataset]`.

    Decimal strings are cast to Float64 by polars (correctly rounded, so equal to Python's
    `float(text)`). `quantity = raw_quantity × multiplier` is computed in Decimal, then
    cast, so "3" × "0.1" is 0.3 and not 0.30000000000000004. `multiplier` may be one per
    row (`frame_from_wire`).
    """
    return frame_from_wire(dataset, exchange, market, symbol, wire_frame(columns), multiplier)


def wire_frame(columns: Mapping[str, list]) -> pl.DataFrame:
    """Column lists -> the same columns as a polars frame with their wire types (ints
    Int64, text String): what the fast path's `FrameBatch.frame` holds."""
    n = len(next(iter(columns.values()))) if columns else 0
    series = []
    for name, values in columns.items():
        if name in _MS_COLUMNS or name in _NS_COLUMNS or name in _INT_COLUMNS or name == "level":
            series.append(pl.Series(name, values, dtype=pl.Int64))
        else:
            series.append(pl.Series(name, values, dtype=pl.String))
    return pl.DataFrame(series, height=n)


def frame_from_wire(
    dataset: Dataset,
    exchange: str,
    market: str,
    symbol: str,
    df: pl.DataFrame,
    multiplier: str | pl.Series = "1",
) -> pl.DataFrame:
    """A wire-typed frame (the columns of `frame_from_columns`, ints as Int64, text as
    String) -> the stored schema. Both the simple and the fast path end here.

    `multiplier` is the contract multiplier of the frame's symbol, or a String Series with
    one per row for a frame of several symbols (the writer's journal rounds); then a
    `ValueError` when `scaled_per_row` cannot give every row its own exact product.

    One `select` with one expression per stored column (each cast straight to its stored
    type): polars' fixed cost per call matters, as the writer builds a frame per snapshot."""
    dataset = Dataset(dataset)
    schema = SCHEMAS[dataset]
    consts = {"exchange": exchange, "market": market, "symbol": symbol}
    exprs: list[pl.Expr] = []
    for name, dtype in schema.items():
        if name in consts:
            expr = pl.lit(consts[name], pl.String)
        elif name in _MS_COLUMNS:
            expr = pl.col(name).cast(UTC_MS)
        elif name in _NS_COLUMNS:
            expr = (pl.col(name) // 1000).cast(UTC_US)
        elif name == "quantity":
            if isinstance(multiplier, pl.Series):
                scaled = scaled_per_row(df, multiplier)
                if scaled is None:
                    raise ValueError("multipliers too wide for one exact decimal product")
                expr = scaled
            elif _is_unit(multiplier):
                expr = pl.col("raw_quantity").cast(pl.Float64)
            else:
                expr = _scaled(df, multiplier)
        else:
            expr = pl.col(name).cast(dtype)
        exprs.append(expr.alias(name))
    out = df.select(exprs)
    assert out.schema == schema, (out.schema, schema)
    return out


def _scaled(df: pl.DataFrame, multiplier: str) -> pl.Expr:
    """raw × multiplier in exact decimal arithmetic (scales chosen to fit 38 digits).

    A raw size that is not a plain decimal ("1e-5": polars' decimal parse would cut it to
    the scale found, i.e. 0) is multiplied in Python's Decimal instead, row by row."""
    mult_scale = _decimals(multiplier)
    raw_scale, plain = _raw_scale(df)
    if not plain:
        factor = Decimal(multiplier)
        return pl.col("raw_quantity").map_elements(
            lambda raw: float(Decimal(raw) * factor), return_dtype=pl.Float64
        )
    raw_scale = min(raw_scale, 38 - mult_scale)
    return _product(raw_scale, pl.lit(multiplier), mult_scale)


def scaled_per_row(df: pl.DataFrame, multipliers: pl.Series) -> pl.Expr | None:
    """`quantity` for a frame of several symbols, each row with its own multiplier: the
    writer builds a journal round's rows of every symbol of a venue in one frame, and each
    KuCoin or OKX contract has its own multiplier (one build per multiplier was ~0.5-1 ms
    of fixed polars work per symbol, ~25 ms a round).

    A row gets exactly the value `_scaled` gives it in a frame of its own symbol: the
    scales here are at least the ones it would use, so every product is the exact decimal
    product either way, and polars casts an exact decimal to the nearest Float64
    (tests/test_journal.py checks both against Python's Decimal). None (the caller then
    builds per symbol) when a raw size is not a plain decimal, or when the scales would
    leave fewer than 18 integer digits."""
    mult_scale = max((_decimals(m) for m in multipliers.unique().to_list()), default=0)
    raw_scale, plain = _raw_scale(df)
    if not plain or raw_scale + mult_scale > 20:
        return None
    return _product(raw_scale, pl.lit(multipliers), mult_scale)


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


#: what polars' `str.to_decimal` reads exactly at the scale `_scale_of` finds
_PLAIN_DECIMAL = r"^-?[0-9]+(\.[0-9]*)?$"


def _raw_scale(df: pl.DataFrame) -> tuple[int, bool]:
    """(most digits after the point in `raw_quantity`, every value a plain decimal)."""
    raw = pl.col("raw_quantity")
    scale, plain = df.select(
        _scale_of(raw).max().alias("scale"), raw.str.contains(_PLAIN_DECIMAL).all().alias("plain")
    ).row(0)
    return int(scale or 0), bool(plain)


def _product(raw_scale: int, mult: pl.Expr, mult_scale: int) -> pl.Expr:
    # polars gives a product the larger of the two scales, not their sum: give the
    # multiplier the product's scale so nothing is cut ("45.02" x "0.01" = 0.4502, not 0.45)
    mult = mult.str.to_decimal(scale=raw_scale + mult_scale)
    return (pl.col("raw_quantity").str.to_decimal(scale=raw_scale) * mult).cast(pl.Float64)


def excess_digit_count(columns: Mapping[str, list] | pl.DataFrame) -> int:
    """How many price / raw_quantity values have more than 15 significant digits, i.e.
    might not survive the float64 round trip (the design's ingest check; log if > 0).
    Takes column lists or a wire frame."""
    total = 0
    for name in ("price", "raw_quantity"):
        if isinstance(columns, pl.DataFrame):
            values = columns.get_column(name) if name in columns.columns else None
        else:
            values = columns.get(name)
        if values is None or not len(values):
            continue
        digits = (
            pl.Series(values, dtype=pl.String)
            .str.replace(r"[eE].*$", "")
            .str.replace_all(r"[^0-9]", "")
            .str.strip_chars_start("0")
            .str.strip_chars_end("0")
            .str.len_chars()
        )
        total += int((digits > _MAX_EXACT_DIGITS).sum())
    return total


def frame_from_batch(batch: RowBatch | FrameBatch) -> pl.DataFrame:
    if isinstance(batch, FrameBatch):
        return frame_from_wire(
            batch.dataset, batch.exchange, batch.market, batch.symbol, batch.frame, batch.multiplier
        )
    return frame_from_columns(
        batch.dataset, batch.exchange, batch.market, batch.symbol, batch.columns, batch.multiplier
    )
