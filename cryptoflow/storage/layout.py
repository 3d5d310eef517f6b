"""Object keys: the hive-partitioned layout every file lands in, and its inverse.

    <prefix>/<dataset>/exchange=<ex>/market=<mkt>/symbol=<SYM>/
        year=YYYY/month=MM/day=DD/hour=HH/<file>.parquet

- The hour is the data's *event* time (the `timestamp` column, UTC), never the flush time.
  A frame that spans an hour boundary becomes one file per hour (`split_by_hour`).
  Only times from 0001-01-01 to 9999-12-31 (UTC) have a partition (`MIN_MS`..`MAX_MS`):
  the hour functions raise `UnplaceableTime` for any other Int64 ms time, and the writer
  and the journal split check `placeable` first and set such rows aside
  (`Spool.set_aside`), so one absurd time never blocks the rows of any other.
- File names are deterministic from content, so a retried upload of the same rows
  overwrites the same key instead of adding a duplicate, and two *different* files can
  never share a name (the short content hash tells apart two flushes that happen to
  cover the same id and time range):
    snapshots / deltas: `<SYMBOL>-<min last_update_id>-<max last_update_id>-
                         <first_ts_ms>-<last_ts_ms>-<hash8>.parquet` (one line)
    gaps:               `<SYMBOL>-<first_ts_ms>-<last_ts_ms>-<hash8>.parquet`
    raw:                `<SYMBOL>-<first_recv_ms>-<last_recv_ms>-<hash8>.jsonl.zst`
  `hash8` = the first 8 hex digits of the SHA-256 of the file's bytes (the zstd Parquet
  encoding is deterministic for the same rows, so a re-encode gets the same name). Raw
  capture files are partitioned by local receive time (a raw payload has no parsed
  event time). Names without `-<hash8>` (written before the hash was added) still parse.
- Keys built here are *relative* (no prefix) unless a prefix is passed; the S3 store adds
  its configured prefix itself, the spool and the local store use relative keys.
- Every exchange, market and symbol put in a key must be a safe path component
  (`check_partition`: ASCII letters, digits, `.`, `_`, `-`; not `.` or `..`), else
  `UnsafePartition`. A symbol can come from the wire (a parser keeps a name missing from
  the symbol table as sent, so replays of other recordings parse): a Bybit `data.s` of
  "../../x" was joined into a spool path outside the spool (audit 8).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta

import attrs
import polars as pl

from cryptoflow.errors import UnplaceableTime, UnsafePartition
from cryptoflow.models import Dataset
from cryptoflow.storage import parquet

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
HOUR_MS = 3_600_000
#: the event times (epoch ms, UTC) the layout can place: `year=YYYY` has four digits,
#: which is also Python's datetime range (0001-01-01 .. 9999-12-31 23:59:59.999)
MIN_MS = -62_135_596_800_000
MAX_MS = 253_402_300_799_999

_KEY_RE = re.compile(
    r"^(?:(?P<prefix>.+)/)?(?P<dataset>[a-z_]+)/exchange=(?P<exchange>[^/]+)/"
    r"market=(?P<market>[^/]+)/symbol=(?P<symbol>[^/]+)/year=(?P<year>\d{4})/"
    r"month=(?P<month>\d{2})/day=(?P<day>\d{2})/hour=(?P<hour>\d{2})/"
    r"(?P<filename>[^/]+\.(?:parquet|jsonl\.zst))$"
)
_ID_NAME_RE = re.compile(
    r"^(?P<symbol>.+?)-(?P<first_id>-?\d+)-(?P<last_id>-?\d+)-(?P<first_ts>-?\d+)"
    r"-(?P<last_ts>-?\d+)(?:-(?P<hash>[0-9a-f]{8}))?\.parquet$"
)
_GAP_NAME_RE = re.compile(
    r"^(?P<symbol>.+)-(?P<first_ts>-?\d+)-(?P<last_ts>-?\d+)-(?P<hash>[0-9a-f]{8})"
    r"\.(?:parquet|jsonl\.zst)$"
)
RAW_SUFFIX = ".jsonl.zst"


@attrs.frozen
class KeyParts:
    """A parsed object key. Gaps and raw files have no ids; every new name has a hash."""

    prefix: str
    dataset: str
    exchange: str
    market: str
    symbol: str
    hour: datetime  # UTC, start of the hour
    filename: str
    first_id: int | None = None
    last_id: int | None = None
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    content_hash: str | None = None

    @property
    def relative_key(self) -> str:
        return self.key[len(self.prefix) + 1 :] if self.prefix else self.key

    @property
    def key(self) -> str:
        return join_key(
            self.prefix,
            partition_path(self.dataset, self.exchange, self.market, self.symbol, self.hour),
            self.filename,
        )


#: a partition value that is one plain path component (`check_partition`)
_SAFE_COMPONENT = re.compile(r"[A-Za-z0-9._-]+")


def _check_component(what: str, value: str) -> None:
    if type(value) is not str or _SAFE_COMPONENT.fullmatch(value) is None or value in (".", ".."):
        raise UnsafePartition(
            f"unsafe {what} {value!r:.80} for a storage path: it must be ASCII letters, "
            "digits, '.', '_' or '-' (not '.' or '..')"
        )


def check_partition(exchange: str, market: str, symbol: str) -> None:
    """Raise UnsafePartition unless each value is a safe path component (see the module
    doc): nothing built from them can then leave the spool or the output tree."""
    _check_component("exchange", exchange)
    _check_component("market", market)
    _check_component("symbol", symbol)


def check_relative_key(key: str) -> None:
    """Raise UnsafePartition unless `key` is a relative path of plain components (no
    empty, `.` or `..` one, no backslash or NUL): what the spool and the local store
    join under their root."""
    parts = key.split("/")
    if "\\" in key or "\x00" in key or any(p in ("", ".", "..") for p in parts):
        raise UnsafePartition(f"unsafe storage key {key!r:.200}: not a plain relative path")


def join_key(*parts: str) -> str:
    """Join key segments with '/', skipping empty ones and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def partition_path(dataset: str, exchange: str, market: str, symbol: str, hour: datetime) -> str:
    check_partition(exchange, market, symbol)
    h = hour.astimezone(UTC)
    return (
        f"{Dataset(dataset).value}/exchange={exchange}/market={market}/symbol={symbol}/"
        f"year={h.year:04d}/month={h.month:02d}/day={h.day:02d}/hour={h.hour:02d}"
    )


