"""Reader for the shared recording format (`../shared/data/recorded/README.md`).

One JSON object a line: `{"recv_ns": int, "kind": "rest_snapshot" | "ws", "channel": str,
"msg": payload}`, plain `.jsonl`, gzip `.jsonl.gz` or zstd `.jsonl.zst` (the collector's
raw capture; detected by the magic bytes, so a misnamed file still reads). A raw capture
adds one kind of its own, `instrument` (`storage.rawfile`: the symbol's stored name and
contract multiplier, at the head of each file). Records are
streamed one line at a time; a bad line is reported (line number + reason) to `on_error`
and skipped, or raised when no callback is given, because a replay must go on past one
damaged line. A compressed file that stops being readable (a `.gz` cut short, corrupt
data) ends its lines there with `UnreadableTail`, reported the same way, so what came
before it is kept, as for a plain or zstd file cut short, whose last line is then
invalid JSON; one with no readable line at all is a DataError naming the file.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import attrs
import orjson
import zstandard

from cryptoflow.errors import DataError, UnreadableTail
from cryptoflow.storage.rawfile import INSTRUMENT

KINDS = frozenset({"rest_snapshot", "ws", INSTRUMENT})

#: what the decompressors raise where the data stops: gzip cut short (EOFError) or
#: corrupt (BadGzipFile: bad header or CRC; zlib.error), zstd corrupt (ZstdError). A
#: zstd stream cut short raises nothing: it just ends, in the middle of its last line.
DECOMPRESS_ERRORS: tuple[type[Exception], ...] = (
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    zstandard.ZstdError,
)


@attrs.frozen(slots=True)
class Record:
    line_no: int  # 1-based line in the (decompressed) file
    recv_ns: int
    kind: str  # "rest_snapshot" | "ws" | "instrument"
    channel: str
    msg: Any  # the payload as parsed JSON (dict), or text for non-JSON frames


def open_text(path: Path) -> IO[bytes]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic == b"\x28\xb5\x2f\xfd":  # zstd: raw capture files (`*.jsonl.zst`)
        import io

        # BufferedReader: the zstd reader itself cannot iterate lines
        return io.BufferedReader(zstandard.open(path, "rb"))
    return open(path, "rb")


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of `path`, decompressed, blank lines included.

    Where a compressed file stops being readable the lines end with `UnreadableTail`
    naming the line reading stopped at (the line being read is lost with it), so the
    caller keeps every line before; a file with no readable line is a DataError naming
    it. Before this a `.gz` cut short failed the whole replay with a bare EOFError."""
    path = Path(path)
    line_no = 0
    with open_text(path) as f:
        try:
            for line_no, line in enumerate(f, 1):
                yield line_no, line
        except DECOMPRESS_ERRORS as exc:
            if line_no == 0:
                raise DataError(f"{path}: {_unreadable(exc, '')}") from None
            why = _unreadable(exc, " from here on")
            raise UnreadableTail(f"line {line_no + 1}: {why}", line_no + 1) from None


def _unreadable(exc: Exception, where: str) -> str:
    """Why the decompressor stopped, in words (the library's message kept)."""
    if isinstance(exc, EOFError):
        return f"truncated (the file was cut short): {exc}"
    kind = "zstd" if isinstance(exc, zstandard.ZstdError) else "gzip"
    return f"not readable as {kind}{where}: {exc}"


def parse_record(line: bytes, line_no: int) -> Record:
    """One line -> Record; DataError says what is wrong (never a bare exception)."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise DataError(f"line {line_no}: invalid JSON: {exc}") from None
    if type(obj) is not dict:
        raise DataError(f"line {line_no}: record is not a JSON object")
    for field, typ in (("recv_ns", int), ("kind", str), ("channel", str)):
        if type(obj.get(field)) is not typ:
            raise DataError(f"line {line_no}: field {field!r} missing or not {typ.__name__}")
    if obj["kind"] not in KINDS:
        raise DataError(f"line {line_no}: unknown kind {obj['kind']!r}")
    if "msg" not in obj:
        raise DataError(f"line {line_no}: field 'msg' missing")
    return Record(line_no, obj["recv_ns"], obj["kind"], obj["channel"], obj["msg"])


def iter_records(
    path: Path, on_error: Callable[[int, str], None] | None = None
) -> Iterator[Record]:
    """Records of `path` in file order; blank lines are skipped silently. A compressed
    file's unreadable tail goes to `on_error` as one bad line (see `iter_lines`)."""
    try:
        for line_no, line in iter_lines(path):
            if not line.strip():
                continue
            try:
                yield parse_record(line, line_no)
            except DataError as exc:
                if on_error is None:
                    raise
                on_error(line_no, str(exc))
    except UnreadableTail as exc:
        if on_error is None:
            raise
        on_error(exc.line_no, str(exc))
