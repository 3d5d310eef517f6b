"""`cryptoflow inspect`: what landed, per dataset/exchange/symbol/hour, and where it is thin.

Report: one row per partition hour with files, rows, first/last event time and the
number of `gaps` records of that symbol and hour; then the holes: hours with no file
between a stream's first and last hour, and stretches longer than `hole_seconds` with no
row at all (timestamps bucketed to whole seconds, so a month of deltas stays small);
then unreadable files.

Exit codes: 0 report printed and every file readable; 1 when a file is unreadable (it is
listed, the rest is still reported). A missing path, or no data matching the filters,
raises DataError (exit 1 via the CLI) so "nothing there" never looks like a clean report.

PATH may be `s3://bucket/prefix`: the keys are listed with the filters in the listing
prefix and only the selected files are downloaded (see `cryptoflow.tools.remote`).
"""

from __future__ import annotations

import polars as pl
from rich.console import Console
from rich.table import Table

from cryptoflow.errors import DataError
from cryptoflow.exchanges import registry
from cryptoflow.models import Dataset
from cryptoflow.tools.datasets import (
    FILE_COL,
    HOUR,
    BadFile,
    FileInfo,
    collect_per_file,
    fmt_dt,
    fmt_ms,
    list_files,
    open_root,
    parse_time,
    report_console,
)

#: A stretch without any row longer than this is reported as a hole.
HOLE_SECONDS = 60.0
MAX_HOLES_LISTED = 100


