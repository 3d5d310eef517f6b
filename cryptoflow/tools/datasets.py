"""Shared helpers for the data tools: find stored files, read them lazily, survive bad ones.

The tools list files themselves (one directory walk, pruned by the hive keys
exchange/market/symbol/year/month/day/hour) instead of handing a glob to polars, because
they need to know *which* file is corrupt: one truncated upload must show up as one line
in a report, not abort a scan over a month of data. Reading is still lazy and columnar:
`collect_per_file` runs one `scan_parquet` over every file at once and only falls back to
file-by-file reads when that fails.

A root is a local folder or `s3://bucket/prefix` (`open_root`). For S3, `list_files`
lists object keys instead of walking folders (filters pushed into the listing prefix,
hours pruned on the parsed key) and `check_footers`/`collect_per_file` download the files
they are about to read into a temporary cache first; see `cryptoflow.tools.remote`.
Reports name a file by `FileInfo.shown` / `BadFile.shown` (the s3:// URI for S3 data).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import attrs
import polars as pl

from cryptoflow.errors import DataError, UsageError
from cryptoflow.models import Dataset
from cryptoflow.tools.remote import S3Root, is_s3

T = TypeVar("T")

#: Column holding the source file path in frames returned by `collect_per_file`.
FILE_COL = "__file"
#: More files than this and a terminal attached: show a progress bar.
PROGRESS_MIN_FILES = 20

HOUR = timedelta(hours=1)

_PART_RE = re.compile(
    r"exchange=(?P<exchange>[^/]+)/market=(?P<market>[^/]+)/symbol=(?P<symbol>[^/]+)/"
    r"year=(?P<year>\d{4})/month=(?P<month>\d{1,2})/day=(?P<day>\d{1,2})/hour=(?P<hour>\d{1,2})$"
)


#: snapshots/deltas file names: <SYM>-<first_id>-<last_id>-<first_ts>-<last_ts>[-<hash8>]
_ID_NAME_RE = re.compile(
    r"^.+?-(-?\d+)-(-?\d+)-(?P<t0>-?\d+)-(?P<t1>-?\d+)(?:-[0-9a-f]{8})?\.parquet$"
)


@attrs.frozen(slots=True)
class FileInfo:
    """One stored Parquet file and the partition keys its path names."""

    path: Path
    dataset: str
    exchange: str
    market: str
    symbol: str
    hour: datetime  # start of the partition hour, UTC
    #: s3://bucket/key when the file lives on S3 (`path` is then its local cache copy)
    uri: str | None = None
    #: the S3Root that downloads it (None: a local file)
    remote: Any = attrs.field(default=None, eq=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def shown(self) -> str:
        """How reports name the file: its s3:// URI, else its local path."""
        return self.uri or str(self.path)

    @property
    def first_ts(self) -> int | None:
        """Earliest event time (ms) the writer put in a snapshots/deltas file name."""
        if self.dataset == Dataset.GAPS.value:
            return None
        m = _ID_NAME_RE.match(self.name)
        if m is None or int(m["t0"]) > int(m["t1"]):
            return None
        return int(m["t0"])

    @property
    def stream(self) -> tuple[str, str, str, str]:
        """(dataset, exchange, market, symbol): the unit that must be continuous."""
        return (self.dataset, self.exchange, self.market, self.symbol)


@attrs.frozen(slots=True)
class BadFile:
    """A file that could not be read, with the reader's one-line reason."""

    path: Path
    reason: str
    uri: str | None = None

    @property
    def shown(self) -> str:
        return self.uri or str(self.path)


# --- time ---------------------------------------------------------------------------