def _ts_ms(frame: pl.DataFrame) -> tuple[int, int]:
    ts = frame.get_column("timestamp").cast(pl.Int64, strict=False)
    lo, hi = ts.min(), ts.max()
    return (int(lo) if lo is not None else 0, int(hi) if hi is not None else 0)


def content_hash(data: bytes | pl.DataFrame) -> str:
    """8 hex digits of the SHA-256 of a file's bytes (a frame: of its Parquet encoding)."""
    if isinstance(data, pl.DataFrame):
        data = parquet.encode(data)
    return hashlib.sha256(data).hexdigest()[:8]


def file_name(
    dataset: Dataset | str, symbol: str, frame: pl.DataFrame, digest: str | None = None
) -> str:
    """The deterministic file name for the rows of one (already hour-split) frame.

    `digest` is `content_hash` of the encoded file; computed here when not given."""
    _check_component("symbol", symbol)
    ds = Dataset(dataset)
    first_ts, last_ts = _ts_ms(frame)
    digest = digest or content_hash(frame)
    if ds in (Dataset.SNAPSHOTS, Dataset.DELTAS):
        ids = frame.get_column("last_update_id")
        lo, hi = ids.min(), ids.max()
        return f"{symbol}-{int(lo or 0)}-{int(hi or 0)}-{first_ts}-{last_ts}-{digest}.parquet"
    return f"{symbol}-{first_ts}-{last_ts}-{digest}.parquet"


