"""The delta lane's reader: one task per WebSocket connection (many symbols each).

Overload policy (never block the socket): frames are handed on with `send_nowait`. When
the channel is full the diff is dropped and the symbol is marked overloaded; the next
time there is room, a `StreamEvent(CONSUMER_OVERLOAD, dropped=n)` goes in line before the
symbol's next diff. The normalizer turns that into a `consumer_overload` gap and asks for
a resync, so the lost stretch is recorded, never silently skipped. A connection that
opens after a previous one sends `StreamEvent(RECONNECT)` per symbol the same way; it
becomes a gap only if the stream did not continue across the reconnect.

Reconnects: on any connection failure or stall (no frame for `stall_timeout`) the runner
reconnects with capped exponential back-off and jitter; a healthy connection is
replaced after `reconnect_after` (before the venues' 24 h cut).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio
import trio_websocket

from cryptoflow.errors import ExchangeError, MalformedMessage
from cryptoflow.exchanges.base import Control, WsItem
from cryptoflow.models import MARKET_FUTURES, GapKind, StreamEvent
from cryptoflow.net.ws import open_ws
from cryptoflow.pipeline.supervise import backoff_delay

log = logging.getLogger("cryptoflow.stream")


class VenueStream(Protocol):
    exchange: str
    keepalive_interval: float | None
    streams_per_connection: int

    async def url(self, venue_symbols: list[str]) -> str: ...

    async def on_open(
        self, ws: trio_websocket.WebSocketConnection, venue_symbols: list[str]
    ) -> None: ...

    async def keepalive(self, ws: trio_websocket.WebSocketConnection) -> None: ...

    def parse(self, raw: str | bytes, receive_ns: int) -> WsItem: ...


@attrs.define
class StreamStats:
    connects: int = 0
    disconnects: int = 0
    frames: int = 0
    diffs: int = 0
    dropped: int = 0
    malformed: int = 0
    last_error: str = ""


class _Reconnect(Exception):
    """The venue asked us to reconnect (e.g. OKX notice 64008)."""


class _Emitter:
    """Hands items on without ever waiting, tracking drops per symbol."""

    def __init__(self, out: trio.MemorySendChannel, exchange: str, stats: StreamStats) -> None:
        self.out = out
        self.exchange = exchange
        self.stats = stats
        self.dropped: dict[str, int] = {}

    def emit(self, symbol: str, item: object) -> None:
        pending = self.dropped.get(symbol, 0)
        if pending:
            marker = StreamEvent(
                self.exchange,
                MARKET_FUTURES,
                symbol,
                GapKind.CONSUMER_OVERLOAD,
                time.time_ns(),
                reason=f"normalizer channel full; dropped {pending} messages",
                dropped=pending,
            )
            try:
                self.out.send_nowait(marker)
            except trio.WouldBlock:
                self._drop(symbol)
                return
            self.dropped[symbol] = 0
        try:
            self.out.send_nowait(item)
        except trio.WouldBlock:
            self._drop(symbol)

    def _drop(self, symbol: str) -> None:
        if not self.dropped.get(symbol):
            log.warning("%s/%s: consumer overloaded, dropping diffs", self.exchange, symbol)
        self.dropped[symbol] = self.dropped.get(symbol, 0) + 1
        self.stats.dropped += 1


async def run_stream(
    venue: VenueStream,
    venue_symbols: Sequence[str],
    symbol_of: dict[str, str],
    out: trio.MemorySendChannel,
    *,
    source_ip: str | None = None,
    reconnect_after: float = 23 * 3600.0,
    stall_timeout: float = 30.0,
    backoff_initial: float = 1.0,
    backoff_max: float = 60.0,
    stats: StreamStats | None = None,
    rng: random.Random | None = None,
) -> None:
    """Keep one connection for `venue_symbols` alive forever, feeding `out`."""
    stats = stats if stats is not None else StreamStats()
    rng = rng or random.Random()
    emitter = _Emitter(out, venue.exchange, stats)
    symbols = [symbol_of.get(s, s) for s in venue_symbols]
    failures = 0
    async with out:
        while True:
            try:
                url = await venue.url(list(venue_symbols))
                async with open_ws(url, source_ip=source_ip) as ws:
                    await venue.on_open(ws, list(venue_symbols))
                    stats.connects += 1
                    if stats.connects > 1:
                        for sym in symbols:
                            emitter.emit(
                                sym,
                                StreamEvent(
                                    venue.exchange,
                                    MARKET_FUTURES,
                                    sym,
                                    GapKind.RECONNECT,
                                    time.time_ns(),
                                    reason=stats.last_error or "planned reconnect",
                                ),
                            )
                    log.info(
                        "%s: connected (%d streams)%s",
                        venue.exchange,
                        len(venue_symbols),
                        f" from {source_ip}" if source_ip else "",
                    )
                    with trio.move_on_after(reconnect_after):
                        await _pump(ws, venue, emitter, stats, stall_timeout)
                    stats.last_error = "planned reconnect"
                    failures = 0
                    continue
            except (
                trio_websocket.ConnectionClosed,
                trio_websocket.HandshakeError,
                OSError,
                trio.TooSlowError,
                ExchangeError,
                _Reconnect,
            ) as exc:
                stats.disconnects += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                failures += 1
                delay = backoff_delay(
                    failures, initial=backoff_initial, maximum=backoff_max, rng=rng
                )
                log.warning(
                    "%s: stream lost (%s); reconnecting in %.1fs",
                    venue.exchange,
                    stats.last_error,
                    delay,
                )
                await trio.sleep(delay)


async def _pump(
    ws: trio_websocket.WebSocketConnection,
    venue: VenueStream,
    emitter: _Emitter,
    stats: StreamStats,
    stall_timeout: float,
) -> None:
    async with trio.open_nursery() as nursery:
        if venue.keepalive_interval:
            nursery.start_soon(_keepalive, ws, venue)
        while True:
            try:
                with trio.fail_after(stall_timeout):
                    raw = await ws.get_message()
            except trio.TooSlowError:
                raise trio.TooSlowError(f"no frame for {stall_timeout:g}s (stalled)") from None
            stats.frames += 1
            try:
                item = venue.parse(raw, time.time_ns())
            except MalformedMessage as exc:
                stats.malformed += 1
                log.warning("%s: malformed frame skipped: %s", venue.exchange, exc)
                continue
            if isinstance(item, Control):
                if item.kind == "error":
                    log.warning("%s: venue error frame: %s", venue.exchange, item.detail)
                if item.reconnect:
                    raise _Reconnect(item.detail or item.kind)
                continue
            for diff in item:
                stats.diffs += 1
                emitter.emit(diff.symbol, diff)


async def _keepalive(ws: trio_websocket.WebSocketConnection, venue: VenueStream) -> None:
    assert venue.keepalive_interval
    while True:
        await trio.sleep(venue.keepalive_interval)
        await venue.keepalive(ws)
