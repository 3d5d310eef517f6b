"""The configuration schema: attrs classes that `configs/*.yml` are structured into.

Defaults here are the production defaults; `configs/config.yml` spells them out so an
operator sees every knob. Durations are seconds (floats), sizes bytes or rows (ints).
Loading, file:line error reporting and cross-file checks live in `cryptoflow.config`.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from cryptoflow.exchanges.limits import BYBIT_LINEAR_MAX

EXCHANGES: tuple[str, ...] = ("binance", "bybit", "okx", "kucoin")


@attrs.frozen
class ServiceSection:
    """`cryptoflow:` — process-wide settings."""

    name: str = "cryptoflow"
    shutdown_timeout: float = 30.0  # seconds for drain + final flush + upload after a signal
    exchanges: list[str] = attrs.field(factory=lambda: list(EXCHANGES))  # enabled venues


@attrs.frozen
class ChannelsSection:
    """`channels:` — capacities of the bounded memory channels between stages."""

    raw_capacity: int = 2000  # reader -> normalizer (messages)
    rows_capacity: int = 1000  # normalizer -> writer (row batches)


@attrs.frozen
class ReaderSection:
    """`reader:` — REST polling and WebSocket behaviour."""

    snapshot_interval: float = 10.0  # seconds between REST snapshot polls per symbol
    jitter: float = 0.5  # +/- seconds of random offset per poll (schedule does not drift)
    request_timeout: float = 10.0
    ws_reconnect_after: float = 23 * 3600.0  # planned reconnect before the venues' 24 h cut
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    ws_stall_timeout: float = 30.0  # no WebSocket frame for this long -> reconnect


@attrs.frozen
class ProcessorSection:
    """`processor:` — normalization and book sync."""

    verify_book: bool = False  # keep books in memory, compare with REST snapshots (drift)


@attrs.frozen
class VenueSource:
    """`source.<exchange>:` — lanes and endpoints of one venue."""

    snapshots: bool = True  # periodic REST snapshot lane
    deltas: bool = True  # WebSocket diff lane
    depth_limit: int = 1000  # REST snapshot depth (Bybit: 500, see VENUE_DEFAULTS)
    snapshot_interval: float | None = None  # None = reader.snapshot_interval
    stream_speed: str = "100ms"  # Binance @depth@<speed>; Bybit/OKX/KuCoin use their own
    stream_depth: int = 200  # Bybit orderbook.<depth>
    rest_url: str = ""  # empty = the venue's public default
    ws_url: str = ""
    weight_limit_per_minute: int = 0  # 0 = the venue's documented per-IP limit
    weight_safety: float = 0.8  # slow down past this share of the limit


#: a venue's defaults where they differ from `VenueSource`'s (the class is shared): the
#: loader fills them into a written block that leaves the key out, as the factories do
#: for a block left out (Bybit linear REST serves at most 500 levels)
VENUE_DEFAULTS: dict[str, dict[str, Any]] = {"bybit": {"depth_limit": BYBIT_LINEAR_MAX}}


def _venue_source(exchange: str) -> Any:
    return lambda: VenueSource(**VENUE_DEFAULTS.get(exchange, {}))


@attrs.frozen
class SourceSection:
    """`source:` — one block per venue."""

    binance: VenueSource = attrs.field(factory=_venue_source("binance"))
    bybit: VenueSource = attrs.field(factory=_venue_source("bybit"))
    okx: VenueSource = attrs.field(factory=_venue_source("okx"))
    kucoin: VenueSource = attrs.field(factory=_venue_source("kucoin"))

    def for_exchange(self, exchange: str) -> VenueSource:
        return getattr(self, exchange)


@attrs.frozen
class S3Section:
    """`storage.s3:` — the bucket comes from S3_BUCKET in the environment/.env."""

    enabled: bool = False
    prefix: str = "cryptoflow"
    region: str = ""  # empty = AWS_REGION
    endpoint_url: str = ""  # empty = AWS; S3_ENDPOINT_URL in the environment overrides
    max_concurrency: int = 4  # boto3 calls in flight (CapacityLimiter)
    upload_retries: int = 8


@attrs.frozen
class SpoolSection:
    """`storage.spool:` — local journal of complete Parquet files awaiting upload."""

    path: str = "./spool"
    max_bytes: int = 10 * 1024**3  # past this: loud alarm, then refuse new data
    max_age: float = 1.0  # max age of buffered delta/gap rows before spooling (loss bound)


@attrs.frozen
class StorageSection:
    """`storage:` — where Parquet lands."""

    local_path: str = "./data"
    spool: SpoolSection = attrs.field(factory=SpoolSection)
    s3: S3Section = attrs.field(factory=S3Section)
    raw_capture: bool = False  # also store exchange payloads as received (`raw` dataset)
    #: seconds a spool file waits before upload; its partition's files (one symbol-hour)
    #: are then merged into ONE object. 0 = one object per spool file (no merging)
    upload_interval: float = 60.0


@attrs.frozen
class BufferSection:
    """`writer.buffer:` — when buffered rows become a file."""

    snapshot_flush_interval: float = 60.0
    #: 0.8 s, not 1 s: a row waits up to this, then one journal round (0.03-0.2 s at the
    #: full table), so p99 event -> on disk stays within 1 s (docs/benchmarks.md)
    delta_flush_interval: float = 0.8
    gap_flush_interval: float = 0.8
    max_rows: int = 500_000  # flush a buffer early past this many rows
    max_bytes: int = 64 * 1024**2  # ...or past about this much memory
    #: all buffers together: past this every buffer is flushed and, while that flush
    #: runs (or the spool refuses it), the writer stops reading (back-pressure). The full
    #: symbol table holds ~120 MB of snapshot rows at a 60 s snapshot flush interval.
    max_total_bytes: int = 256 * 1024**2


@attrs.frozen
class WriterSection:
    buffer: BufferSection = attrs.field(factory=BufferSection)
    encode_threads: int = 2  # CapacityLimiter for Parquet encodes + fsync


@attrs.frozen
class LoggingSection:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: auto = readable lines on a terminal, JSON lines otherwise (services, files, pipes)
    format: Literal["auto", "console", "json"] = "auto"
    output: str = "stderr"  # stderr | stdout | a file path


@attrs.frozen
class CloudWatchSection:
    """`metrics.cloudwatch:` — optional publishing of key metrics to CloudWatch."""

    enabled: bool = False
    interval: float = 60.0
    namespace: str = "Cryptoflow"
    region: str = ""  # empty = AWS_REGION
    endpoint_url: str = ""  # empty = AWS


@attrs.frozen
class MetricsSection:
    """`metrics:` — Prometheus /metrics and /healthz on host:port."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9108
    #: /healthz unhealthy when a symbol lane is silent this long (stale), or has received
    #: nothing this long after the start (never_received)
    stale_after: float = 60.0
    cloudwatch: CloudWatchSection = attrs.field(factory=CloudWatchSection)