def hour_start(ms: int) -> datetime:
    """The start of the UTC hour holding `ms` (epoch ms); `UnplaceableTime` outside
    `MIN_MS`..`MAX_MS` (any Int64 is handled: no OverflowError, no platform limit)."""
    if not MIN_MS <= ms <= MAX_MS:
        raise UnplaceableTime(
            f"event time {ms} ms is outside the years 0001-9999 the layout can partition"
        )
    return _EPOCH + timedelta(hours=ms // HOUR_MS)


def placeable(frame: pl.DataFrame, column: str = "timestamp") -> pl.Series:
    """Per row: can the layout place it (a null time goes to 1970, see `split_by_hour`)."""
    ms = frame.get_column(column).cast(pl.Int64, strict=False)
    return ms.is_null() | ms.is_between(MIN_MS, MAX_MS)


def split_placeable(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows the layout can place, rows it cannot), each in the frame's order. Nearly
    always the frame itself and an empty frame, without copying."""
    ok = placeable(frame)
    if ok.all():
        return frame, frame.clear()
    return frame.filter(ok), frame.filter(~ok)


def raw_key(
    exchange: str, market: str, symbol: str, first_ns: int, last_ns: int, data: bytes
) -> str:
    """Relative key of one raw-capture file (receive-time hour partition)."""
    hour = hour_start(first_ns // 1_000_000)
    name = (
        f"{symbol}-{first_ns // 1_000_000}-{last_ns // 1_000_000}-{content_hash(data)}{RAW_SUFFIX}"
    )
    return join_key(partition_path(Dataset.RAW, exchange, market, symbol, hour), name)


def split_by_hour(frame: pl.DataFrame) -> list[tuple[datetime, pl.DataFrame]]:
    """Split rows by the UTC hour of their `timestamp`, oldest hour first, row order kept.

    Rows with a null timestamp (should not happen: the normalizer fills gap timestamps)
    go to the 1970-01-01 00h partition rather than being dropped. A time outside
    `MIN_MS`..`MAX_MS` raises `UnplaceableTime` (callers check `split_placeable` first).
    """
    if frame.height == 0:
        return []
    ms = frame.get_column("timestamp").cast(pl.Int64, strict=False).fill_null(0)
    first, last = int(ms.min()), int(ms.max())  # type: ignore[arg-type]
    hour_start(first), hour_start(last)  # refuse the whole frame before any work
    if first // HOUR_MS == last // HOUR_MS:
        # one hour (nearly every flush): no partition_by, which cost ~0.8 ms per call,
        # as much as encoding a one-second delta file (docs/benchmarks.md)
        return [(hour_start(first), frame)]
    hour_idx = (ms // HOUR_MS).alias("__hour")
    tagged = frame.with_columns(hour_idx)
    out: list[tuple[datetime, pl.DataFrame]] = []
    for (h,), part in sorted(
        tagged.partition_by("__hour", as_dict=True, maintain_order=True).items(),
        key=lambda kv: kv[0][0],
    ):
        out.append((hour_start(int(h) * HOUR_MS), part.drop("__hour")))
    return out


def object_key(
    dataset: Dataset | str,
    exchange: str,
    market: str,
    symbol: str,
    hour: datetime,
    frame: pl.DataFrame,
    prefix: str = "",
    digest: str | None = None,
) -> str:
    return join_key(
        prefix,
        partition_path(dataset, exchange, market, symbol, hour),
        file_name(dataset, symbol, frame, digest),
    )


def files_for_frame(
    dataset: Dataset | str,
    exchange: str,
    market: str,
    symbol: str,
    frame: pl.DataFrame,
    prefix: str = "",
) -> list[tuple[str, pl.DataFrame, bytes]]:
    """(key, rows, zstd Parquet bytes) per event-time hour of `frame`: what one flush
    writes. The key's hash is over exactly those bytes."""
    out = []
    for hour, part in split_by_hour(frame):
        data = parquet.encode(part)
        key = object_key(dataset, exchange, market, symbol, hour, part, prefix, content_hash(data))
        out.append((key, part, data))
    return out


def keys_for_frame(
    dataset: Dataset | str,
    exchange: str,
    market: str,
    symbol: str,
    frame: pl.DataFrame,
    prefix: str = "",
) -> list[tuple[str, pl.DataFrame]]:
    """(key, rows) per event-time hour of `frame`: what one flush writes."""
    return [
        (key, part)
        for key, part, _ in files_for_frame(dataset, exchange, market, symbol, frame, prefix)
    ]


def parse_key(key: str) -> KeyParts:
    """Inverse of `object_key`. Raises ValueError for a key outside the layout."""
    m = _KEY_RE.match(key.strip("/"))
    if m is None or m["dataset"] not in {d.value for d in Dataset}:
        raise ValueError(f"not a cryptoflow data key: {key!r}")
    hour = datetime(int(m["year"]), int(m["month"]), int(m["day"]), int(m["hour"]), tzinfo=UTC)
    fields: dict = {}
    name = m["filename"]
    if m["dataset"] in (Dataset.GAPS.value, Dataset.RAW.value):
        g = _GAP_NAME_RE.match(name)
        if g:
            fields = {
                "first_ts_ms": int(g["first_ts"]),
                "last_ts_ms": int(g["last_ts"]),
                "content_hash": g["hash"],
            }
    else:
        g = _ID_NAME_RE.match(name)
        if g:
            fields = {
                "first_id": int(g["first_id"]),
                "last_id": int(g["last_id"]),
                "first_ts_ms": int(g["first_ts"]),
                "last_ts_ms": int(g["last_ts"]),
                "content_hash": g["hash"],
            }
    return KeyParts(
        prefix=m["prefix"] or "",
        dataset=m["dataset"],
        exchange=m["exchange"],
        market=m["market"],
        symbol=m["symbol"],
        hour=hour,
        filename=name,
        **fields,
    )
