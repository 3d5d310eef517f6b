"""Raw-capture files: JSON lines in the shared recording format, zstd-compressed.

One record a line, `{"recv_ns": int, "kind": "rest_snapshot" | "ws", "channel": str,
"msg": <payload>}` where `<payload>` is the exchange's JSON text exactly as received
(embedded byte for byte, so `msg` parses back to the same JSON). A file is one complete
zstd frame with the content size and checksum in its header, so a truncated file fails
`validate_file` and is quarantined by the spool, never uploaded.

Each file begins with one record of kind `instrument` (`INSTRUMENT`): what the collector
knew of the file's symbol when it stored its rows, from the venue's instruments list,
`{"recv_ns": <when the list was read>, "kind": "instrument", "channel": <venue symbol>,
"msg": {"symbol": <stored name>, "venue_symbol": <venue symbol>, "multiplier": <decimal
text>}}` (multiplier: base units per venue size unit, OKX `ctVal`, KuCoin `multiplier`, 1
elsewhere). `cryptoflow replay` reads it, so a capture replays without `--instruments`
and under the collector's names; a mid-file record (the list read again) applies to the
records after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import zstandard

from cryptoflow.errors import CorruptSpoolFile

SUFFIX = ".jsonl.zst"
#: the record kind of a file's instrument record (see above)
INSTRUMENT = "instrument"
MAGIC = b"\x28\xb5\x2f\xfd"
LEVEL = 3


def encode(lines: Iterable[bytes]) -> bytes:
    """Lines (each ending in b'\\n') -> one zstd frame with size and checksum."""
    data = b"".join(lines)
    return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(data)


def decode(data: bytes) -> bytes:
    if data[:4] != MAGIC:
        raise CorruptSpoolFile("not a zstd file (missing magic)")
    try:
        # one-shot decompress: needs the whole frame (content size in the header, checksum
        # at the end), so a truncated file raises instead of yielding a short result
        return zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as exc:
        raise CorruptSpoolFile(f"unreadable zstd: {exc}") from exc


def validate_file(path: Path) -> int:
    """Fully decompress (checksum verified); return the line count or raise
    CorruptSpoolFile (an OSError reading it as it is, like `parquet.validate_file`)."""
    data = path.read_bytes()
    try:
        text = decode(data)
    except CorruptSpoolFile as exc:
        raise CorruptSpoolFile(f"{path}: {exc}") from exc
    if text and not text.endswith(b"\n"):
        raise CorruptSpoolFile(f"{path}: truncated (last line has no newline)")
    return text.count(b"\n")
