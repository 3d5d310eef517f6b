"""The writer stage: RowBatch buffers -> Parquet files in the spool -> verified uploads.

Flow per buffer key (dataset, exchange, market, symbol):
- `RowBatch.columns` lists are appended with `list.extend` (no per-row objects).
- A buffer is flushed when its dataset's interval has elapsed since its first row
  (`snapshot_flush_interval`, `delta_flush_interval`, `gap_flush_interval`; delta and gap
  intervals are capped by `storage.spool.max_age`, the durability bound), or when it
  reaches `max_rows` / about `max_bytes` of memory, or when all buffers together reach
  `max_total_bytes` of memory (the memory cap; compacted frames are counted at their
  Arrow size, rows still in lists at `CELL_BYTES` a cell).
- Flush (one thread call behind the CapacityLimiter): build the typed frame, split by
  event-time hour, encode zstd Parquet, `spool.write` (fsync + atomic rename). Deltas and
  gaps of every symbol due in one round go to ONE journal file per dataset
  (`Spool.write_journal`): at the full table that is one encode + fsync a second instead
  of ~125; uploaders split journals into per-partition files first (`Spool.split`). The spool
  entries are then picked up by uploader tasks that call `store.put_file` and delete the
  spool file only after a verified success. Failed uploads retry with capped exponential
  back-off + jitter while collection continues (the spool grows on disk, not in RAM).
  Rows the layout cannot place (an event time outside the years 0001-9999) are set
  aside in the spool's quarantine before a journal or spool file is written
  (`Spool.set_aside`), so a journal never holds a row its split cannot place. Any other
  failure of one buffer's flush that is not the spool's sets that buffer's rows aside
  (`_set_aside_buffer`): never the writer task, never the other buffers.
- Spool full (or the spool disk failing): the flush is refused, the rows stay buffered and
  the flush is retried with back-off. Once the buffers reach the memory cap
  the writer stops reading its input channel, so the bounded channel fills and the
  producers are back-pressured. Rows are never dropped silently.
- End of stream (input channel closed) or cancellation: within `shutdown_timeout` (a
  shielded cancel scope) every buffer is flushed and every spool file uploaded. Whatever
  is not uploaded by then stays in the spool (reported in the final log line, uploaded
  on the next start); rows that could not even be spooled are reported at ERROR.
- Start: the uploaders begin with whatever `spool.pending()` holds (files left by an
  earlier run), before and while new data arrives, even if none ever does.
- Optional raw capture (`RawCapture`): its buffers are flushed here too, at the delta
  interval, as `.jsonl.zst` files through the same spool and uploaders.
- Upload batching (`upload_interval` > 0, `storage.upload_interval`): the spool keeps its
  one-file-per-flush granularity (the loss bound), but a partition's files (dataset,
  exchange, market, symbol, event hour) are uploaded only once the oldest of them is
  `upload_interval` old, and then ALL of them (up to `MERGE_MAX_BYTES`) are first merged
  into one spool file (`Spool.merge`: durable, sources listed in its metadata, sources
  deleted after) which is uploaded as one object. The final drain, files left by an
  earlier run, and a spool past half of `max_bytes` upload without waiting. Raw-capture
  files are not merged. `upload_interval` 0: one object per spool file, as before.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import polars as pl
import trio

from cryptoflow.config_schema import BufferSection
from cryptoflow.errors import (
    TRANSIENT_ERRORS,
    SpoolFull,
    StorageError,
    StorageRejected,
    UnsafePartition,
)
from cryptoflow.models import SCHEMAS, Dataset, SnapshotBody
from cryptoflow.pipeline.bodies import BodyBatch, SnapshotCodec, frame_from_bodies
from cryptoflow.pipeline.rows import RowBatch
from cryptoflow.storage import layout, rawfile
from cryptoflow.storage.base import ObjectStore
from cryptoflow.storage.spool import (
    UNPLACED_DIR,
    Spool,
    SpoolEntry,
    concat_frames,
    dataset_of,
    is_journal,
)

log = logging.getLogger(__name__)

#: (dataset, exchange, market, symbol, columns, multiplier: one, or a String Series per row)
FrameBuilder = Callable[[Dataset, str, str, str, dict[str, list], "str | pl.Series"], pl.DataFrame]
BufferKey = tuple[Dataset, str, str, str]

#: at most this many source bytes (compressed) go into one merged object
MERGE_MAX_BYTES = 16 * 1024**2
#: ...and at most this many source files
MERGE_MAX_FILES = 4000

#: the final drain looks again this often (s) whether rows refused by a full spool fit
#: now, besides on each upload (a merge can free room too)
DRAIN_ROOM_POLL = 0.5

#: upper bounds (s) of the event -> spooled delay histogram (`WriterStats.spool_delay`)
DELAY_EDGES_S = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


#: RowBatches the writer takes from its input per wake-up before it yields to the flusher
DRAIN_BATCHES = 256

#: rough Python-object cost of one buffered cell (list slot + small int/str), for max_bytes
CELL_BYTES = 40


def default_frame_builder(
    dataset: Dataset,
    exchange: str,
    market: str,
    symbol: str,
    columns: dict[str, list],
    mult: str | pl.Series,
) -> pl.DataFrame:
    from cryptoflow.pipeline.normalize import frame_from_columns

    return frame_from_columns(dataset, exchange, market, symbol, columns, mult)


@attrs.define
class WriterStats:
    """Counters and gauges for metrics/status. Counters only grow."""

    #: per dataset; rows of poll bodies once read at their flush (exact, `_count_read`)
    rows_received: Counter[str] = attrs.field(factory=Counter)
    rows_spooled: Counter[str] = attrs.field(factory=Counter)  # rows in complete spool files
    rows_uploaded: Counter[str] = attrs.field(factory=Counter)  # rows verified in storage
    #: rows set aside in the spool's quarantine (the layout cannot place them), never
    #: uploaded; mirrors `Spool.set_aside_counts` (flushes and journal splits)
    rows_set_aside: Counter[str] = attrs.field(factory=Counter)
    #: rows received per (dataset, exchange, symbol), for per-symbol metrics and rows/s
    rows_by_symbol: Counter[tuple[str, str, str]] = attrs.field(factory=Counter)
    upload_seconds_sum: float = 0.0
    upload_seconds_count: int = 0
    upload_seconds_max: float = 0.0
    flushes: int = 0
    files_spooled: int = 0
    bytes_spooled: int = 0
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    upload_failures: int = 0
    flush_failures: int = 0  # spool refused (SpoolFull), spool disk error or MemoryError
    #: poll snapshot bodies left out at the flush: their venue parser rejects them
    snapshot_bodies_rejected: int = 0
    #: rows refused at intake: their exchange/market/symbol is no safe path component
    rows_refused_unsafe: int = 0
    spool_full_events: int = 0  # flushes refused because the spool is at max_bytes
    spool_warnings: int = 0  # "spool filling" (past 80 % of max_bytes) warnings issued
    raw_files: int = 0  # raw-capture files spooled
    raw_lines_uploaded: int = 0  # raw-capture lines verified in storage
    raw_dropped_lines: int = 0  # raw lines dropped (spool full for too long), logged ERROR
    startup_spool_files: int = 0  # files found in the spool at start (earlier runs)
    merges: int = 0  # merged files made for upload batching
    files_merged: int = 0  # spool files that went into them
    merge_failures: int = 0  # merges that failed (the files were uploaded one by one)
    # gauges
    buffered_rows: int = 0
    max_buffered_rows_seen: int = 0
    buffered_bytes: int = 0  # estimated memory of the buffers (the cap counts this)
    max_buffered_bytes_seen: int = 0
    #: delta rows per event -> spooled delay bucket (upper bounds DELAY_EDGES_S, then +inf)
    spool_delay: list[int] = attrs.field(factory=lambda: [0] * (len(DELAY_EDGES_S) + 1))
    #: the same from receive time: the collector's own share of that delay
    spool_delay_from_receive: list[int] = attrs.field(
        factory=lambda: [0] * (len(DELAY_EDGES_S) + 1)
    )
    splits: int = 0  # journal groups split into per-partition files
    split_failures: int = 0
    spool_files: int = 0
    spool_bytes: int = 0
    backpressure: bool = False  # True while the writer refuses to read its input
    #: rows are held because the spool refused them as full: they pile up in memory
    #: until uploads free room (/healthz says `spool_full`)
    spool_refusing: bool = False


#: rows kept as Python lists before a buffer compacts them into a typed polars frame:
#: lists are the cheapest way to append small batches, frames the cheapest way to hold
#: many rows (a 2,000-level snapshot is ~8x smaller as float64 columns than as strings)
COMPACT_ROWS = 2000


@attrs.define(eq=False)  # buffers are compared by identity
class _Buffer:
    key: BufferKey
    multiplier: str
    opened_at: float
    columns: dict[str, list] = attrs.field(factory=dict)
    frames: list[pl.DataFrame] = attrs.field(factory=list)
    #: poll snapshots not parsed yet: read at the flush, in its thread (`pipeline/bodies`)
    bodies: list[SnapshotBody] = attrs.field(factory=list)
    codec: SnapshotCodec | None = None
    rows: int = 0  # rows held; bodies count as the rows they hold if well formed
    #: rows set aside (`set_aside_unplaceable`) that the writer's gauge still counts
    aside: int = 0
    list_rows: int = 0  # rows still in `columns`
    frame_bytes: int = 0  # Arrow size of `frames`
    body_bytes: int = 0  # size of `bodies`
    #: rows `bodies` hold if well formed (in `rows`): an estimate, so not yet counted
    #: as received; a body its venue parser rejects at the flush holds none
    body_rows: int = 0
    #: rows bodies turned out to hold when read (in `rows` since) and the estimate they
    #: replaced, until the writer counts them received and corrects its gauge
    read_rows: int = 0
    read_estimate: int = 0
    #: why bodies were left out at the flush (their venue parser rejects them)
    rejected: list[str] = attrs.field(factory=list)
    on_rejected: Callable[[str], None] | None = None  # from the bodies' BodyBatch
    counted_bytes: int = 0  # what the writer's memory gauge holds for this buffer
    retry_at: float = float("-inf")
    failures: int = 0
    refused_full: bool = False  # its last flush was refused by a full spool
    refused_bytes: int = 0  # ...which needed this many bytes (`SpoolFull.nbytes`)

    def compact(self, builder: FrameBuilder) -> None:
        if self.list_rows:
            dataset, exchange, market, symbol = self.key
            frame = builder(dataset, exchange, market, symbol, self.columns, self.multiplier)
            self.frames.append(frame)
            self.frame_bytes += frame.estimated_size()
            self.columns = {}
            self.list_rows = 0

    @property
    def nbytes(self) -> int:
        """Estimated memory: frames at their Arrow size, list rows at CELL_BYTES a cell,
        bodies at their size."""
        return (
            self.frame_bytes
            + self.body_bytes
            + self.list_rows * max(1, len(self.columns)) * CELL_BYTES
        )

    def frame(self, builder: FrameBuilder) -> pl.DataFrame:
        """All rows as one frame; in the flush thread (this is where bodies are parsed)."""
        self.compact(builder)
        if self.bodies:
            self._read_bodies()
        if not self.frames:
            return pl.DataFrame(schema=SCHEMAS[self.key[0]])
        return self.frames[0] if len(self.frames) == 1 else pl.concat(self.frames)

    def set_aside_unplaceable(self, spool: Spool, builder: FrameBuilder) -> pl.DataFrame:
        """Set aside the rows the layout cannot place (`Spool.set_aside_unplaceable`) and
        drop them from the buffer; the rows it can place. Once durably set aside they are
        no longer this buffer's: kept, a flush retried after a spool refusal set them
        aside again, in one file with the rows of a younger buffer of the same symbol
        flushed in the same round (another content name): twice stored and counted."""
        ok, bad = spool.set_aside_unplaceable(self.key[0], self.frame(builder))
        if bad.height:
            self.frames, self.frame_bytes = [ok], ok.estimated_size()
            self.rows -= bad.height
            self.aside += bad.height
        return ok

    def _read_bodies(self) -> None:
        _, exchange, market, symbol = self.key
        assert self.codec is not None
        frame, rejected = frame_from_bodies(
            exchange, market, symbol, self.multiplier, self.codec, self.bodies
        )
        read = 0 if frame is None else frame.height
        if frame is not None and self.frames:
            # rows that came parsed (e.g. a resync snapshot) and bodies read now: keep
            # the file in arrival order, a snapshot's rows together (stable sort)
            frame = pl.concat([*self.frames, frame]).sort("receive_time", maintain_order=True)
        # the buffer changes only now: a MemoryError above (the merge of a big snapshot)
        # leaves its bodies in it for the retry; emptied before, their rows were lost
        self.rejected.extend(rejected)
        self.bodies, self.body_bytes = [], 0
        self.rows += read - self.body_rows
        self.read_rows += read
        self.read_estimate += self.body_rows
        self.body_rows = 0
        if frame is not None:
            self.frames = [frame]
            self.frame_bytes = frame.estimated_size()  # kept for a retry if the spool refuses

    def append_bodies(self, batch: BodyBatch) -> None:
        self.codec = batch.codec
        self.on_rejected = batch.on_rejected
        self.bodies.extend(batch.bodies)
        self.body_bytes += batch.nbytes
        self.rows += batch.rows
        self.body_rows += batch.rows

    def append(self, batch: RowBatch) -> None:
        self.list_rows += batch.rows
        cols = self.columns
        if cols and cols.keys() != batch.columns.keys():
            for name in cols.keys() - batch.columns.keys():  # keep columns aligned
                cols[name].extend([None] * batch.rows)
            for name in batch.columns.keys() - cols.keys():  # nulls for the rows in lists
                cols[name] = [None] * (self.list_rows - batch.rows)
        for name, values in batch.columns.items():
            cols.setdefault(name, []).extend(values)
        self.rows += batch.rows


class _Backoff:
    def __init__(self, initial: float, maximum: float) -> None:
        self.initial, self.maximum = initial, maximum

    def delay(self, failures: int) -> float:
        base = min(self.maximum, self.initial * (2 ** max(0, failures - 1)))
        return base * (0.5 + random.random() / 2)  # jitter: 50..100 %


#: datasets flushed every second or so: their buffers of one round share one journal file
JOURNALED = (Dataset.DELTAS, Dataset.GAPS)

FlushResult = list[tuple[SpoolEntry, int]] | Exception

#: a flush failing with one of these keeps its rows for a retry: the spool refused them,
#: or the machine did (disk, memory: `errors.TRANSIENT_ERRORS`), not the rows
RETRIED = (SpoolFull, *TRANSIENT_ERRORS)


def _why(exc: BaseException) -> str:
    """An exception for a log line (a bare MemoryError has no message)."""
    return str(exc) or type(exc).__name__


def _flush_many_blocking(
    spool: Spool, builder: FrameBuilder, bufs: list[_Buffer]
) -> tuple[list[FlushResult], dict[str, list[int]]]:
    """Flush several buffers in one thread hop: one result (or the error) per buffer, and
    the event -> spool delay histogram of the rows spooled (`DELAY_EDGES_S`).

    Never raises for one buffer's trouble: a spool refusal, disk error or MemoryError
    (`RETRIED`) is that buffer's result (kept, retried); any other failure sets the
    buffer's rows aside
    (`_set_aside_buffer`). One bad buffer once killed the writer task, and with it the
    collector, losing every other buffer's rows."""
    out: dict[int, FlushResult] = {}
    delays: dict[str, list[int]] = {}
    journaled: dict[Dataset, list[int]] = {}
    for i, buf in enumerate(bufs):
        if buf.key[0] in JOURNALED:
            journaled.setdefault(buf.key[0], []).append(i)
            continue
        try:
            out[i] = _flush_blocking(spool, builder, buf)
        except RETRIED as exc:
            out[i] = exc
        except Exception as exc:
            out[i] = _set_aside_buffer(spool, builder, buf, exc)
    for dataset, idxs in journaled.items():
        results, frame = _flush_journal(spool, builder, dataset, [bufs[i] for i in idxs])
        out.update(zip(idxs, results, strict=True))
        if dataset == Dataset.DELTAS and frame is not None:
            now = time.time()
            delays["event"] = delay_histogram(frame, now)
            delays["receive"] = delay_histogram(frame, now, "receive_time")
    return [out[i] for i in range(len(bufs))], delays