@attrs.frozen
class AppConfig:
    """Everything in `configs/config.yml`."""

    cryptoflow: ServiceSection = attrs.field(factory=ServiceSection)
    channels: ChannelsSection = attrs.field(factory=ChannelsSection)
    reader: ReaderSection = attrs.field(factory=ReaderSection)
    processor: ProcessorSection = attrs.field(factory=ProcessorSection)
    source: SourceSection = attrs.field(factory=SourceSection)
    storage: StorageSection = attrs.field(factory=StorageSection)
    writer: WriterSection = attrs.field(factory=WriterSection)
    logging: LoggingSection = attrs.field(factory=LoggingSection)
    metrics: MetricsSection = attrs.field(factory=MetricsSection)


@attrs.frozen
class Shard:
    """One source IP and the symbols it serves, per exchange (`configs/ip_shards.yml`)."""

    name: str
    source_ip: str | None  # None = the host's default route
    symbols: dict[str, list[str]]  # exchange -> normalized symbols


@attrs.frozen
class SymbolEntry:
    """One row of `configs/symbols.yml`: normalized name -> venue instrument ids."""

    name: str
    venues: dict[str, str | None]  # exchange -> venue symbol; None = not listed there
    enabled: bool = True

    def venue_symbol(self, exchange: str) -> str | None:
        return self.venues.get(exchange) if self.enabled else None


@attrs.frozen
class Environment:
    """Secrets and endpoints from the environment / .env. Never logged."""

    aws_access_key_id: str | None = attrs.field(default=None, repr=False)
    aws_secret_access_key: str | None = attrs.field(default=None, repr=False)
    aws_region: str | None = None
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    log_level: str | None = None


@attrs.frozen
class Settings:
    """The loaded, validated whole: what `runtime` and the commands receive."""

    app: AppConfig
    shards: list[Shard]
    symbols: dict[str, SymbolEntry]
    env: Environment
    config_path: str = ""

    def shards_for(self, exchange: str) -> list[Shard]:
        return [s for s in self.shards if s.symbols.get(exchange)]
