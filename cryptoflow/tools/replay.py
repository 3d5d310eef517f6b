"""`cryptoflow replay`: a recording -> the same datasets the collector writes.

Feeds the records of a file in the shared recording format through the venue's pure
parser and the shard `Normalizer` (book sync + flatten), exactly the code the live
pipeline runs, and writes `snapshots`, `deltas` and `gaps` Parquet in the design's key
layout. Venues plug in through `VENUES` (parser + sync rules), nothing else branches on
the venue. Records are fed in chunks through `Normalizer.feed_many`; the summary is the
one line users (and the recorded README) compare:
`messages=N rows=N gaps=N resyncs=N snapshot_rows=N`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import polars as pl

from cryptoflow.book.sync import BREAK_KINDS, SyncRules
from cryptoflow.errors import MalformedMessage, UsageError
from cryptoflow.exchanges.base import Control
from cryptoflow.exchanges.binance import parse as binance_parse
from cryptoflow.exchanges.binance.rules import RULES as BINANCE_RULES
from cryptoflow.models import Dataset, DepthDiff, DepthSnapshot, GapKind, SnapshotSource
from cryptoflow.pipeline.normalize import (
    Normalizer,
    excess_digit_count,
    frame_from_columns,
)
from cryptoflow.tools.recording import Record, iter_records

log = logging.getLogger(__name__)

CHUNK_RECORDS = 2_000  # records per feed_many call
FLUSH_ROWS = 2_000_000  # rows buffered per (dataset, symbol) before a file is written


@attrs.frozen(slots=True)
class ReplayVenue:
    rules: SyncRules
    #: ws payload (parsed JSON or text), recv_ns -> list of diffs or a Control
    parse_ws: Callable[[Any, int], list[DepthDiff] | Control]
    #: a rest_snapshot record -> DepthSnapshot
    parse_rest: Callable[[Record], DepthSnapshot]


def _binance_rest(rec: Record) -> DepthSnapshot:
    symbol = parse_qs(urlsplit(rec.channel).query).get("symbol", [""])[0]
    if not symbol:
        raise MalformedMessage(f"no symbol in channel {rec.channel!r}", exchange="binance")
    return binance_parse.parse_rest_snapshot(rec.msg, symbol, rec.recv_ns, SnapshotSource.REPLAY)


VENUES: dict[str, ReplayVenue] = {
    "binance": ReplayVenue(BINANCE_RULES, binance_parse.parse_ws_message, _binance_rest),
}


@attrs.define(slots=True)
class ReplaySummary:
    messages: int = 0  # records in the file (ws + rest), bad ones included
    rows: int = 0  # delta rows
    gaps: int = 0  # gap records of break kinds (sequence break, reconnect, overload, checksum)
    resyncs: int = 0  # RESYNC gap records
    snapshot_rows: int = 0
    snapshots: int = 0
    diffs: int = 0
    controls: int = 0
    bad_records: int = 0
    dropped_duplicates: int = 0
    excess_digits: int = 0
    files: list[Path] = attrs.field(factory=list)

    def line(self) -> str:
        return (
            f"messages={self.messages} rows={self.rows} gaps={self.gaps} "
            f"resyncs={self.resyncs} snapshot_rows={self.snapshot_rows}"
        )


def replay_summary(
    exchange: str,
    input_path: Path,
    output: Path | None = None,
    *,
    chunk_records: int = CHUNK_RECORDS,
    flush_rows: int = FLUSH_ROWS,
) -> ReplaySummary:
    """Replay `input_path`; write Parquet under `output` (nothing written when None)."""
    venue = VENUES.get(exchange)
    if venue is None:
        raise UsageError(f"replay: unknown exchange {exchange!r} (known: {', '.join(VENUES)})")
    input_path = Path(input_path)
    if not input_path.is_file():
        raise UsageError(f"replay: input file {str(input_path)!r} does not exist")
    summary = ReplaySummary()
    normalizer = Normalizer({exchange: venue.rules})
    buffers: dict[tuple[Dataset, str, str, str], tuple[dict[str, list], str]] = {}

    def bad(line_no: int, reason: str) -> None:
        summary.messages += 1
        summary.bad_records += 1
        log.warning("%s:%d: skipped: %s", input_path, line_no, reason)

    def flush(key: tuple[Dataset, str, str, str]) -> None:
        cols, multiplier = buffers.pop(key)
        summary.excess_digits += excess_digit_count(cols)
        frame = frame_from_columns(*key, cols, multiplier)
        if output is not None:
            summary.files.extend(_write_local([(key, frame)], Path(output)))

    def process(items: list) -> None:
        out = normalizer.feed_many(items)
        items.clear()
        summary.rows += out.counters["delta_rows"]
        summary.snapshot_rows += out.counters["snapshot_rows"]
        summary.dropped_duplicates += out.counters["dropped"]
        for gap in out.gaps:
            if gap.kind is GapKind.RESYNC:
                summary.resyncs += 1
            elif gap.kind in BREAK_KINDS:
                summary.gaps += 1
        for batch in out.batches:
            key = (batch.dataset, batch.exchange, batch.market, batch.symbol)
            held = buffers.get(key)
            if held is None:
                buffers[key] = (batch.columns, batch.multiplier)
            else:
                for name, values in batch.columns.items():
                    held[0][name].extend(values)
            if len(buffers[key][0]["timestamp"]) >= flush_rows:
                flush(key)

    items: list = []
    for rec in iter_records(input_path, on_error=bad):
        summary.messages += 1
        try:
            if rec.kind == "ws":
                parsed = venue.parse_ws(rec.msg, rec.recv_ns)
                if isinstance(parsed, Control):
                    summary.controls += 1
                    continue
                summary.diffs += len(parsed)
                items.extend(parsed)
            else:
                items.append(venue.parse_rest(rec))
                summary.snapshots += 1
        except MalformedMessage as exc:
            summary.bad_records += 1
            log.warning("%s:%d: skipped: %s", input_path, rec.line_no, exc)
            continue
        if len(items) >= chunk_records:
            process(items)
    if items:
        process(items)
    for key in list(buffers):
        flush(key)
    if summary.excess_digits:
        log.warning("%d values have more than 15 significant digits", summary.excess_digits)
    return summary


def run(exchange: str, input_path: Path, output: Path) -> int:
    """CLI entry: replay, print the one summary line, return the exit code (0)."""
    summary = replay_summary(exchange, input_path, output)
    if summary.bad_records:
        log.warning("%d bad records skipped", summary.bad_records)
    print(summary.line())
    return 0


# TODO(lead): switch to cryptoflow.storage when it lands
def _write_local(
    frames: Iterable[tuple[tuple[Dataset, str, str, str], pl.DataFrame]], output: Path
) -> list[Path]:
    """Write each frame as zstd Parquet, one file per event-time hour, in the key layout
    `<output>/<dataset>/exchange=/market=/symbol=/year=/month=/day=/hour=/<file>.parquet`.
    The file name comes from the content range (`<SYM>-<first id>-<last id>-<first ts ms>-
    <last ts ms>`, as the writer names them), so writing
    the same rows again overwrites the same file instead of duplicating it."""
    written: list[Path] = []
    for (dataset, exchange, market, symbol), frame in frames:
        if frame.height == 0:
            continue
        hours = frame.with_columns(_hour=pl.col("timestamp").dt.truncate("1h"))
        for part in hours.partition_by("_hour", maintain_order=True):
            hour = part["_hour"][0]
            part = part.drop("_hour")
            ts = part["timestamp"].dt.epoch("ms")
            directory = (
                Path(output)
                / Dataset(dataset).value
                / f"exchange={exchange}"
                / f"market={market}"
                / f"symbol={symbol}"
                / f"year={hour.year:04d}"
                / f"month={hour.month:02d}"
                / f"day={hour.day:02d}"
                / f"hour={hour.hour:02d}"
            )
            directory.mkdir(parents=True, exist_ok=True)
            id_col = "last_good_id" if dataset == Dataset.GAPS else "last_update_id"
            ids = part[id_col].fill_null(0)
            name = f"{symbol}-{ids.min()}-{ids.max()}-{ts.min()}-{ts.max()}.parquet"
            path = directory / name
            tmp = path.with_suffix(".parquet.tmp")
            part.write_parquet(tmp, compression="zstd")
            os.replace(tmp, path)
            written.append(path)
    return written