def _flush_journal(
    spool: Spool, builder: FrameBuilder, dataset: Dataset, bufs: list[_Buffer]
) -> tuple[list[FlushResult], pl.DataFrame | None]:
    """One round's buffers of a journaled dataset as ONE journal file: a result per
    buffer, and the rows written (None: none). A failure that is not the spool's is
    one buffer's (a frame that cannot be built or encoded): the buffers are then
    written one journal each, so only that one is set aside."""
    try:
        frame = journal_frame(bufs, builder)
        # a journal must hold only rows its split can place: one that cannot be
        # placed made every split of the oldest journals fail, forever
        frame = _placeable_rows(spool, builder, bufs, frame)
        entry = spool.write_journal(dataset, frame) if frame.height else None
    except RETRIED as exc:
        return [exc] * len(bufs), None
    except Exception as exc:
        if len(bufs) == 1:
            return [_set_aside_buffer(spool, builder, bufs[0], exc)], None
        log.error(
            "writer: cannot write a %s journal of %d buffers (%s: %s); writing each alone",
            dataset.value,
            len(bufs),
            type(exc).__name__,
            exc,
        )
        results: list[FlushResult] = []
        frames: list[pl.DataFrame] = []
        for buf in bufs:
            [result], written = _flush_journal(spool, builder, dataset, [buf])
            results.append(result)
            if written is not None:
                frames.append(written)
        return results, concat_frames(frames) if frames else None
    results = [[(entry, buf.rows)] if entry is not None else [] for buf in bufs]
    return results, frame if entry is not None else None