def file_stats(files: list[FileInfo], start_ms: int | None, end_ms: int | None):  # type: ignore[no-untyped-def]
    """Per file: rows and first/last event time (ms) inside [start, end]."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        ts = pl.col("timestamp").dt.epoch("ms")
        lf = lf.select(FILE_COL, ts=ts)
        if start_ms is not None:
            lf = lf.filter(pl.col("ts") >= start_ms)
        if end_ms is not None:
            lf = lf.filter(pl.col("ts") <= end_ms)
        return lf.group_by(FILE_COL).agg(
            rows=pl.len(), first=pl.col("ts").min(), last=pl.col("ts").max()
        )

    return collect_per_file(files, build, label="scanning")


def seconds_holes(files: list[FileInfo], hole_s: float, start_ms, end_ms) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(from_ms, to_ms) stretches without rows longer than `hole_s` in one stream."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        sec = pl.col("timestamp").dt.epoch("ms") // 1000
        lf = lf.select(ms=pl.col("timestamp").dt.epoch("ms"), sec=sec)
        if start_ms is not None:
            lf = lf.filter(pl.col("ms") >= start_ms)
        if end_ms is not None:
            lf = lf.filter(pl.col("ms") <= end_ms)
        return lf.select("sec").unique()

    df, _ = collect_per_file(files, build, label="holes")
    if df.is_empty():
        return []
    secs = df["sec"].unique().sort()
    gaps = pl.DataFrame({"a": secs.shift(1), "b": secs}).filter(
        (pl.col("b") - pl.col("a")) > hole_s
    )
    return [(a * 1000, b * 1000) for a, b in gaps.iter_rows()]


def run(
    path: str,
    exchange: str | None = None,
    symbol: str | None = None,
    start: str | None = None,
    end: str | None = None,
    *,
    market: str | None = None,
    hole_seconds: float = HOLE_SECONDS,
    console: Console | None = None,
) -> int:
    """Print the coverage report for `path` (see the module doc for exit codes)."""
    registry.check_exchange(exchange)
    start_ms = parse_time(start) if start is not None else None
    end_ms = parse_time(end) if end is not None else None
    with open_root(path) as root:
        return _report(
            root, path, dict(exchange=exchange, market=market, symbol=symbol),
            start, end, start_ms, end_ms, hole_seconds, console or report_console(),
        )  # fmt: skip


def _report(root, path, filters, start, end, start_ms, end_ms, hole_seconds, console) -> int:  # type: ignore[no-untyped-def]
    files = [
        f
        for ds in (Dataset.SNAPSHOTS, Dataset.DELTAS, Dataset.GAPS)
        for f in list_files(root, ds, start_ms=start_ms, end_ms=end_ms, **filters)
    ]
    if not files:
        parts = [f"{k}={v}" for k, v in {**filters, "from": start, "to": end}.items() if v]
        raise DataError(f"{path}: no data found" + (f" ({', '.join(parts)})" if parts else ""))

    stats, bad = file_stats(files, start_ms, end_ms)
    by_path = {str(r[FILE_COL]): r for r in stats.iter_rows(named=True)} if stats.height else {}
    bad_paths = {b.path for b in bad}

    # gap records per (exchange, market, symbol, hour)
    gap_count: dict[tuple, int] = {}
    for f in files:
        if f.dataset == Dataset.GAPS.value and f.path not in bad_paths:
            r = by_path.get(str(f.path))
            key = (f.exchange, f.market, f.symbol, f.hour)
            gap_count[key] = gap_count.get(key, 0) + (r["rows"] if r else 0)

    table = Table(title=f"Coverage of {path}")
    for col in ("dataset", "exchange", "market", "symbol", "hour (UTC)", "files", "rows"):
        table.add_column(col, justify="right" if col in ("files", "rows") else "left")
    for col in ("first event", "last event", "gaps"):
        table.add_column(col, justify="right" if col == "gaps" else "left")
    hours: dict[tuple, dict] = {}
    for f in files:
        h = hours.setdefault((*f.stream, f.hour), dict(files=0, rows=0, first=None, last=None))
        h["files"] += 1
        r = by_path.get(str(f.path))
        if r is None or not r["rows"]:
            continue
        h["rows"] += r["rows"]
        h["first"] = r["first"] if h["first"] is None else min(h["first"], r["first"])
        h["last"] = r["last"] if h["last"] is None else max(h["last"], r["last"])
    for (ds, ex, mkt, sym, hour), h in sorted(hours.items()):
        g = gap_count.get((ex, mkt, sym, hour), 0)
        table.add_row(
            ds, ex, mkt, sym, hour.strftime("%Y-%m-%d %H"), str(h["files"]), str(h["rows"]),
            fmt_ms(h["first"]), fmt_ms(h["last"]),
            f"[red]{g}[/red]" if g and ds != Dataset.GAPS.value else str(g),
        )  # fmt: skip
    console.print(table)

    holes = _holes(files, bad_paths, hours, hole_seconds, start_ms, end_ms)
    if holes:
        ht = Table(title=f"Holes (no rows for > {hole_seconds:g} s, or missing hours)")
        for col in ("dataset", "exchange", "market", "symbol", "from", "to", "length"):
            ht.add_column(col)
        for row in holes[:MAX_HOLES_LISTED]:
            ht.add_row(*row)
        if len(holes) > MAX_HOLES_LISTED:
            ht.caption = f"{len(holes) - MAX_HOLES_LISTED} more not listed"
        console.print(ht)
    else:
        console.print("no holes")
    if bad:
        _print_bad(console, bad)
        return 1
    return 0


def _holes(files, bad_paths, hours, hole_s, start_ms, end_ms) -> list[tuple[str, ...]]:  # type: ignore[no-untyped-def]
    """Missing hours and long silent stretches, per snapshots/deltas stream."""
    out: list[tuple[str, ...]] = []
    streams: dict[tuple, list[FileInfo]] = {}
    for f in files:
        if f.dataset != Dataset.GAPS.value and f.path not in bad_paths:
            streams.setdefault(f.stream, []).append(f)
    for stream, fs in sorted(streams.items()):
        present = sorted({h for (*s, h) in hours if tuple(s) == stream})
        h = present[0]
        while h < present[-1]:
            if h not in present:
                nxt = h
                while nxt not in present:
                    nxt += HOUR
                out.append((*stream, fmt_dt(h), fmt_dt(nxt), f"{(nxt - h) // HOUR} h (no files)"))
                h = nxt
            h += HOUR
        for a, b in seconds_holes(fs, hole_s, start_ms, end_ms):
            out.append((*stream, fmt_ms(a), fmt_ms(b), f"{(b - a) / 1000:g} s"))
    return out


def _print_bad(console: Console, bad: list[BadFile]) -> None:
    table = Table(title=f"{len(bad)} unreadable file(s)")
    table.add_column("file", overflow="fold")
    table.add_column("reason", overflow="fold")
    for b in bad:
        table.add_row(b.shown, b.reason)
    console.print(table)
