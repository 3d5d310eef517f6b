"""Parquet encode/decode: zstd, column statistics on, in memory (bytes), via polars.

These are blocking (CPU) calls: the pipeline runs them in `trio.to_thread.run_sync`
behind a `trio.CapacityLimiter`.
"""

from __future__ import annotations

import io
from pathlib import Path

import polars as pl

from cryptoflow.errors import TRANSIENT_ERRORS, CorruptSpoolFile

MAGIC = b"PAR1"
COMPRESSION = "zstd"
COMPRESSION_LEVEL = 3
#: key-value metadata of a merged spool file: JSON list of the spool keys it replaces
MERGED_FROM = "cryptoflow.merged_from"


def encode(frame: pl.DataFrame, metadata: dict[str, str] | None = None) -> bytes:
    """One complete Parquet file as bytes (optional key-value metadata in the footer)."""
    buf = io.BytesIO()
    kwargs = {"metadata": metadata} if metadata else {}
    # one chunk per column: the bytes (hence the content-hash name) must depend on the
    # rows only, not on how the frame was assembled (polars writes chunks as pages)
    frame.rechunk().write_parquet(
        buf,
        compression=COMPRESSION,
        compression_level=COMPRESSION_LEVEL,
        statistics=True,
        **kwargs,
    )
    return buf.getvalue()


def read_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata of a Parquet file's footer ({} if its footer is unreadable).

    A failure to read the file at all (an OSError: too many open files, a disk error) or
    memory short (`errors.TRANSIENT_ERRORS`) is raised: `{}` says "not a merged file",
    and the start-up scan then kept an interrupted merge's sources beside the merged
    file (both uploaded: rows stored twice) and left an interrupted split undone."""
    try:
        return dict(pl.read_parquet_metadata(path))
    except TRANSIENT_ERRORS:
        raise
    except Exception:
        return {}


def decode(data: bytes) -> pl.DataFrame:
    """Read Parquet bytes; raises CorruptSpoolFile if they are not a complete file."""
    if len(data) < 12 or data[:4] != MAGIC or data[-4:] != MAGIC:
        raise CorruptSpoolFile("not a complete Parquet file (missing PAR1 header/footer)")
    try:
        return pl.read_parquet(io.BytesIO(data))
    except MemoryError:
        raise  # the machine's, not the file's: a corrupt file is quarantined, never uploaded
    except Exception as exc:
        raise CorruptSpoolFile(f"unreadable Parquet: {exc}") from exc


def validate_file(path: Path) -> int:
    """Fully read a Parquet file; return its row count or raise CorruptSpoolFile. An
    OSError reading it is raised as it is: whether it is the file's trouble or the
    machine's is for the caller to judge (`spool.validate_file`)."""
    data = path.read_bytes()
    try:
        return decode(data).height
    except CorruptSpoolFile as exc:
        raise CorruptSpoolFile(f"{path}: {exc}") from exc