def _placeable_rows(
    spool: Spool, builder: FrameBuilder, bufs: list[_Buffer], frame: pl.DataFrame
) -> pl.DataFrame:
    """The rows of a round's frame the layout can place. The others are set aside by
    their buffers (`_Buffer.set_aside_unplaceable`), which then no longer hold them, so
    a round the spool refuses never sets them aside a second time when it is retried.
    One check for the whole round: a round with none (always, but for a bad venue time)
    costs no work per buffer."""
    ok, bad = layout.split_placeable(frame)
    if bad.height:
        where = set(_rows_per_partition(bad))
        for buf in bufs:
            if buf.key[1:] in where:
                buf.set_aside_unplaceable(spool, builder)
    return ok


def _set_aside_buffer(
    spool: Spool, builder: FrameBuilder, buf: _Buffer, exc: Exception
) -> FlushResult:
    """A buffer whose flush failed for a reason a retry will not fix (a bug, or rows no
    frame can hold): its rows go to the spool's quarantine (`Spool.set_aside`; as JSON
    lines if even the frame cannot be built), with an ERROR naming the buffer, and the
    writer goes on. A disk error while doing so is returned: the rows stay buffered."""
    dataset, exchange, market, symbol = buf.key
    reason = f"flush failed: {type(exc).__name__}: {exc}"
    log.error(
        "writer: cannot flush %d %s rows of %s/%s/%s (%s); setting them aside",
        buf.rows,
        dataset.value,
        exchange,
        market,
        symbol,
        reason,
    )
    partition = (exchange, market, symbol)
    try:
        try:
            spool.set_aside(dataset, partition, buf.frame(builder), reason)
        except TRANSIENT_ERRORS:
            raise
        except Exception:
            spool.set_aside_lines(dataset, partition, _buffer_lines(buf), reason)
    except TRANSIENT_ERRORS as err:
        return err
    except Exception as err:  # never the writer: say what is lost
        log.error(
            "writer: %d %s rows of %s/%s/%s LOST: they cannot even be set aside (%s)",
            buf.rows,
            dataset.value,
            exchange,
            market,
            symbol,
            err,
        )
    return []


def _buffer_lines(buf: _Buffer) -> list[bytes]:
    """A buffer's rows as JSON lines, whatever state they are in (frames, column lists,
    unparsed snapshot bodies): what `_set_aside_buffer` keeps when no frame can."""

    def line(obj: dict) -> bytes:
        return json.dumps(obj, default=str).encode() + b"\n"

    out = [line(row) for frame in buf.frames for row in frame.iter_rows(named=True)]
    names, columns = list(buf.columns), list(buf.columns.values())
    # lenient: the lists are aligned by `_Buffer.append`, but keep what there is if not
    out += [line(dict(zip(names, row, strict=False))) for row in zip(*columns, strict=False)]
    out += [
        line(
            {
                "receive_time": b.receive_time,
                "source": str(b.source),
                "body": b.body.decode(errors="replace"),
            }
        )
        for b in buf.bodies
    ]
    return out


def _rows_per_partition(frame: pl.DataFrame) -> Counter[tuple[str, str, str]]:
    """Rows per (exchange, market, symbol) of a frame (empty: no work)."""
    if not frame.height:
        return Counter()
    counts = frame.group_by(["exchange", "market", "symbol"]).len()
    return Counter({(e, m, s): n for e, m, s, n in counts.iter_rows()})


def journal_frame(bufs: list[_Buffer], builder: FrameBuilder) -> pl.DataFrame:
    """One round's rows of many symbols' buffers (one dataset) as one frame, each buffer's
    rows kept together (the journal split relies on it).

    Building a typed frame costs ~0.5-1 ms of fixed polars work whatever its size, so
    one frame per symbol buffer made a round at the full table (~130 buffers a second)
    cost ~10 % of a core. Buffers still in lists are built together, one frame per
    (exchange, market) with the symbol column filled in per run, and each run's own
    contract multiplier applied per row (`normalize.scaled_per_row`; grouping by
    multiplier too left one build per KuCoin and OKX symbol, ~25 ms a round). Compacted
    buffers keep their frames."""
    groups: dict[tuple[str, str], list[_Buffer]] = {}
    frames: list[pl.DataFrame] = []
    for buf in bufs:
        if buf.frames or not buf.columns:
            frames.append(buf.frame(builder))
        else:
            groups.setdefault((buf.key[1], buf.key[2]), []).append(buf)
    for group in groups.values():
        names = group[0].columns.keys()
        if len(group) == 1 or any(b.columns.keys() != names for b in group):
            frames.extend(b.frame(builder) for b in group)
            continue
        frame = _group_frame(group, builder)
        if frame is None:  # multipliers too wide for one exact product: one build each
            frames.extend(b.frame(builder) for b in group)
        else:
            frames.append(frame)
    return concat_frames(frames, rechunk=False)


def _group_frame(group: list[_Buffer], builder: FrameBuilder) -> pl.DataFrame | None:
    """The buffers of one (exchange, market), with the same columns, as one frame; None
    when their multipliers differ and cannot share one exact product
    (`normalize.scaled_per_row`)."""
    dataset, exchange, market, _ = group[0].key
    columns: dict[str, list] = {name: [] for name in group[0].columns}
    for b in group:
        for name, values in b.columns.items():
            columns[name].extend(values)
    runs = pl.Series("rows", [b.list_rows for b in group], dtype=pl.Int64)
    per_row = [pl.Series("symbol", [b.key[3] for b in group], dtype=pl.String)]
    multipliers = [b.multiplier for b in group]
    shared = len(set(multipliers)) == 1
    if not shared:
        per_row.append(pl.Series("multiplier", multipliers, dtype=pl.String))
    expanded = pl.select(s.repeat_by(runs).explode() for s in per_row)
    try:
        mult = multipliers[0] if shared else expanded.get_column("multiplier")
        frame = builder(dataset, exchange, market, "", columns, mult)
    except ValueError:
        return None
    return frame.with_columns(expanded.get_column("symbol"))


