"""Optional raw capture (`storage.raw_capture: true`): the exchange payloads as received.

Every WebSocket frame that carried book data and every successful REST depth snapshot is
kept, next to the normalized datasets, as the `raw` dataset: JSON lines in the shared
recording format (`{"recv_ns", "kind", "channel", "msg"}`, `msg` = the payload text
embedded byte for byte; line breaks between JSON tokens become spaces), zstd-compressed,
one file per (exchange, symbol) and flush, partitioned by receive-time hour:

    raw/exchange=<ex>/market=<mkt>/symbol=<SYM>/year=/month=/day=/hour=/
        <SYM>-<first recv ms>-<last recv ms>-<hash8>.jsonl.zst

`cryptoflow replay` reads these files back (`.jsonl.zst`), so the data can be
re-normalized later; `recv_ns` is the same receive time the live pipeline used, so a
replay gives the same delta rows.

Each file begins with the symbol's `instrument` record (`storage.rawfile`: stored name,
venue name, contract multiplier, set by `describe` when the shard has read the venue's
instruments list): the book payloads alone do not say how big an OKX or KuCoin contract
is, nor which name collect stores the symbol under, and a record in every file keeps any
file, or any concatenation of files, replayable as it was collected. It costs one short
line per file.

Hooks (zero cost when off: the readers get `None` and skip one `is not None` test):
- WS: `run_stream(..., raw_sink=capture.ws_sink(exchange))` calls it with (symbol, frame,
  recv_ns) for each frame that parsed to diffs.
- REST: `install_rest_hook(http_client)` adds an httpx response hook that, only inside a
  `capture.rest_slot()` block (the snapshot fetch), keeps the response path+query and
  body; `capture.rest(...)` then records it with the snapshot's own receive time.

Buffers are flushed by the writer (it calls `due`/`take` like its row buffers) at the
same interval as delta rows, so the SIGKILL loss bound is the same. A new buffer calls
`on_open` (the writer's): the flush loop sleeps until the earliest deadline it knows of,
and with no row buffer open (a lane with raw frames but no rows yet) nothing else would
tell it of this one's, which then waited past `max_age` for the next row batch. Once per
buffer, not per frame: the frames after the first cost nothing more. If the spool refuses
raw files (full) they stay buffered up to `max_buffer_bytes`; beyond that the OLDEST raw
lines are dropped with an ERROR log and counted in `stats.dropped_lines` (the normalized
rows are never dropped: they back-pressure instead). Raw capture is a second copy, so
this is the documented policy for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

import attrs
import httpx
import orjson
import trio

from cryptoflow.models import MARKET_FUTURES
from cryptoflow.storage.rawfile import INSTRUMENT

log = logging.getLogger(__name__)

RawKey = tuple[str, str, str]  # exchange, market, symbol


@attrs.define
class RawStats:
    lines: int = 0
    bytes_in: int = 0
    files: int = 0
    dropped_lines: int = 0
    buffered_bytes: int = 0


@attrs.define
class RawBuffer:
    key: RawKey
    opened_at: float
    first_ns: int
    last_ns: int = 0
    lines: list[bytes] = attrs.field(factory=list)
    nbytes: int = 0
    retry_at: float = float("-inf")
    failures: int = 0
    refused_full: bool = False  # its last flush was refused by a full spool
    #: the instrument record the file begins with (`RawCapture.describe`); b"" = none
    header: bytes = b""
    #: the record in effect for its last lines: `header`, or one since put in line
    latest_header: bytes = attrs.field(
        default=attrs.Factory(lambda self: self.header, takes_self=True)
    )

    def file_lines(self) -> list[bytes]:
        """The lines of its file: the instrument record, then the payloads."""
        return [self.header, *self.lines] if self.header else self.lines


@attrs.define
class _RestSlot:
    channel: str = ""
    body: bytes | None = None


_REST_SLOT: contextvars.ContextVar[_RestSlot | None] = contextvars.ContextVar(
    "cryptoflow_raw_rest_slot", default=None
)


def _json_payload(payload: str | bytes) -> bytes:
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    stripped = data.strip()
    if not stripped or stripped[:1] not in (b"{", b"["):
        return orjson.dumps(data.decode("utf-8", "replace"))  # non-JSON frame: as a string
    if b"\n" in stripped or b"\r" in stripped:
        # raw line breaks in valid JSON are whitespace between tokens: same value
        stripped = stripped.replace(b"\r", b" ").replace(b"\n", b" ")
    return stripped


def ws_channel(frame: str | bytes) -> str:
    """The stream/topic name of a venue frame (Binance `stream`, Bybit/KuCoin `topic`,
    OKX `arg.channel:arg.instId`); empty if none."""
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(obj, dict):
        return ""
    for name in ("stream", "topic"):
        if isinstance(obj.get(name), str):
            return obj[name]
    arg = obj.get("arg")
    if isinstance(arg, dict):
        return f"{arg.get('channel', '')}:{arg.get('instId', '')}"
    return ""


def record_line(recv_ns: int, kind: str, channel: str, payload: str | bytes) -> bytes:
    return b'{"recv_ns":%d,"kind":"%s","channel":%s,"msg":%s}\n' % (
        recv_ns,
        kind.encode(),
        orjson.dumps(channel),
        _json_payload(payload),
    )


def instrument_line(recv_ns: int, symbol: str, venue_symbol: str, multiplier: str) -> bytes:
    """The `instrument` record of a raw file (`storage.rawfile`)."""
    msg = {"symbol": symbol, "venue_symbol": venue_symbol, "multiplier": multiplier}
    return record_line(recv_ns, INSTRUMENT, venue_symbol, orjson.dumps(msg))


class RawCapture:
    def __init__(
        self,
        *,
        market: str = MARKET_FUTURES,
        max_buffer_bytes: int = 64 * 1024**2,
    ) -> None:
        self.market = market
        self.max_buffer_bytes = max_buffer_bytes
        self.stats = RawStats()
        self._buffers: dict[RawKey, RawBuffer] = {}
        self._headers: dict[RawKey, bytes] = {}  # instrument record per symbol
        self._described: dict[RawKey, tuple[str, str]] = {}  # its (venue name, multiplier)
        #: called when a buffer opens (`Writer` sets it: its flush loop learns the deadline)
        self.on_open: Callable[[], None] | None = None

    # --- hooks (called by readers; synchronous, never block) ----------------------------

    def describe(
        self, exchange: str, symbol: str, venue_symbol: str, multiplier: str, recv_ns: int
    ) -> None:
        """From now on every raw file of `symbol` begins with this instrument record: its
        venue name and the contract multiplier its rows are stored with (the shard calls
        it once it has read the instruments list, before its readers start). A buffer
        already open gets the record in line, for the payloads after it."""
        key = (exchange, self.market, symbol)
        if self._described.get(key) == (venue_symbol, multiplier):
            return  # the list read again (a shard restart), the same size: nothing new
        self._described[key] = (venue_symbol, multiplier)
        line = instrument_line(recv_ns, symbol, venue_symbol, multiplier)
        self._headers[key] = line
        buf = self._buffers.get(key)
        if buf is not None:
            buf.lines.append(line)
            buf.latest_header = line

    def add(self, exchange: str, symbol: str, kind: str, channel: str, payload, recv_ns: int):
        line = record_line(recv_ns, kind, channel, payload)
        key = (exchange, self.market, symbol)
        buf = self._buffers.get(key)
        if buf is None:
            buf = RawBuffer(key, trio.current_time(), recv_ns, header=self._headers.get(key, b""))
            self._buffers[key] = buf
            if self.on_open is not None:
                self.on_open()
        buf.lines.append(line)
        buf.nbytes += len(line)
        buf.first_ns = min(buf.first_ns, recv_ns)
        buf.last_ns = max(buf.last_ns, recv_ns)
        s = self.stats
        s.lines += 1
        s.bytes_in += len(line)
        s.buffered_bytes += len(line)
        if s.buffered_bytes > self.max_buffer_bytes:
            self._drop_oldest()

    def ws_sink(self, exchange: str) -> Callable[[str, str | bytes, int], None]:
        def sink(symbol: str, frame: str | bytes, recv_ns: int) -> None:
            self.add(exchange, symbol, "ws", ws_channel(frame), frame, recv_ns)

        return sink

    @contextlib.contextmanager
    def rest_slot(self) -> Iterator[_RestSlot]:
        slot = _RestSlot()
        token = _REST_SLOT.set(slot)
        try:
            yield slot
        finally:
            _REST_SLOT.reset(token)

    def rest(self, exchange: str, symbol: str, slot: _RestSlot, recv_ns: int) -> None:
        if slot.body is not None:
            self.add(exchange, symbol, "rest_snapshot", slot.channel, slot.body, recv_ns)

    # --- for the writer -------------------------------------------------------------

    def _drop_oldest(self) -> None:
        s = self.stats
        while s.buffered_bytes > self.max_buffer_bytes and self._buffers:
            buf = min(self._buffers.values(), key=lambda b: b.opened_at)
            del self._buffers[buf.key]
            s.buffered_bytes -= buf.nbytes
            s.dropped_lines += len(buf.lines)
            log.error(
                "raw capture: spool not accepting and %d bytes buffered (cap %d): DROPPED "
                "%d raw lines of %s/%s (normalized rows are kept; %d raw lines dropped so far)",
                s.buffered_bytes + buf.nbytes,
                self.max_buffer_bytes,
                len(buf.lines),
                buf.key[0],
                buf.key[2],
                s.dropped_lines,
            )

    def next_deadline(self, interval: float) -> float:
        return min(
            (max(b.retry_at, b.opened_at + interval) for b in self._buffers.values()),
            default=float("inf"),
        )

    def take_due(self, now: float, interval: float, *, force: bool) -> list[RawBuffer]:
        out = []
        for key, buf in list(self._buffers.items()):
            if now < buf.retry_at and not force:
                continue
            if force or now >= buf.opened_at + interval:
                del self._buffers[key]
                self.stats.buffered_bytes -= buf.nbytes
                out.append(buf)
        return out

    def put_back(self, buf: RawBuffer) -> None:
        """A flush failed: merge the lines back in front of anything newer. If the symbol
        was described again while the buffer was out, the new record goes in line after
        its lines: the payloads after it are sized by it (it once went only into a
        buffer opened since, so with none open they were stored under the old record)."""
        cur = self._buffers.get(buf.key)
        if cur is not None:
            if cur.header and cur.header != buf.latest_header:  # described again since
                buf.lines.append(cur.header)
            buf.lines.extend(cur.lines)
            buf.latest_header = cur.latest_header
            buf.nbytes += cur.nbytes
            buf.last_ns = max(buf.last_ns, cur.last_ns)
            buf.first_ns = min(buf.first_ns, cur.first_ns)
            self.stats.buffered_bytes -= cur.nbytes
        else:
            current = self._headers.get(buf.key, b"")
            if current and current != buf.latest_header:  # described while it was out
                buf.lines.append(current)
                buf.latest_header = current
        self._buffers[buf.key] = buf
        self.stats.buffered_bytes += buf.nbytes
        if self.stats.buffered_bytes > self.max_buffer_bytes:
            self._drop_oldest()

    def drop_pending(self) -> tuple[int, int]:
        """Drop every buffer (the writer stops past its deadline), counted in
        `stats.dropped_lines`: (lines, buffers) dropped."""
        lines = sum(len(b.lines) for b in self._buffers.values())
        buffers = len(self._buffers)
        self._buffers.clear()
        self.stats.buffered_bytes = 0
        self.stats.dropped_lines += lines
        return lines, buffers

    @property
    def pending(self) -> bool:
        return bool(self._buffers)


def install_rest_hook(client: httpx.AsyncClient) -> None:
    """Keep path+query and body of responses inside a `RawCapture.rest_slot()` block."""

    async def hook(response: httpx.Response) -> None:
        slot = _REST_SLOT.get()
        if slot is None or response.status_code != 200:
            return
        await response.aread()
        slot.channel = response.request.url.raw_path.decode("ascii", "replace")
        slot.body = response.content

    client.event_hooks = {
        **client.event_hooks,
        "response": [*client.event_hooks.get("response", []), hook],
    }
