"""Parquet encode/decode: zstd, column statistics on, in memory (bytes), via polars.

These are blocking (CPU) calls: the pipeline runs them in `trio.to_thread.run_sync`
behind a `trio.CapacityLimiter`.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from cryptoflow.errors import CorruptSpoolFile

MAGIC = b"PAR1"
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3


def encode(frame: pl.DataFrame) -> bytes:
    """One complete Parquet file as bytes."""
    buf = io.BytesIO()
    frame.write_parquet(
        buf, compression=COMPRESSION, compression_level=COMPRESSION_LEVEL, statistics=True
    )
    return buf.getvalue()


def decode(data: bytes) -> pl.DataFrame:
    """Read Parquet bytes; raises CorruptSpoolFile if they are not a complete file."""
    if len(data) < 12 or data[:4] != MAGIC or data[-4:] != MAGIC:
        raise CorruptSpoolFile("not a complete Parquet file (missing PAR1 header/footer)")
    try:
        return pl.read_parquet(io.BytesIO(data))
    except Exception as exc:
        raise CorruptSpoolFile(f"unreadable Parquet: {exc}") from exc


def validate_file(path: Path) -> int:
    """Fully read a Parquet file; return its row count or raise CorruptSpoolFile."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorruptSpoolFile(f"{path}: cannot read: {exc}") from exc
    try:
        return decode(data).height
    except CorruptSpoolFile as exc:
        raise CorruptSpoolFile(f"{path}: {exc}") from exc