def delay_quantile(counts: list[int], q: float) -> float:
    """Upper bound (s) of the bucket holding the q-quantile; inf past the last edge."""
    target, seen = q * sum(counts), 0
    for edge, n in zip([*DELAY_EDGES_S, float("inf")], counts, strict=True):
        seen += n
        if seen >= target:
            return edge
    return float("inf")


def delay_histogram(frame: pl.DataFrame, spooled_at: float, column: str = "timestamp") -> list[int]:
    """Rows per delay bucket (`column` time -> on disk), last = above the last edge."""
    ms = frame.get_column(column).dt.epoch("ms").drop_nulls()
    delay = ((spooled_at * 1000.0 - ms) / 1000.0).sort()
    at_most = delay.search_sorted(pl.Series(DELAY_EDGES_S), side="right").to_list()
    return [b - a for a, b in zip([0, *at_most], [*at_most, len(delay)], strict=True)]


def _flush_blocking(
    spool: Spool, builder: FrameBuilder, buf: _Buffer
) -> list[tuple[SpoolEntry, int]]:
    dataset, exchange, market, symbol = buf.key
    frame = buf.set_aside_unplaceable(spool, builder)
    parts = [
        (k, part.height, data)
        for k, part, data in layout.files_for_frame(dataset, exchange, market, symbol, frame)
    ]
    spool.check_capacity(sum(len(d) for _, _, d in parts))
    # a partial failure is safe to redo: names are deterministic, so rewrites overwrite
    return [(spool.write(k, data, rows=n), n) for k, n, data in parts]


def stagger_fraction(key: BufferKey) -> float:
    """A fixed fraction in [0, 1) per (exchange, market, symbol): the phase of that
    symbol's snapshot flushes within the interval (deterministic, for tests and logs)."""
    _, exchange, market, symbol = key
    return zlib.crc32(f"{exchange}/{market}/{symbol}".encode()) % 1000 / 1000


def partition_of(key: str) -> str:
    """The partition directory of a spool key (dataset/exchange/market/symbol/.../hour)."""
    return key.rsplit("/", 1)[0]


def mergeable(entry: SpoolEntry) -> bool:
    """A plain Parquet spool file (raw capture and merged files are uploaded as they are;
    journals are split, see `journal_group`)."""
    return not entry.merged and entry.key.endswith(".parquet") and not is_journal(entry.key)


def _within_caps(entries: list[SpoolEntry]) -> list[list[SpoolEntry]]:
    """`entries` in order, cut into groups of at most MERGE_MAX_FILES files and (past the
    first file) MERGE_MAX_BYTES bytes: what one merge or split takes."""
    groups: list[list[SpoolEntry]] = [[]]
    size = 0
    for e in entries:
        last = groups[-1]
        if last and (len(last) >= MERGE_MAX_FILES or size + e.size > MERGE_MAX_BYTES):
            groups.append(last := [])
            size = 0
        last.append(e)
        size += e.size
    return groups


def journal_group(entries: Iterable[SpoolEntry], dataset: str) -> list[SpoolEntry]:
    """The oldest journals of `dataset` within the merge caps: what one split takes."""
    journals = [e for e in entries if is_journal(e.key) and dataset_of(e.key) == dataset]
    return _within_caps(journals)[0]


def merge_groups(entries: Iterable[SpoolEntry]) -> list[list[SpoolEntry]]:
    """Mergeable entries grouped by partition, each group within the merge caps, in the
    order of each partition's oldest file."""
    by_part: dict[str, list[SpoolEntry]] = {}
    for e in entries:
        if mergeable(e):
            by_part.setdefault(partition_of(e.key), []).append(e)
    return [g for part in by_part.values() for g in _within_caps(part)]


def _flush_raw_blocking(spool: Spool, buf) -> SpoolEntry:
    lines = buf.file_lines()  # its instrument record first
    data = rawfile.encode(lines)
    exchange, market, symbol = buf.key
    key = layout.raw_key(exchange, market, symbol, buf.first_ns, buf.last_ns, data)
    return spool.write(key, data, rows=len(lines))