def report_console() -> Any:
    """A rich Console for reports: as wide as the terminal, or 200 columns when the output
    is a pipe or file, where rich would otherwise squeeze tables into 80 and truncate."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 200
    return console


def parse_time(value: str | int) -> int:
    """ISO 8601 (UTC; `Z`, an offset, or naive = UTC) or epoch milliseconds -> epoch ms.

    Epoch ms is the unit stored in the data, so no float seconds ever enter a comparison.
    A time beyond the calendar (years 1..9999 in UTC) is a UsageError, not an
    OverflowError from whatever date arithmetic meets it first: a number out of range,
    or an ISO time whose offset moves it out (0001-01-01T00:30:00+01:00 is in year 0).
    """
    if isinstance(value, int):
        return _in_calendar(value, value)
    text = value.strip()
    if re.fullmatch(r"-?\d+", text):
        return _in_calendar(int(text), value)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"bad time {value!r}: expected ISO 8601 UTC such as 2026-01-02T03:04:05.678Z "
            "or epoch milliseconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return _in_calendar(_dt_ms(dt), value, iso=True)


def _in_calendar(ms: int, given: str | int, *, iso: bool = False) -> int:
    try:
        ms_to_dt(ms)
    except OverflowError:
        what = (
            "out of range in UTC (years 1 to 9999)"
            if iso
            else "epoch milliseconds out of range (years 1 to 9999; "
            "e.g. 1767225600000 is 2026-01-01T00:00:00Z)"
        )
        raise UsageError(f"bad time {given!r}: {what}") from None
    return ms


def _dt_ms(dt: datetime) -> int:
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def ms_to_dt(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def epoch_ms(col: str) -> pl.Expr:
    """A datetime column as integer ms since the epoch."""
    return pl.col(col).dt.epoch("ms")


def receive_us() -> pl.Expr:
    """`receive_time` as integer µs, named `rt`: the arrival order `verify` and `book`
    walk messages in."""
    return pl.col("receive_time").dt.epoch("us").alias("rt")


def fmt_ms(ms: int | None) -> str:
    """Milliseconds -> `2026-01-02T03:04:05.678Z` (the format `book --at` accepts)."""
    if ms is None:
        return "-"
    return ms_to_dt(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def fmt_dt(dt: datetime | None) -> str:
    return "-" if dt is None else fmt_ms(_dt_ms(dt))


def hour_of(ms: int) -> datetime:
    return ms_to_dt(ms).replace(minute=0, second=0, microsecond=0)


# --- locating files -------------------------------------------------------------------


Root = Path | S3Root


@contextlib.contextmanager
def open_root(path: str | Path) -> Iterator[Root]:
    """The dataset root: a local folder, or an `S3Root` for `s3://bucket/prefix` whose
    download cache is removed when the block ends."""
    if is_s3(path):
        with S3Root(str(path)) as root:
            yield root
    else:
        yield resolve_root(path)


def resolve_root(path: str | Path) -> Path:
    """The dataset root as a local folder (UsageError for s3://: use `open_root`)."""
    text = str(path)
    if is_s3(text):
        raise UsageError(f"{text}: this command works on local folders only")
    root = Path(text)
    if not root.exists():
        raise DataError(f"{root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return root


def list_files(
    root: Root,
    dataset: Dataset | str,
    *,
    exchange: str | None = None,
    market: str | None = None,
    symbol: str | None = None,
    start_ms: int | None = None,
    end_ms: int | None = None,
) -> list[FileInfo]:
    """Every stored `.parquet` file of `dataset` under `root` matching the filters.

    Partition pruning happens on the path: the glob names the exchange/market/symbol, and
    hours wholly outside [start_ms, end_ms] are skipped before any file is opened. Names
    starting with "." are writers' temp files and are never listed. On S3 the same
    filters shape the listing prefix and prune keys; nothing is downloaded here.
    """
    ds = str(dataset)
    if isinstance(root, S3Root):
        files = root.list_files(
            ds,
            exchange=exchange.lower() if exchange else None,
            market=market,
            symbol=symbol.upper() if symbol else None,
            lo=hour_of(start_ms) if start_ms is not None else None,
            hi=hour_of(end_ms) if end_ms is not None else None,
        )
        files.sort(key=lambda f: (f.stream, f.hour, f.name))
        return files
    pattern = (
        f"exchange={exchange.lower() if exchange else '*'}/market={market or '*'}/"
        f"symbol={symbol.upper() if symbol else '*'}/year=*/month=*/day=*/hour=*/*.parquet"
    )
    base = root / ds
    if not base.is_dir():
        return []
    lo = hour_of(start_ms) if start_ms is not None else None
    hi = hour_of(end_ms) if end_ms is not None else None
    out: list[FileInfo] = []
    for p in base.glob(pattern):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = _PART_RE.search(p.parent.relative_to(base).as_posix())
        if m is None:
            continue
        hour = datetime(int(m["year"]), int(m["month"]), int(m["day"]), int(m["hour"]), tzinfo=UTC)
        if (lo is not None and hour < lo) or (hi is not None and hour > hi):
            continue
        out.append(FileInfo(p, ds, m["exchange"], m["market"], m["symbol"], hour))
    out.sort(key=lambda f: (f.stream, f.hour, f.name))
    return out


# --- reading --------------------------------------------------------------------------


def materialize(files: Sequence[FileInfo], label: str = "reading") -> list[BadFile]:
    """Download the S3 files among `files` into their root's cache (no-op for local ones).

    Objects that vanished between listing and download come back as BadFiles; any other
    S3 failure raises DataError/UsageError.
    """
    bad: list[BadFile] = []
    roots: dict[int, tuple[S3Root, list[FileInfo]]] = {}
    for f in files:
        if f.remote is not None:
            roots.setdefault(id(f.remote), (f.remote, []))[1].append(f)
    for remote, fs in roots.values():
        missing = remote.materialize(fs, label)
        bad += [BadFile(f.path, missing[f.path], f.uri) for f in fs if f.path in missing]
    return bad


def check_footers(files: Sequence[FileInfo], label: str = "checking") -> list[BadFile]:
    """Files whose Parquet footer cannot be read (truncated uploads, garbage)."""
    bad = materialize(files, label)
    gone = {b.path for b in bad}
    for f in progress([f for f in files if f.path not in gone], label):
        try:
            pl.read_parquet_metadata(f.path)
        except Exception as exc:  # polars raises several classes for a broken file
            bad.append(BadFile(f.path, _one_line(exc), f.uri))
    return bad


def collect_per_file(
    files: Sequence[FileInfo],
    build: Callable[[pl.LazyFrame], pl.LazyFrame],
    *,
    label: str = "reading",
) -> tuple[pl.DataFrame, list[BadFile]]:
    """Run `build` on a lazy scan of `files` and collect, isolating unreadable files.

    `build` must work file by file (filters, projections, per-file group-bys keyed on
    `FILE_COL`, uniques that the caller repeats): on failure the same plan is run once per
    file and the results are concatenated, so the answer is the same minus the bad files.
    """
    good = list(files)
    bad = check_footers(good, label=f"{label} (footers)") if good else []
    bad_paths = {b.path for b in bad}
    good = [f for f in good if f.path not in bad_paths]
    if not good:
        return pl.DataFrame(), bad
    try:
        lf = pl.scan_parquet(
            [f.path for f in good], hive_partitioning=False, include_file_paths=FILE_COL
        )
        return build(lf).collect(), bad
    except Exception:
        pass
    parts: list[pl.DataFrame] = []
    for f in progress(good, label):
        try:
            lf = pl.scan_parquet(f.path, hive_partitioning=False, include_file_paths=FILE_COL)
            parts.append(build(lf).collect())
        except Exception as exc:
            bad.append(BadFile(f.path, _one_line(exc), f.uri))
    if not parts:
        return pl.DataFrame(), bad
    return pl.concat(parts, how="vertical_relaxed"), bad


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


# --- progress -------------------------------------------------------------------------


def progress(items: Iterable[T], label: str, *, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (count, rate) when stdout is a terminal.

    Quiet otherwise, and for short runs, so logs and test output stay clean.
    """
    seq = items if isinstance(items, Sequence) else list(items)
    n = total if total is not None else len(seq)
    if n < PROGRESS_MIN_FILES or not sys.stdout.isatty():
        yield from seq
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.text import Text

    class _Rate(ProgressColumn):
        def render(self, task) -> Text:  # type: ignore[no-untyped-def]
            return Text(f"{task.speed:,.0f}/s" if task.speed else "")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _Rate(),
        TimeElapsedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=n)
        for item in seq:
            yield item
            bar.advance(task)
