"""`cryptoflow compact`: merge the small per-flush files of closed hours into one per hour.

Safety while `collect` runs: only hours that ended more than `MARGIN` ago (or before
`before_hour`) are touched, and only the files listed at the start are merged and then
deleted; a late file that lands meanwhile is left for the next run.

Atomicity: the merged file is written under a hidden temp name (`.compacting-*.tmp`,
never listed by readers), its row count is checked against the sum of its sources, then
it is renamed to `compacted-<first_id>-<last_id>-<first_ts_ms>-<last_ts_ms>.parquet`
(a single atomic rename), and only then are the sources deleted.

Recovery rule (idempotent when interrupted): every compacted file carries, in its Parquet
key-value metadata (`cryptoflow.compacted_from`, so file and manifest appear atomically
together), the names of the files it was built from. A run first deletes, in each hour,
every file named in the manifest of a compacted file there (never the compacted file
itself), and any leftover temp files; those rows are already inside. Whatever remains
(new late files, plus the existing compacted file) is merged again into a new compacted
file whose manifest names them all.

Local trees only: an `s3://` PATH is refused with a UsageError (exit 2). On S3 there is
no atomic rename and no directory to fsync, and listing-based readers running meanwhile
could see both the merged object and its sources; compact the local tree (the output
folder of `collect`, or a downloaded copy) instead.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import polars as pl
from rich.console import Console

from cryptoflow.errors import DataError, UsageError
from cryptoflow.models import Dataset
from cryptoflow.tools.datasets import (
    HOUR,
    FileInfo,
    fmt_dt,
    list_files,
    parse_time,
    progress,
    report_console,
    resolve_root,
)
from cryptoflow.tools.remote import is_s3

PREFIX = "compacted-"
TEMP_PREFIX = ".compacting-"
MANIFEST_KEY = "cryptoflow.compacted_from"
#: Hours that ended less than this long ago may still receive rows from `collect`.
MARGIN = timedelta(hours=1)
#: Rows per row group: big enough for fast scans, small enough for selective reads.
ROW_GROUP_ROWS = 128 * 1024

_SORT = {
    Dataset.SNAPSHOTS.value: ["timestamp", "last_update_id", "side", "level"],
    Dataset.DELTAS.value: ["timestamp", "last_update_id"],
    Dataset.GAPS.value: ["timestamp"],
}


@attrs.define
class Result:
    hours: int = 0  # partition hours compacted
    merged: int = 0  # source files merged
    deleted_leftovers: int = 0  # files removed by recovery (already inside a compacted file)
    rows: int = 0


def manifest(path: Path) -> list[str]:
    """Names of the files a compacted file was built from ([] if it carries none)."""
    meta = pl.read_parquet_metadata(path)
    raw = meta.get(MANIFEST_KEY)
    return list(json.loads(raw)) if raw else []


def recover(folder: Path) -> int:
    """Finish an interrupted compaction in `folder`: delete what is already merged."""
    removed = 0
    for tmp in folder.glob(f"{TEMP_PREFIX}*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    for comp in sorted(folder.glob(f"{PREFIX}*.parquet")):
        if not comp.exists():
            continue
        for name in manifest(comp):
            src = folder / name
            if name != comp.name and src.exists():
                src.unlink()
                removed += 1
    return removed


def _ids(dataset: str) -> tuple[pl.Expr, pl.Expr]:
    if dataset == Dataset.DELTAS.value:
        return pl.col("first_update_id").min(), pl.col("last_update_id").max()
    if dataset == Dataset.SNAPSHOTS.value:
        return pl.col("last_update_id").min(), pl.col("last_update_id").max()
    ids = pl.concat_list(pl.col("last_good_id"), pl.col("first_id_after")).explode()
    return ids.min().fill_null(0), ids.max().fill_null(0)


def compact_hour(folder: Path, files: list[FileInfo]) -> tuple[int, int]:
    """Merge `files` (one partition hour) into one compacted file; (files merged, rows)."""
    dataset = files[0].dataset
    paths = [f.path for f in files]
    expected = sum(pl.scan_parquet(p, hive_partitioning=False).select(pl.len()).collect().item()
                   for p in paths)  # fmt: skip
    df = pl.scan_parquet(paths, hive_partitioning=False).collect()
    if df.height != expected:
        raise DataError(f"{folder}: read {df.height} rows, footers say {expected}")
    df = df.sort(_SORT[dataset], maintain_order=True)
    lo, hi = _ids(dataset)
    ts = pl.col("timestamp").dt.epoch("ms")
    first_id, last_id, t0, t1 = df.select(
        lo.alias("a"), hi.alias("b"), ts.min().alias("c"), ts.max().alias("d")
    ).row(0)
    final = folder / f"{PREFIX}{first_id}-{last_id}-{t0}-{t1}.parquet"
    tmp = folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}.tmp"
    names = sorted(p.name for p in paths)
    try:
        df.write_parquet(
            tmp,
            compression="zstd",
            statistics=True,
            row_group_size=ROW_GROUP_ROWS,
            metadata={MANIFEST_KEY: json.dumps(names)},
        )
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        written = pl.scan_parquet(tmp, hive_partitioning=False).select(pl.len()).collect().item()
        if written != expected:
            raise DataError(f"{tmp}: wrote {written} rows, expected {expected}; sources kept")
        os.replace(tmp, final)  # atomic: from here on the sources are redundant
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(folder)
    for p in paths:
        if p != final:
            p.unlink(missing_ok=True)
    return len(paths), expected


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def closed_before(before_hour: str | None, now: datetime | None = None) -> datetime:
    """The cut-off: an hour H is closed (may be compacted) when H + 1h <= cut-off.

    Default cut-off: now - MARGIN.
    `before_hour` (ISO/epoch ms) compacts only hours that end at or before it (and never
    later than the default cut-off).
    """
    default = (now or datetime.now(UTC)) - MARGIN
    if before_hour is None:
        return default
    ms = parse_time(before_hour)
    asked = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return min(asked, default)


def run(
    path: str,
    before_hour: str | None = None,
    *,
    now: datetime | None = None,
    console: Console | None = None,
) -> int:
    """Compact every closed partition hour under `path`; 0 on success.

    Hours with a single plain file and nothing to recover are left alone (already one
    file). Errors on one hour (an unreadable source) are reported and that hour is kept
    as it is; the exit code is then 1.
    """
    if is_s3(path):
        raise UsageError(
            f"{path}: compact works on local folders only (S3 has no atomic rename); "
            "compact the local tree that collect writes, or a downloaded copy"
        )
    root = resolve_root(path)
    console = console or report_console()
    cutoff = closed_before(before_hour, now)
    result = Result()
    failures: list[str] = []
    by_folder: dict[Path, list[FileInfo]] = {}
    for ds in (Dataset.SNAPSHOTS, Dataset.DELTAS, Dataset.GAPS):
        for f in list_files(root, ds):
            if f.hour + HOUR <= cutoff:
                by_folder.setdefault(f.path.parent, []).append(f)
    for folder in progress(sorted(by_folder), "compacting"):
        try:
            result.deleted_leftovers += recover(folder)
            left = [f for f in by_folder[folder] if f.path.exists()]
            plain = [f for f in left if not f.name.startswith(PREFIX)]
            if not plain and len(left) <= 1:
                continue
            if len(left) == 1:
                continue  # a single plain file is already one file per hour
            merged, rows = compact_hour(folder, left)
            result.hours += 1
            result.merged += merged
            result.rows += rows
        except Exception as exc:
            failures.append(f"{folder}: {type(exc).__name__}: {exc}")
    console.print(
        f"compacted {result.hours} hour(s): {result.merged} file(s), {result.rows} row(s)"
        f"; removed {result.deleted_leftovers} leftover(s) of interrupted runs"
        f"; hours ending after {fmt_dt(cutoff)} left alone"
    )
    for line in failures:
        console.print(f"[red]failed[/red] {line}")
    return 1 if failures else 0