class Writer:
    def __init__(
        self,
        store: ObjectStore,
        spool: Spool,
        buffer_cfg: BufferSection,
        *,
        limiter: trio.CapacityLimiter,
        frame_builder: FrameBuilder = default_frame_builder,
        upload_concurrency: int = 2,
        max_buffered_rows: int | None = None,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        stats: WriterStats | None = None,
        max_age: float | None = None,
        raw=None,
        upload_interval: float = 0.0,
        forced: trio.Event | None = None,
    ) -> None:
        self.store = store
        #: set on a forced stop (second Ctrl-C): the final drain ends at once
        self.forced = forced
        self.spool = spool
        self.cfg = buffer_cfg
        self.limiter = limiter
        #: merges and journal splits take their own thread, one at a time: behind the
        #: flush limiter a minute's split (~1.5 s) held a delta flush back for seconds,
        #: and two of them at once doubled the memory peak
        self.spool_limiter = trio.CapacityLimiter(1)
        self.frame_builder = frame_builder
        self.upload_concurrency = max(1, upload_concurrency)
        #: the memory cap (all buffers together); `max_buffered_rows` adds a row cap
        #: (tests), None = none. Rows were the only cap once: at the full symbol table a
        #: minute of snapshot rows (~1.5 M, ~120 MB as frames) passed 2 x max_rows and
        #: made every minute a forced flush that paused the input (KuCoin overflowed).
        self.max_buffered_bytes = buffer_cfg.max_total_bytes
        self.max_buffered_rows = max_buffered_rows
        self.backoff = _Backoff(retry_initial, retry_max)
        self.stats = stats or WriterStats()
        #: cap on the age of buffered delta/gap rows (storage.spool.max_age): loss bound
        self.max_age = max_age
        self.raw = raw  # cryptoflow.pipeline.raw.RawCapture or None
        if raw is not None:
            raw.on_open = self._raw_opened
        #: upload batching: a partition's spool files wait this long, then go up merged
        self.upload_interval = max(0.0, float(upload_interval or 0.0))
        self._spooled_at: dict[str, float] = {}  # key -> trio time (files of this run)
        self._draining = False  # final drain: upload everything regardless of age
        self._merging: set[str] = set()  # partitions being merged (their files are claimed)
        self._sleepers: dict[object, float] = {}  # idle uploader -> when it wakes anyway
        self._buffers: dict[BufferKey, _Buffer] = {}
        self._rotated: list[_Buffer] = []  # replaced buffers (multiplier change), flush ASAP
        self._staggered: set[BufferKey] = set()  # snapshot keys given their phase
        self._inflight: set[str] = set()
        self._new_work = trio.Event()
        self._flush_now = trio.Event()  # a buffer is over its size limit, or the cap is hit
        self._room = trio.Event()  # a flush freed memory
        self._spool_room = trio.Event()  # an upload freed room in the spool
        self._press = False  # memory cap reached: flush every buffer, due or not
        #: the deadline the flush loop sleeps until; -inf while it flushes (it looks again)
        self._sleeping_until = float("-inf")

    # --- buffering -----------------------------------------------------------------

    def _interval(self, dataset: Dataset) -> float:
        if dataset == Dataset.SNAPSHOTS:
            return self.cfg.snapshot_flush_interval
        if dataset == Dataset.DELTAS:
            interval = self.cfg.delta_flush_interval
        else:
            interval = self.cfg.gap_flush_interval
        return min(interval, self.max_age) if self.max_age else interval

    def _set_buffered(self, rows: int, nbytes: int) -> None:
        s = self.stats
        s.buffered_rows += rows
        s.max_buffered_rows_seen = max(s.max_buffered_rows_seen, s.buffered_rows)
        s.buffered_bytes += nbytes
        s.max_buffered_bytes_seen = max(s.max_buffered_bytes_seen, s.buffered_bytes)

    def _over_cap(self) -> bool:
        s = self.stats
        if s.buffered_bytes >= self.max_buffered_bytes:
            return True
        return self.max_buffered_rows is not None and s.buffered_rows >= self.max_buffered_rows

    def _append(self, batch: RowBatch | BodyBatch) -> None:
        if batch.rows <= 0:
            return
        key: BufferKey = (Dataset(batch.dataset), batch.exchange, batch.market, batch.symbol)
        buf = self._buffers.get(key)
        if buf is None and not self._safe_partition(batch):
            return
        if buf is not None and buf.multiplier != batch.multiplier:
            # a new contract multiplier: rows of one file share one; flush the old rows first
            self._rotated.append(self._buffers.pop(key))
            buf = None
        if buf is None:
            buf = _Buffer(key, batch.multiplier, self._opened_at(key))
            self._buffers[key] = buf
            self._wake_if_earlier(buf.opened_at + self._interval(key[0]))
        before = buf.nbytes
        if type(batch) is BodyBatch:
            buf.append_bodies(batch)  # received once read, at the flush (`_count_read`)
        else:
            buf.append(batch)
            if buf.list_rows >= COMPACT_ROWS:
                buf.compact(self.frame_builder)
            self._received(key, batch.rows)
        after = buf.nbytes
        grown = after - before
        buf.counted_bytes += grown
        self._set_buffered(batch.rows, grown)
        # over a size limit: flush now (being due by age is the flush loop's deadline)
        if (buf.rows >= self.cfg.max_rows or after >= self.cfg.max_bytes) and (
            trio.current_time() >= buf.retry_at
        ):
            self._wake_flusher()

    def _received(self, key: BufferKey, rows: int) -> None:
        dataset = key[0].value
        self.stats.rows_received[dataset] += rows
        self.stats.rows_by_symbol[(dataset, key[1], key[3])] += rows

    def _count_read(self, buf: _Buffer) -> None:
        """Count the rows of the poll bodies a flush read (whatever its result) as
        received, exactly, and log and report the bodies left out. Counted at intake
        by their estimate, a body its parser rejects made `received` exceed `spooled`
        and `uploaded`: rows that never existed looked lost. Counters only grow, so the
        estimate is never counted in and taken out again (a falling counter reads as a
        reset to Prometheus, and CloudWatch would count the difference twice)."""
        if buf.read_rows or buf.read_estimate:
            self._received(buf.key, buf.read_rows)
            self._set_buffered(buf.read_rows - buf.read_estimate, 0)
            buf.read_rows = buf.read_estimate = 0
        if buf.rejected:
            self.stats.snapshot_bodies_rejected += len(buf.rejected)
            for why in buf.rejected:
                log.warning("snapshot failed: %s (left out at the flush)", why)
                if buf.on_rejected is not None:
                    buf.on_rejected(why)
            buf.rejected = []

    def _count_unread(self, buf: _Buffer) -> None:
        """Bodies that leave the writer unread (set aside as they are, or still buffered
        at the shutdown deadline and reported LOST): received at their estimate, the
        best there is, so the final counters show them as not spooled."""
        self._count_read(buf)
        if buf.body_rows:
            self._received(buf.key, buf.body_rows)
            buf.body_rows = 0

    def _safe_partition(self, batch: RowBatch | BodyBatch) -> bool:
        """Whether the batch's partition can name a storage path (`layout.check_partition`);
        else its rows are refused here, logged and counted. Buffered, they would fail
        every flush, or every split of the journal they share with all other symbols."""
        try:
            layout.check_partition(batch.exchange, batch.market, batch.symbol)
        except UnsafePartition as exc:
            self.stats.rows_refused_unsafe += batch.rows
            dataset = Dataset(batch.dataset).value
            log.error("writer: %d %s rows refused: %s", batch.rows, dataset, exc)
            return False
        return True

    def _opened_at(self, key: BufferKey) -> float:
        """A new buffer's start. A snapshot key's first buffer starts as if it had opened
        `stagger_fraction(key)` of the interval ago, so the symbols' snapshot flushes
        spread over the interval instead of all coming due together: buffered snapshot
        memory then stays near half a minute's rows instead of a sawtooth from zero to a
        whole minute's (~120 MB at the full table), and no round flushes every symbol."""
        now = trio.current_time()
        if key[0] != Dataset.SNAPSHOTS or key in self._staggered:
            return now
        self._staggered.add(key)
        return now - self._interval(Dataset.SNAPSHOTS) * stagger_fraction(key)

    def _due(self, buf: _Buffer, now: float, force: bool) -> bool:
        if now < buf.retry_at:
            return False
        if force or buf.rows >= self.cfg.max_rows:
            return True
        if buf.nbytes >= self.cfg.max_bytes:
            return True
        return now >= buf.opened_at + self._interval(buf.key[0])

    def _next_deadline(self) -> float:
        deadlines = [
            max(b.retry_at, b.opened_at + self._interval(b.key[0])) for b in self._buffers.values()
        ]
        deadlines += [b.retry_at for b in self._rotated]
        if self.raw is not None:
            deadlines.append(self.raw.next_deadline(self._interval(Dataset.DELTAS)))
        return min(deadlines, default=float("inf"))

    def _flush_failed(self, buf: Any, exc: Exception) -> float:
        """Count a refused flush (row or raw buffer) and schedule its retry; the delay."""
        buf.failures += 1
        delay = self.backoff.delay(buf.failures)
        buf.retry_at = trio.current_time() + delay
        self.stats.flush_failures += 1
        buf.refused_full = isinstance(exc, SpoolFull)
        if buf.refused_full:
            self.stats.spool_full_events += 1
            buf.refused_bytes = getattr(exc, "nbytes", 0)
        return delay

    def _fits(self, buf: _Buffer) -> bool:
        """Whether a buffer the spool refused as full would fit now."""
        return self.spool.bytes + buf.refused_bytes <= self.spool.max_bytes

    def _retry_what_fits(self) -> None:
        """Buffers the spool refused as full that fit now are due at once (not those
        refused for a disk error: they keep their back-off). The back-off was only a
        guess at when room comes: waited out, it kept rows in memory up to `retry_max`
        (60 s) after the spool had room, past `max_age`, with /healthz saying
        `spool_full`, and at a stop past the drain deadline: LOST."""
        fit = [b for b in self._rotated if b.refused_full and b.retry_at > float("-inf")]
        fit = [b for b in fit if self._fits(b)]
        for buf in fit:
            buf.retry_at = float("-inf")
        if fit:
            self._wake_flusher()

    def _spool_freed(self) -> None:
        """An upload freed room in the spool (the final drain waits on `_spool_room`)."""
        self._retry_what_fits()
        self._spool_room.set()
        self._spool_room = trio.Event()

    def _flushed(self, buf: _Buffer, result: FlushResult, counted: set[str]) -> bool:
        """Account for one buffer's flush; a failed buffer is kept for a retry."""
        if buf.aside:  # set aside at this flush, whatever its result: no longer held
            self._set_buffered(-buf.aside, 0)
            buf.aside = 0
        self._count_read(buf)
        if isinstance(result, Exception):
            delay = self._flush_failed(buf, result)
            log.error(
                "writer: cannot spool %d %s rows of %s/%s (%s); kept in memory, retry in %.1fs",
                buf.rows,
                buf.key[0].value,
                buf.key[1],
                buf.key[3],
                _why(result),
                delay,
            )
            self._rotated.append(buf)
            return False
        self._count_unread(buf)  # bodies set aside unread (not even a frame)
        self._set_buffered(-buf.rows, -buf.counted_bytes)
        s = self.stats
        s.flushes += 1
        now = trio.current_time()
        for entry, rows in result:
            if entry.key not in counted:
                counted.add(entry.key)
                self._spooled_at[entry.key] = now
                s.files_spooled += 1
                s.bytes_spooled += entry.size
            s.rows_spooled[buf.key[0].value] += rows
        return True

    async def _flush_raw(self, now: float, force: bool) -> None:
        due = self.raw.take_due(now, self._interval(Dataset.DELTAS), force=force)
        for i, buf in enumerate(due):
            try:
                entry = await trio.to_thread.run_sync(
                    _flush_raw_blocking, self.spool, buf, limiter=self.limiter
                )
            except RETRIED as exc:
                delay = self._flush_failed(buf, exc)
                log.error(
                    "writer: cannot spool %d raw lines of %s/%s (%s); kept, retry in %.1fs",
                    len(buf.lines),
                    buf.key[0],
                    buf.key[2],
                    _why(exc),
                    delay,
                )
                self.raw.put_back(buf)
                self.stats.raw_dropped_lines = self.raw.stats.dropped_lines
                continue
            except BaseException:
                # cancelled mid-round (the stop): the buffers taken but not written yet
                # go back for the final drain, as the row flush's do; dropped here they
                # were lost without a word (one thread hop each: most of a round's)
                for rest in due[i:]:
                    self.raw.put_back(rest)
                raise
            self._spooled_at[entry.key] = trio.current_time()
            self.stats.raw_files += 1
            self.stats.files_spooled += 1
            self.stats.bytes_spooled += entry.size
            self._update_spool_gauges()
            self._wake_uploaders()  # raw files are not batched

    def _take_due(self, now: float, force: bool) -> list[_Buffer]:
        """Remove due buffers so new rows start new buffers while these are written."""
        # the final drain retries rows refused as full once they fit, whatever the back-off
        due = [
            b
            for b in self._rotated
            if now >= b.retry_at or (force and b.refused_full and self._fits(b))
        ]
        self._rotated = [b for b in self._rotated if b not in due]
        # one journal a round: once one delta/gap buffer is due, the others go with it
        # (early: they are younger than their interval, so the loss bound still holds)
        is_due = {key: self._due(buf, now, force) for key, buf in self._buffers.items()}
        journal_round = force or any(d and key[0] in JOURNALED for key, d in is_due.items())
        for key, d in is_due.items():
            buf = self._buffers[key]
            if d or (journal_round and key[0] in JOURNALED and now >= buf.retry_at):
                due.append(self._buffers.pop(key))
        return due

    async def _flush_due(self, *, force: bool = False) -> None:
        """Write every due buffer to the spool in one thread hop (encode + fsync each)."""
        now = trio.current_time()
        if self.raw is not None and self.raw.pending:
            await self._flush_raw(now, force)
        due = self._take_due(now, force)
        if not due:
            return
        try:
            results, delays = await trio.to_thread.run_sync(
                _flush_many_blocking, self.spool, self.frame_builder, due, limiter=self.limiter
            )
        except BaseException:
            self._rotated.extend(due)  # cancelled mid-flush: keep the rows for the drain
            raise
        counted: set[str] = set()  # a journal holds many buffers: count its file once
        for buf, result in zip(due, results, strict=True):
            self._flushed(buf, result, counted)
        self._retry_what_fits()  # uploads may have freed room while this round ran
        # rows held because the spool refused them as full (not for a disk error)
        self.stats.spool_refusing = any(b.refused_full for b in self._rotated)
        for since, counts in delays.items():
            s = self.stats
            hist = s.spool_delay if since == "event" else s.spool_delay_from_receive
            for i, n in enumerate(counts):
                hist[i] += n
        self._update_spool_gauges()
        self._wake_for_new_files()
        self._room.set()
        self._room = trio.Event()

    def _wake_flusher(self) -> None:
        self._flush_now.set()

    def _wake_if_earlier(self, deadline: float) -> None:
        """A new buffer due at `deadline`: wake the flush loop only if it sleeps past
        that. With an earlier deadline pending (the usual case: each round empties the
        buffers and ~250 new ones open before the next) the loop looks again after that
        flush anyway; waking it for each new buffer cost a wake-up and a scan of every
        buffer's deadline per new buffer, a few hundred a second at the full table."""
        if deadline < self._sleeping_until:
            self._wake_flusher()

    def _raw_opened(self) -> None:
        """A raw buffer opened (`RawCapture.on_open`). Nothing else tells the flush loop
        of its deadline, so with no row buffer open raw lines waited for the next row
        batch, past `max_age`."""
        self._wake_if_earlier(trio.current_time() + self._interval(Dataset.DELTAS))

    async def _flush_loop(self) -> None:
        """Flush buffers as they come due; never on the task that receives rows."""
        while True:
            self._sleeping_until = self._next_deadline()
            with trio.move_on_at(self._sleeping_until):
                await self._flush_now.wait()
            self._sleeping_until = float("-inf")
            self._flush_now = trio.Event()
            press, self._press = self._press, False
            await self._flush_due(force=press)

    async def _collect(self, receive_rows: trio.MemoryReceiveChannel[RowBatch]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flush_loop)
            # one ERROR per episode: a refused flush shrinks the buffers' estimate (list
            # rows become frames), so the writer reads a batch and is at the cap again
            # many times a second while the spool still refuses (an audit saw 48 in 1.5 s)
            told = False
            while True:
                while self._over_cap():
                    # memory cap: flush everything now; if the spool refuses, stop reading
                    self._press = True
                    self._wake_flusher()
                    if not told and self._rotated:
                        told = True
                        log.error(
                            "writer: %d rows (~%d MiB) buffered, at the memory cap, and the "
                            "spool refuses them: input paused (back-pressure) until it drains",
                            self.stats.buffered_rows,
                            self.stats.buffered_bytes // 2**20,
                        )
                    self.stats.backpressure = True
                    await self._room.wait()
                self.stats.backpressure = False
                told = told and bool(self._rotated)  # the episode ends once they spooled
                try:
                    batch = await receive_rows.receive()
                    self._append(batch)
                    # and what is already queued, without a scheduler round trip per
                    # batch (~1,300 RowBatches a second at the full table)
                    for _ in range(DRAIN_BATCHES):
                        if self._over_cap():
                            break
                        self._append(receive_rows.receive_nowait())
                except trio.WouldBlock:
                    pass
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    nursery.cancel_scope.cancel()
                    return

    # --- uploading -----------------------------------------------------------------

    def _update_spool_gauges(self) -> None:
        self.stats.spool_files = self.spool.files
        self.stats.spool_bytes = self.spool.bytes
        self.stats.spool_warnings = self.spool.warnings
        self.stats.rows_set_aside.update(self.spool.set_aside_counts() - self.stats.rows_set_aside)

    def _wake_uploaders(self) -> None:
        self._new_work.set()
        self._new_work = trio.Event()

    def _wake_for_new_files(self) -> None:
        """After a flush. Batching: new files are due only in `upload_interval`, so wake
        the idle uploaders only if none of them would wake up before that anyway (waking
        them on every flush would rescan the whole spool ~100 times a second)."""
        wake_by = min(self._sleepers.values(), default=float("-inf"))
        if (
            self.upload_interval <= 0
            or self._hurry()
            or trio.current_time() + self.upload_interval < wake_by
        ):
            self._wake_uploaders()

    def _hurry(self) -> bool:
        """Upload without waiting for `upload_interval`: draining, or the spool filling."""
        return self._draining or self.spool.bytes >= self.spool.max_bytes / 2

    def _claim(self) -> list[SpoolEntry] | None:
        """The next upload: one file, or (batching) the files of one due partition."""
        pending = [
            e
            for e in self.spool.pending()
            if e.key not in self._inflight and partition_of(e.key) not in self._merging
        ]
        if not pending:
            return None
        now, hurry = trio.current_time(), self._hurry()
        for entry in pending:  # oldest first
            if is_journal(entry.key):
                # journals are never uploaded: split, with batching once the oldest is due
                if (
                    self.upload_interval <= 0
                    or hurry
                    or now >= self._spooled_at.get(entry.key, -1.0) + self.upload_interval
                ):
                    group = journal_group(pending, dataset_of(entry.key))
                    self._inflight.update(e.key for e in group)
                    return group
                continue
            if self.upload_interval <= 0:
                self._inflight.add(entry.key)
                return [entry]
            if not mergeable(entry):
                self._inflight.add(entry.key)
                return [entry]
            # files of earlier runs have no time here: due at once
            if hurry or now >= self._spooled_at.get(entry.key, -1.0) + self.upload_interval:
                part = partition_of(entry.key)
                group = merge_groups(e for e in pending if partition_of(e.key) == part)[0]
                self._inflight.update(e.key for e in group)
                return group
        return None

    def _next_due(self) -> float:
        """When the oldest waiting partition becomes due (batching), else never."""
        if self.upload_interval <= 0:
            return float("inf")
        times = [
            self._spooled_at.get(e.key, -1.0) + self.upload_interval
            for e in self.spool.pending()
            if e.key not in self._inflight and partition_of(e.key) not in self._merging
        ]
        return min(times, default=float("inf"))

    async def _merge(self, group: list[SpoolEntry]) -> list[SpoolEntry]:
        """Merge a due partition's files into one spool file; on failure the files go up
        one by one (the merge is all-or-nothing on disk, see `Spool.merge`)."""
        part = partition_of(group[0].key)
        self._merging.add(part)  # the merged file must not be claimed by another worker
        try:
            merged = await trio.to_thread.run_sync(
                self.spool.merge, group, limiter=self.spool_limiter
            )
        except Exception as exc:
            self.stats.merge_failures += 1
            log.error(
                "writer: cannot merge %d spool files of %s (%s); uploading them one by one",
                len(group),
                partition_of(group[0].key),
                exc,
            )
            return group
        finally:
            self._merging.discard(part)
            self._wake_uploaders()
        self._inflight.add(merged.key)
        for e in group:
            self._spooled_at.pop(e.key, None)
            self._inflight.discard(e.key)
        self.stats.merges += 1
        self.stats.files_merged += len(group)
        return [merged]

    async def _split(self, group: list[SpoolEntry]) -> list[SpoolEntry] | None:
        """Split journals into per-partition files (None on failure: the journals stay in
        the spool and are tried again after a back-off; they are never uploaded as is)."""
        part = partition_of(group[0].key)
        self._merging.add(part)  # no other worker claims journals of this dataset meanwhile
        try:
            outputs = await trio.to_thread.run_sync(
                functools.partial(self.spool.split, group, hold=True), limiter=self.spool_limiter
            )
        except Exception as exc:
            self.stats.split_failures += 1
            log.error(
                "writer: cannot split %d journal files of %s (%s)", len(group), part, _why(exc)
            )
            return None
        finally:
            self._merging.discard(part)
            self._wake_uploaders()
        self._inflight.update(e.key for e in outputs)  # this worker uploads them
        self.spool.release(e.key for e in outputs)
        for e in group:
            self._spooled_at.pop(e.key, None)
            self._inflight.discard(e.key)
        self.stats.splits += 1
        self.stats.files_merged += len(group)
        return outputs

    async def _upload_one(self, entry: SpoolEntry) -> bool:
        started = trio.current_time()
        try:
            await self.store.put_file(entry.key, entry.path)
        except StorageError as exc:
            self.stats.upload_failures += 1
            level = logging.ERROR if isinstance(exc, StorageRejected) else logging.WARNING
            log.log(level, "upload of %s failed (kept in spool, will retry): %s", entry.key, exc)
            return False
        took = trio.current_time() - started
        await trio.to_thread.run_sync(self.spool.remove, entry)
        self._spooled_at.pop(entry.key, None)
        s = self.stats
        s.upload_seconds_sum += took
        s.upload_seconds_count += 1
        s.upload_seconds_max = max(s.upload_seconds_max, took)
        s.files_uploaded += 1
        s.bytes_uploaded += entry.size
        if entry.rows is not None:
            dataset = entry.key.split("/", 1)[0]
            if dataset == Dataset.RAW.value:
                s.raw_lines_uploaded += entry.rows  # raw capture lines, not table rows
            else:
                s.rows_uploaded[dataset] += entry.rows
        self._update_spool_gauges()
        self._spool_freed()
        return True

    async def _upload_worker(self) -> None:
        failures = 0
        while True:
            group = self._claim()
            if group is None:
                token = object()
                self._sleepers[token] = due = self._next_due()
                try:
                    with trio.move_on_at(due):
                        await self._new_work.wait()
                finally:
                    del self._sleepers[token]
                continue
            claimed = {e.key for e in group}
            try:
                if is_journal(group[0].key):
                    split = await self._split(group)
                    entries, ok = split or [], split is not None
                else:
                    entries = await self._merge(group) if len(group) > 1 else group
                    ok = True
                claimed.update(e.key for e in entries)
                for entry in entries:
                    ok = await self._upload_one(entry) and ok
            finally:
                self._inflight.difference_update(claimed)
            if ok:
                failures = 0
            else:
                failures += 1
                await trio.sleep(self.backoff.delay(failures))

    async def _run_uploaders(self, scope: trio.CancelScope, done: trio.Event) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(self.upload_concurrency):
                        nursery.start_soon(self._upload_worker)
        finally:
            done.set()

    async def _wait_spool_empty(self) -> None:
        while self.spool.pending() or self._inflight:
            await trio.sleep(0.05)

    async def _wait_for_retry(self) -> None:
        """The final drain's wait after a round left buffers (refused): until the next
        back-off ends or, for rows refused as full, an upload frees room (or a short poll:
        a merge can free room too). It once slept out the back-off alone, past the
        deadline while the spool had room, and those rows were LOST."""
        while trio.current_time() < self._next_deadline():
            refused = [b for b in self._rotated if b.refused_full]
            if any(self._fits(b) for b in refused):
                return
            wake = self._next_deadline()
            if refused:
                wake = min(wake, trio.current_time() + DRAIN_ROOM_POLL)
            with trio.move_on_at(wake):
                await self._spool_room.wait()

    async def _final_drain(self) -> None:
        async with trio.open_nursery() as nursery:
            scope, done = trio.CancelScope(), trio.Event()
            nursery.start_soon(self._run_uploaders, scope, done)
            while self._buffers or self._rotated or (self.raw is not None and self.raw.pending):
                await self._flush_due(force=True)
                if self._buffers or self._rotated or (self.raw is not None and self.raw.pending):
                    await self._wait_for_retry()
            # every buffer is in the spool: now upload everything regardless of age (a
            # partition's files merged into one object); not earlier, or the last flush
            # of a partition would become an object of its own
            self._draining = True
            self._wake_uploaders()
            await self._wait_spool_empty()
            scope.cancel()

    # --- the stage -----------------------------------------------------------------

    async def run(
        self,
        receive_rows: trio.MemoryReceiveChannel[RowBatch],
        *,
        shutdown_timeout: float = 30.0,
        task_status: trio.TaskStatus[Writer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self._update_spool_gauges()
        waiting = self.spool.pending()
        self.stats.startup_spool_files = len(waiting)
        if waiting:
            log.info(
                "writer: uploading %d spool files (%d bytes) left by an earlier run to %s",
                len(waiting),
                sum(e.size for e in waiting),
                self.store.describe(),
            )
        async with trio.open_nursery() as nursery:
            upl_scope, upl_done = trio.CancelScope(), trio.Event()
            nursery.start_soon(self._run_uploaders, upl_scope, upl_done)
            task_status.started(self)
            try:
                async with receive_rows:
                    await self._collect(receive_rows)
            finally:
                with trio.CancelScope(
                    deadline=trio.current_time() + shutdown_timeout, shield=True
                ) as cs:
                    async with trio.open_nursery() as drain:
                        if self.forced is not None:  # a second Ctrl-C ends the drain too
                            drain.start_soon(_cancel_on, self.forced, cs)
                        upl_scope.cancel()
                        await upl_done.wait()
                        await self._final_drain()
                        drain.cancel_scope.cancel()
                self._log_final(timed_out=cs.cancelled_caught)

    def _log_raw_lost(self) -> None:
        """Raw lines still buffered at the shutdown deadline are lost: said at ERROR and
        counted in `raw_dropped_lines`, as rows are, never gone without a word."""
        if self.raw is None or not self.raw.pending:
            return
        lines, symbols = self.raw.drop_pending()
        self.stats.raw_dropped_lines = self.raw.stats.dropped_lines
        log.error(
            "writer: %d raw lines of %d symbols could not be spooled before the shutdown "
            "deadline and are LOST",
            lines,
            symbols,
        )

    def _log_final(self, *, timed_out: bool) -> None:
        for buf in [*self._buffers.values(), *self._rotated]:
            self._count_unread(buf)  # not spooled by the deadline: LOST below
        self._update_spool_gauges()
        s = self.stats
        unspooled = s.buffered_rows
        if unspooled:
            log.error(
                "writer: %d rows could not be spooled before the shutdown deadline and are LOST",
                unspooled,
            )
        self._log_raw_lost()
        log.info(
            "writer stopped%s: rows received=%d spooled=%d uploaded=%d; uploaded %d files "
            "(%d bytes); %d files (%d bytes) left in spool %s for the next start%s",
            " at the shutdown deadline" if timed_out else "",
            sum(s.rows_received.values()),
            sum(s.rows_spooled.values()),
            sum(s.rows_uploaded.values()),
            s.files_uploaded,
            s.bytes_uploaded,
            s.spool_files,
            s.spool_bytes,
            self.spool.root,
            rejected_note(s.snapshot_bodies_rejected),
        )
        if s.rows_set_aside:
            log.error(
                "writer: %d rows were set aside in %s (never uploaded; see the SET ASIDE "
                "lines for why)",
                sum(s.rows_set_aside.values()),
                self.spool.quarantine_root / UNPLACED_DIR,
            )
        rows = sum(s.spool_delay)
        if rows:
            log.info(
                "writer: delta rows event -> spooled: p50 <= %gs, p99 <= %gs (%d rows); "
                "receive -> spooled: p50 <= %gs, p99 <= %gs",
                delay_quantile(s.spool_delay, 0.5),
                delay_quantile(s.spool_delay, 0.99),
                rows,
                delay_quantile(s.spool_delay_from_receive, 0.5),
                delay_quantile(s.spool_delay_from_receive, 0.99),
            )


def rejected_note(bodies: int) -> str:
    """The final lines' note of poll bodies left out at a flush: malformed, so they held
    no rows (not counted as received), not rows lost."""
    if not bodies:
        return ""
    return f"; {bodies} poll snapshot bodies left out (malformed, no rows)"


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def run_writer(
    receive_rows: trio.MemoryReceiveChannel[RowBatch],
    store: ObjectStore,
    spool: Spool,
    buffer_cfg: BufferSection,
    *,
    limiter: trio.CapacityLimiter,
    frame_builder: FrameBuilder = default_frame_builder,
    upload_concurrency: int = 2,
    max_buffered_rows: int | None = None,
    shutdown_timeout: float = 30.0,
    retry_initial: float = 1.0,
    retry_max: float = 60.0,
    stats: WriterStats | None = None,
    max_age: float | None = None,
    raw=None,
    upload_interval: float = 0.0,
    forced: trio.Event | None = None,
    task_status: trio.TaskStatus[Writer] = trio.TASK_STATUS_IGNORED,
) -> WriterStats:
    """Run the writer stage until `receive_rows` closes (then flush + upload, bounded by
    `shutdown_timeout`). `task_status.started` receives the Writer (for its `.stats`)."""
    writer = Writer(
        store,
        spool,
        buffer_cfg,
        limiter=limiter,
        frame_builder=frame_builder,
        upload_concurrency=upload_concurrency,
        max_buffered_rows=max_buffered_rows,
        retry_initial=retry_initial,
        retry_max=retry_max,
        stats=stats,
        max_age=max_age,
        raw=raw,
        upload_interval=upload_interval,
        forced=forced,
    )
    await writer.run(receive_rows, shutdown_timeout=shutdown_timeout, task_status=task_status)
    return writer.stats


@attrs.frozen
class DrainResult:
    uploaded: int
    failed: int
    bytes: int
    remaining: int


async def drain_spool(
    spool: Spool, store: ObjectStore, *, concurrency: int = 4, merge: bool = False
) -> DrainResult:
    """Upload every file now in the spool once (the store retries transient errors);
    delete each after verified success. Used by `cryptoflow spool flush`. `merge`
    (upload batching on): each partition's files are first merged into one file."""
    entries = (await prepare_drain(spool, merge=merge)).entries
    return await upload_drained(spool, store, entries, concurrency=concurrency)


@attrs.frozen
class Drained:
    """What `prepare_drain` did: the files to upload, and how they came to be (`spool
    flush` names only what was done)."""

    entries: list[SpoolEntry]
    split: int  # journals split into per-partition files
    quarantined: int  # journals that could not be split (moved to quarantine/)
    merged: int  # partitions whose files were merged into one


async def prepare_drain(spool: Spool, *, merge: bool = False) -> Drained:
    """The files a drain uploads: journals split into per-partition files first (and,
    `merge`, each partition's files merged into one), so their count is not the count
    of spool files before (`spool flush` says both)."""

    def journals() -> set[str]:
        return {e.key for e in spool.pending() if is_journal(e.key)}

    before = journals()
    for dataset in sorted({dataset_of(key) for key in before}):
        while group := journal_group(spool.pending(), dataset):
            try:
                await trio.to_thread.run_sync(spool.split, group)
            except Exception as exc:
                log.error("spool drain: cannot split journals of %s (%s)", dataset, exc)
                break
    gone = before - journals()
    # a journal no split could take is moved to quarantine/ under its own key
    quarantined = sum(1 for key in gone if (spool.quarantine_root / key).exists())
    split = len(gone) - quarantined
    merged = 0
    if merge:
        for group in merge_groups(spool.pending()):
            if len(group) > 1:
                try:
                    await trio.to_thread.run_sync(spool.merge, group)
                except Exception as exc:
                    log.error("spool drain: cannot merge %s (%s)", partition_of(group[0].key), exc)
                else:
                    merged += 1
    entries = [e for e in spool.pending() if not is_journal(e.key)]
    return Drained(entries, split, quarantined, merged)


async def upload_drained(
    spool: Spool, store: ObjectStore, entries: list[SpoolEntry], *, concurrency: int = 4
) -> DrainResult:
    """Upload `entries` (from `prepare_drain`) once each; delete each after its verified
    upload."""
    uploaded = failed = nbytes = 0
    limiter = trio.CapacityLimiter(max(1, concurrency))

    async def one(entry: SpoolEntry) -> None:
        nonlocal uploaded, failed, nbytes
        async with limiter:
            try:
                await store.put_file(entry.key, Path(entry.path))
            except StorageError as exc:
                failed += 1
                log.error("spool drain: %s not uploaded (kept): %s", entry.key, exc)
                return
            await trio.to_thread.run_sync(spool.remove, entry)
            uploaded += 1
            nbytes += entry.size

    async with trio.open_nursery() as nursery:
        for entry in entries:
            nursery.start_soon(one, entry)
    result = DrainResult(uploaded, failed, nbytes, spool.files)
    log.info(
        "spool drain to %s: %d uploaded (%d bytes), %d failed, %d left",
        store.describe(),
        uploaded,
        nbytes,
        failed,
        result.remaining,
    )
    return result
