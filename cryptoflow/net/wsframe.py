"""RFC 6455 frames for a client: server frames -> messages (`FrameDecoder`), our masked
frames (`encode_frame`). Pure parsing and building, no I/O: `net/ws.py` drives it on a
socket; tests and scripts/bench_ws.py call it directly.

Hand-written rather than wsproto's frame layer because that was the collector's largest
per-frame cost (see `net/ws.py`): server frames are unmasked and nearly all small whole
text frames, which `feed` parses with a few index reads and one decode each.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, MutableSequence

#: close code for "connection lost without a close frame" (RFC 6455 §7.1.5)
ABNORMAL_CLOSURE = 1006
MESSAGE_TOO_BIG = 1009
PROTOCOL_ERROR = 1002
INVALID_PAYLOAD = 1007  # text that is not UTF-8
NO_STATUS_RECEIVED = 1005  # a close frame without a code (never sent on the wire)

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


class FrameError(Exception):
    """The server broke RFC 6455: fail the connection with this close code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


def _protocol_error(problem: str) -> FrameError:
    return FrameError(PROTOCOL_ERROR, f"protocol error: {problem}")


class FrameDecoder:
    """Server-to-client frames -> messages, pings and the close. Parsing only, no I/O.

    We negotiate no extensions, so RSV bits are errors, and server frames are never
    masked. A whole unfragmented text frame (nearly every frame) takes the inline fast
    path of `feed`; everything else goes through `_frame`."""

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        #: ping payloads read and not yet answered (the connection drains this)
        self.pings: list[bytes] = []
        #: (code, reason) once a close frame is read; later bytes are ignored
        self.close: tuple[int, str] | None = None
        self._buf = bytearray()  # bytes of an incomplete frame
        self._need = 0  # size `_buf` must reach before that frame can be complete
        self._opcode = 0  # OP_TEXT / OP_BINARY while a fragmented message is open
        self._parts: list[bytes] = []
        self._parts_size = 0

    def feed(self, data: bytes | bytearray, messages: MutableSequence[str | bytes]) -> None:
        """Parse every complete frame in the buffered bytes plus `data`; messages are
        appended to `messages` (text as str, binary as bytes). Raises `FrameError`."""
        if self.close is not None:
            return
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:  # a large frame still arriving: no re-parse
                return
            data = buf
        append = messages.append
        max_left = self.max_message_size - self._parts_size
        end = len(data)
        pos = 0
        while True:
            if end - pos < 2:
                need = 2
                break
            b0 = data[pos]
            length = data[pos + 1]
            start = pos + 2
            if length > 125:
                if length & 0x80:
                    raise _protocol_error("masked frame from the server")
                if length == 126:
                    start += 2
                    if start > end:
                        need = start - pos
                        break
                    length = (data[pos + 2] << 8) | data[pos + 3]
                    if length < 126:
                        raise _protocol_error("non-minimal payload length")
                else:
                    start += 8
                    if start > end:
                        need = start - pos
                        break
                    length = int.from_bytes(data[pos + 2 : start], "big")
                    if length < 0x10000 or length >> 63:
                        raise _protocol_error("invalid 64-bit payload length")
                if b0 & 0x08:
                    raise _control_error(b0)
            if length > max_left and not b0 & 0x08:
                raise FrameError(
                    MESSAGE_TOO_BIG, f"message larger than {self.max_message_size} bytes"
                )
            stop = start + length
            if stop > end:
                need = stop - pos
                break
            if b0 == 0x81 and not self._opcode:  # FIN + text, no fragmented message open
                try:
                    append(data[start:stop].decode())
                except UnicodeDecodeError:
                    raise FrameError(INVALID_PAYLOAD, "invalid UTF-8 in a text message") from None
            else:
                self._frame(b0, data[start:stop], append)
                if self.close is not None:
                    buf.clear()
                    return
                max_left = self.max_message_size - self._parts_size
            pos = stop
        self._need = need
        if data is buf:
            del buf[:pos]
        elif pos < end:
            buf += data[pos:]

    def _frame(
        self, b0: int, payload: bytes | bytearray, append: Callable[[str | bytes], None]
    ) -> None:
        """Any frame but a whole text message: fragments, binary, control frames."""
        if b0 & 0x70:
            raise _protocol_error("reserved bits set")
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode & 0x08:
            if not fin or opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise _control_error(b0)
            if opcode == OP_PING:
                self.pings.append(bytes(payload))
            elif opcode == OP_CLOSE:
                self.close = parse_close(payload)
            return  # pong: nothing to do
        if opcode == OP_CONTINUATION:
            if not self._opcode:
                raise _protocol_error("continuation frame without a message to continue")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._opcode:
                raise _protocol_error("new message inside a fragmented message")
            if fin:  # whole binary message (whole text took the fast path)
                append(bytes(payload) if opcode == OP_BINARY else _text(payload))
                return
            self._opcode = opcode
        else:
            raise _protocol_error(f"unknown opcode {opcode:#x}")
        self._parts.append(bytes(payload))
        self._parts_size += len(payload)
        if fin:
            joined = b"".join(self._parts)
            append(joined if self._opcode == OP_BINARY else _text(joined))
            self._opcode = 0
            self._parts.clear()
            self._parts_size = 0


def _text(payload: bytes | bytearray) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_PAYLOAD, "invalid UTF-8 in a text message") from None


def _control_error(b0: int) -> FrameError:
    opcode = b0 & 0x0F
    if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
        return _protocol_error(f"unknown opcode {opcode:#x}")
    if not b0 & 0x80:
        return _protocol_error("fragmented control frame")
    return _protocol_error("control frame longer than 125 bytes")


def parse_close(payload: bytes | bytearray) -> tuple[int, str]:
    """A close frame's (code, reason); no payload means 1005 (RFC 6455 §7.1.5)."""
    if not payload:
        return NO_STATUS_RECEIVED, ""
    if len(payload) == 1:
        raise _protocol_error("close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise _protocol_error(f"invalid close code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise FrameError(INVALID_PAYLOAD, "invalid UTF-8 in the close reason") from None


def mask(payload: bytes, key: bytes) -> bytes:
    """`payload` XOR the repeated 4-byte `key` (its own inverse).

    Big-int XOR suits what we send (subscriptions, pongs): ~1 µs at 125 bytes, half the
    time of wsproto's per-lane `translate`, which only wins from ~4 KiB up."""
    n = len(payload)
    if not n:
        return b""
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a fresh random key as RFC 6455 §5.3 requires."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 0x10000:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + key + mask(payload, key)


def close_frame(code: int, reason: str = "") -> bytes:
    """Our close frame: the code (none for 1005) and a reason cut to fit 125 bytes."""
    if code == NO_STATUS_RECEIVED:
        return encode_frame(OP_CLOSE, b"")
    why = reason.encode()[:123].decode(errors="ignore").encode()
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + why)
