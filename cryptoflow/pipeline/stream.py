"""The delta lane's reader: one task per WebSocket connection (many symbols each).

Overload policy (never block the socket): frames are handed on with `send_nowait`. When
the channel is full the diff is dropped and the symbol is marked overloaded; the next
time there is room, a `StreamEvent(CONSUMER_OVERLOAD, dropped=n)` goes in line before the
symbol's next diff. The normalizer turns that into a `consumer_overload` gap and asks for
a resync, so the lost stretch is recorded, never silently skipped. A connection that
opens after a previous one sends `StreamEvent(RECONNECT)` per symbol the same way; it
becomes a gap only if the stream did not continue across the reconnect.

Only the symbols a connection subscribed pass: a diff the parser names any other symbol
for (the parsers keep a name missing from the symbol table as sent) is skipped as a
malformed frame (WARNING, `StreamStats.malformed`), before raw capture and the channel,
so no name from the wire that we did not ask for reaches a storage path.

Reconnects: on any connection failure or stall (no book data for `stall_timeout`; pongs
do not count) the runner reconnects with capped exponential back-off and jitter, counted
from zero again once a connection has lasted `backoff_max`; a healthy connection is
replaced after `reconnect_after` (before the venues' 24 h cut), closed the graceful way
below and reopened at once.

Resync by resubscribe (Bybit, OKX: the venue sends a fresh in-stream snapshot after a
subscribe): a venue stream with a `resubscribe(ws, venue_symbols)` method gets a
per-connection `ResyncQueue` of normalized symbols; the runner serves it inside the live
connection (unsubscribe + subscribe). The symbols pending at the same moment go in one
batch: one unsubscribe and one subscribe per `args_per_request` symbols, not two
requests per symbol. A request right after a (re)subscribe whose snapshot has not come
yet does not subscribe again. When no snapshot arrives within the venue's
`snapshot_timeout` (OKX announced dropping the in-stream snapshot), `fallback` asks for a
REST snapshot instead.

Subscribe-request cap (OKX: 480 subscribe/unsubscribe requests per hour per connection,
`subscribe_requests_per_hour`): each connection counts its requests in a sliding hour,
the initial subscription included (`RequestCap`, 90 % of the cap usable). A resubscribe
that would pass it is not sent: its symbols go to `fallback` (a REST snapshot, the path
a missing in-stream snapshot takes) at once, with a WARNING; a stream without a fallback
reconnects instead (a new connection starts a fresh count).

Graceful close (on stop, `stopping` set, and on the planned reconnect): an open
connection is not cut. The runner sends its close frame and goes on reading until the
venue's close answer (at most `drain_timeout`), so every frame the venue sent before it
saw our close is handed on; a cut would lose the frames between the socket buffer and
the store (on a planned reconnect that made a gap where the stream could have continued
across it). A runner that is connecting or backing off when the stop comes ends at once.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Protocol

import attrs
import trio

from cryptoflow.errors import ExchangeError, MalformedMessage
from cryptoflow.exchanges.base import Control, WsItem
from cryptoflow.models import MARKET_FUTURES, GapKind, StreamEvent
from cryptoflow.net.ratelimit import RequestCap
from cryptoflow.net.ws import WsClosed, WsConnection, open_ws
from cryptoflow.pipeline.resync import ResyncQueue
from cryptoflow.pipeline.supervise import backoff_delay

log = logging.getLogger("cryptoflow.stream")


class VenueStream(Protocol):
    exchange: str
    keepalive_interval: float | None
    streams_per_connection: int

    async def url(self, venue_symbols: list[str]) -> str: ...

    async def on_open(self, ws: WsConnection, venue_symbols: list[str]) -> None: ...

    async def keepalive(self, ws: WsConnection) -> None: ...

    def parse(self, raw: str | bytes, receive_ns: int) -> WsItem: ...


#: how long to wait for an in-stream snapshot after a subscribe before falling back to a
#: REST snapshot, when the venue stream does not say (`snapshot_timeout`)
DEFAULT_SNAPSHOT_TIMEOUT = 5.0


def can_resubscribe(venue: object) -> bool:
    """Whether this venue stream heals a broken book by resubscribing (optional method)."""
    return callable(getattr(venue, "resubscribe", None))


#: the span of a venue's `subscribe_requests_per_hour`
SUBSCRIBE_WINDOW_S = 3600.0


@attrs.define
class _ConnState:
    """Per-connection bookkeeping: what it subscribed, and for resubscribe requests when
    (trio clock times)."""

    #: the normalized symbols this connection subscribed: a diff for any other is dropped
    symbols: frozenset[str]
    subscribed_at: dict[str, float] = attrs.field(factory=dict)  # normalized symbol
    snapshot_at: dict[str, float] = attrs.field(factory=dict)
    watching: set[str] = attrs.field(factory=set)
    #: names the connection in log lines (`okx/eip2`: which shard, hence source IP)
    label: str = ""
    #: subscribe-type requests sent on this connection, for venues with a cap
    requests: RequestCap | None = None
    capped: bool = False  # the last resubscribe was refused for the cap (logging)


def _conn_state(venue: VenueStream, symbols: list[str], now: float, label: str = "") -> _ConnState:
    """A new connection's bookkeeping: every symbol was just subscribed, and the requests
    `on_open` sent count against the venue's cap, if it has one."""
    conn = _ConnState(
        frozenset(symbols),
        subscribed_at=dict.fromkeys(symbols, now),
        label=label or venue.exchange,
    )
    cap = getattr(venue, "subscribe_requests_per_hour", None)
    if cap and can_resubscribe(venue):
        conn.requests = RequestCap(cap, SUBSCRIBE_WINDOW_S)
        conn.requests.note(_requests_for(venue, len(symbols)))
    return conn


def _requests_for(venue: VenueStream, n_symbols: int) -> int:
    """Requests to (un)subscribe `n_symbols` (`args_per_request` per message)."""
    return math.ceil(n_symbols / max(1, getattr(venue, "args_per_request", 1)))


@attrs.define
class StreamStats:
    connects: int = 0
    disconnects: int = 0
    frames: int = 0
    diffs: int = 0
    dropped: int = 0
    malformed: int = 0
    last_error: str = ""


@attrs.define
class _Closer:
    """Closes a runner's open connection the graceful way (see the module docstring)."""

    life: trio.CancelScope  # the runner's whole life: cancelled on a stop with no drain
    timeout: float
    stopping: bool = False  # the runner ends after this connection
    planned: bool = False  # the connection is being replaced (`reconnect_after`)
    ws: WsConnection | None = None  # the connection being read, while there is one
    side: trio.CancelScope | None = None  # its keepalive and resubscribe tasks
    scope: trio.CancelScope | None = None  # its whole life (the drain's deadline)

    def attach(
        self,
        ws: WsConnection | None,
        scope: trio.CancelScope | None = None,
        side: trio.CancelScope | None = None,
    ) -> None:
        self.ws, self.scope, self.side = ws, scope or self.scope, side
        if ws is None:
            self.planned = False

    async def close(self) -> bool:
        """Send our close frame and bound the drain; False when nothing is open."""
        if self.ws is None or self.scope is None:
            return False
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + self.timeout)
        if self.ws.closed is not None:
            return True  # already ending: the reader hands out what is pending, then ends
        if self.side is not None:
            self.side.cancel()  # no pings or subscribes after our close frame
        with suppress(WsClosed):  # failed meanwhile: the reader sees it and ends
            await self.ws.start_close()
        return True

    async def watch(self, stopping: trio.Event) -> None:
        await stopping.wait()
        self.stopping = True
        if not await self.close():
            self.life.cancel()  # connecting or backing off: nothing to drain

    async def replace_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        if not self.stopping:
            self.planned = True
            await self.close()


class _Reconnect(Exception):
    """The venue asked us to reconnect (e.g. OKX notice 64008)."""


class _Emitter:
    """Hands items on without ever waiting, tracking drops per symbol."""

    def __init__(self, out: trio.MemorySendChannel, exchange: str, stats: StreamStats) -> None:
        self.out = out
        self.exchange = exchange
        self.stats = stats
        self.dropped: dict[str, int] = {}

    def emit(self, symbol: str, item: object) -> bool:
        """Hand `item` on; False when it was dropped (the channel is full)."""
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
                return False
            self.dropped[symbol] = 0
        try:
            self.out.send_nowait(item)
        except trio.WouldBlock:
            self._drop(symbol)
            return False
        return True

    async def flush_drops(self, timeout: float) -> None:
        """At the stop: no next diff will carry the drop markers still owed, so send them
        as `final` ones (recorded as gaps at once), waiting for room at most `timeout`."""
        with trio.move_on_after(timeout):
            for symbol, n in list(self.dropped.items()):
                if not n:
                    continue
                await self.out.send(
                    StreamEvent(
                        self.exchange,
                        MARKET_FUTURES,
                        symbol,
                        GapKind.CONSUMER_OVERLOAD,
                        time.time_ns(),
                        reason=f"normalizer channel full; dropped {n} messages before the stop",
                        dropped=n,
                        final=True,
                    )
                )
                self.dropped[symbol] = 0
        for symbol, n in self.dropped.items():
            if n:
                log.error(
                    "%s/%s: %d diffs dropped before the stop are not recorded as a gap "
                    "(no room in the normalizer channel)",
                    self.exchange,
                    symbol,
                    n,
                )

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
    resync: ResyncQueue | None = None,
    fallback: Callable[[str], None] | None = None,
    raw_sink: Callable[[str, str | bytes, int], None] | None = None,
    stopping: trio.Event | None = None,
    drain_timeout: float = 2.0,
    label: str | None = None,
) -> None:
    """Keep one connection for `venue_symbols` alive, feeding `out`, until `stopping`
    (then drain the open connection, see the module docstring) or cancellation.

    `label` names the connection in its log lines (`binance/eip2`: which shard, hence
    which source IP); default the venue.

    `raw_sink(symbol, frame, recv_ns)` (raw capture, off = None) gets every frame that
    parsed to diffs, with the receive time the diffs carry.

    `resync` (normalized symbols) is served by `venue.resubscribe` on the live
    connection; `fallback(symbol)` asks for a REST snapshot when none came in-stream."""
    stats = stats if stats is not None else StreamStats()
    async with out:
        emitter = _Emitter(out, venue.exchange, stats)
        with trio.CancelScope() as life:
            closer = _Closer(life, drain_timeout)
            async with trio.open_nursery() as nursery:
                if stopping is not None:
                    nursery.start_soon(closer.watch, stopping)
                await _connect_loop(
                    venue,
                    venue_symbols,
                    symbol_of,
                    emitter,
                    stats,
                    closer,
                    source_ip=source_ip,
                    reconnect_after=reconnect_after,
                    stall_timeout=stall_timeout,
                    backoff_initial=backoff_initial,
                    backoff_max=backoff_max,
                    rng=rng or random.Random(),
                    resync=resync,
                    fallback=fallback,
                    raw_sink=raw_sink,
                    label=label or venue.exchange,
                )
                nursery.cancel_scope.cancel()  # the stop watcher
        if closer.stopping:
            await emitter.flush_drops(drain_timeout)


async def _connect_loop(
    venue: VenueStream,
    venue_symbols: Sequence[str],
    symbol_of: dict[str, str],
    emitter: _Emitter,
    stats: StreamStats,
    closer: _Closer,
    *,
    source_ip: str | None,
    reconnect_after: float,
    stall_timeout: float,
    backoff_initial: float,
    backoff_max: float,
    rng: random.Random,
    resync: ResyncQueue | None,
    fallback: Callable[[str], None] | None,
    raw_sink: Callable[[str, str | bytes, int], None] | None,
    label: str,
) -> None:
    """Connect, pump, reconnect (back-off on failures) until a stop closes a connection."""
    symbols = [symbol_of.get(s, s) for s in venue_symbols]
    failures = 0
    if stats.connects:  # restarted by `supervised` after an error this loop did not expect
        stats.last_error = "the stream task restarted after an error"
    while not closer.stopping:
        delay = 0.0
        opened: float | None = None
        with trio.CancelScope() as scope:  # the connection's life; a drain sets a deadline
            try:
                url = await venue.url(list(venue_symbols))
                async with open_ws(url, source_ip=source_ip) as ws:
                    closer.attach(ws, scope)
                    await venue.on_open(ws, list(venue_symbols))
                    opened = trio.current_time()
                    conn = _conn_state(venue, symbols, opened, label)
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
                        label,
                        len(venue_symbols),
                        f" from {source_ip}" if source_ip else "",
                    )
                    await _pump(
                        ws,
                        venue,
                        emitter,
                        stats,
                        stall_timeout,
                        closer,
                        reconnect_after,
                        conn=conn,
                        resync=resync,
                        fallback=fallback,
                        venue_of={s: v for v, s in zip(venue_symbols, symbols, strict=True)},
                        raw_sink=raw_sink,
                    )
            except* (
                OSError,
                trio.TooSlowError,
                ExchangeError,
                _Reconnect,
            ) as group:
                # except*: these arrive wrapped in the ExceptionGroups of the nurseries
                # in open_ws and _pump (a plain except never saw them)
                exc = _first_leaf(group)
                if closer.stopping or closer.planned:
                    why = "the stop" if closer.stopping else "a planned reconnect"
                    log.info("%s: stream closed for %s (%s)", label, why, exc)
                else:
                    stats.disconnects += 1
                    stats.last_error = f"{type(exc).__name__}: {exc}"
                    if opened is not None and trio.current_time() - opened >= backoff_max:
                        failures = 0  # it was healthy: this loss is a first one again
                    failures += 1
                    delay = backoff_delay(
                        failures, initial=backoff_initial, maximum=backoff_max, rng=rng
                    )
                    log.warning(
                        "%s: stream lost (%s); reconnecting in %.1fs",
                        label,
                        stats.last_error,
                        delay,
                    )
        if scope.cancelled_caught:  # only a drain sets this scope a deadline
            log.warning(
                "%s: no close answer within %gs of our close frame; frames after it are not read",
                label,
                closer.timeout,
            )
        if closer.planned:
            stats.last_error = "planned reconnect"
            failures = 0
        closer.attach(None)
        if delay:
            await trio.sleep(delay)


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _pump(
    ws: WsConnection,
    venue: VenueStream,
    emitter: _Emitter,
    stats: StreamStats,
    stall_timeout: float,
    closer: _Closer,
    reconnect_after: float,
    *,
    conn: _ConnState,
    resync: ResyncQueue | None = None,
    fallback: Callable[[str], None] | None = None,
    venue_of: dict[str, str] | None = None,
    raw_sink: Callable[[str, str | bytes, int], None] | None = None,
) -> None:
    """Read the connection until it ends (an exception: a failure, or the venue's answer
    to our close frame)."""
    async with trio.open_nursery() as nursery:
        side = trio.CancelScope()  # keepalive and resubscribes: they end first on a close
        closer.attach(ws, side=side)
        nursery.start_soon(_side_tasks, side, ws, venue, conn, resync, venue_of or {}, fallback)
        nursery.start_soon(closer.replace_after, reconnect_after)
        # Stall watch: one cancel scope for the whole loop, its deadline moved forward as
        # frames arrive, instead of a `fail_after` scope per frame (entering and closing
        # one per frame was ~6 s of a 60 s profiled soak at ~1,400 frames/s). The
        # deadline moves only when it is `slack` old, so a stall fires between
        # `stall_timeout` and `stall_timeout + slack` after the last data (never early).
        slack = stall_timeout / 8
        with trio.CancelScope() as stall:
            moved = trio.current_time()
            stall.deadline = moved + stall_timeout + slack
            while True:
                burst = await ws.receive_burst()
                data = False
                for raw in burst:
                    data |= _handle_frame(raw, venue, emitter, stats, conn, raw_sink)
                # only book data: a venue that still answers our pings while the
                # subscription has gone silent is stalled too
                if data:
                    now = trio.current_time()
                    if now - moved > slack:
                        moved = now
                        stall.deadline = now + stall_timeout + slack
        if stall.cancelled_caught:
            raise trio.TooSlowError(f"no book data for {stall_timeout:g}s (stalled)")


async def _side_tasks(
    side: trio.CancelScope,
    ws: WsConnection,
    venue: VenueStream,
    conn: _ConnState,
    resync: ResyncQueue | None,
    venue_of: dict[str, str],
    fallback: Callable[[str], None] | None,
) -> None:
    """The tasks that send on a connection, in one scope: a graceful close cancels them
    before it sends the close frame (nothing may follow it)."""
    with side:
        async with trio.open_nursery() as nursery:
            if venue.keepalive_interval:
                nursery.start_soon(_keepalive, ws, venue)
            if resync is not None and can_resubscribe(venue):
                nursery.start_soon(
                    _serve_resubscribe, ws, venue, resync, conn, venue_of, fallback, nursery
                )


def _handle_frame(
    raw: str | bytes,
    venue: VenueStream,
    emitter: _Emitter,
    stats: StreamStats,
    conn: _ConnState,
    raw_sink: Callable[[str, str | bytes, int], None] | None,
) -> bool:
    """Parse one frame and hand its diffs on (no awaits: never blocks the socket).
    True if it carried book data (what the stall watch counts: pongs do not)."""
    stats.frames += 1
    recv_ns = time.time_ns()
    try:
        item = venue.parse(raw, recv_ns)
    except MalformedMessage as exc:
        stats.malformed += 1
        log.warning("%s: malformed frame skipped: %s", conn.label, exc)
        return False
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        # a frame of a shape the parser did not foresee: skipped like a malformed one,
        # not a crash that drops the connection (and every other symbol's stream)
        stats.malformed += 1
        log.warning(
            "%s: malformed frame skipped (%s: %s): %.200r",
            conn.label,
            type(exc).__name__,
            exc,
            raw,
        )
        return False
    if isinstance(item, Control):
        if item.kind == "error":
            log.warning("%s: venue error frame: %s", conn.label, item.detail)
        if item.reconnect:
            raise _Reconnect(item.detail or item.kind)
        return False
    for diff in item:
        if diff.symbol not in conn.symbols:
            _unsubscribed(conn.label, diff.symbol, stats)
            return False
    if raw_sink is not None and item:
        raw_sink(item[0].symbol, raw, recv_ns)
    for diff in item:
        stats.diffs += 1
        # a snapshot dropped for a full channel did not arrive: the watch must still
        # fall back to REST for it (counted as arrived, the book waited unanchored)
        if emitter.emit(diff.symbol, diff) and diff.is_snapshot:
            conn.snapshot_at[diff.symbol] = trio.current_time()
    return bool(item)


def _unsubscribed(exchange: str, symbol: str, stats: StreamStats) -> None:
    """A frame for a symbol this connection did not subscribe is skipped like a malformed
    one. The parsers keep a symbol missing from the table as sent (so replays of other
    recordings parse), and that name, from the wire, would become a partition path: a
    Bybit `data.s` of "../../x" was written outside the spool (audit 8)."""
    stats.malformed += 1
    log.warning(
        "%s: malformed frame skipped: a diff for %.80r, not subscribed on this connection",
        exchange,
        symbol,
    )


async def _serve_resubscribe(
    ws: WsConnection,
    venue: VenueStream,
    queue: ResyncQueue,
    conn: _ConnState,
    venue_of: dict[str, str],
    fallback: Callable[[str], None] | None,
    nursery: trio.Nursery,
) -> None:
    """Serve resync requests on this connection: resubscribe the symbols asked for at the
    same moment together, within the venue's subscribe-request cap, then watch for their
    snapshots."""
    timeout = getattr(venue, "snapshot_timeout", None) or DEFAULT_SNAPSHOT_TIMEOUT
    while True:
        asked = []
        for symbol in await queue.next_batch():
            if symbol in venue_of:
                asked.append(symbol)
            else:
                log.warning("%s/%s: resync for a symbol not on this socket", conn.label, symbol)
        now = trio.current_time()
        due = [s for s in asked if not _snapshot_on_its_way(conn, s, now, timeout)]
        if due and not await _resubscribe(ws, venue, conn, due, venue_of, fallback):
            asked = [s for s in asked if s not in due]  # gone to REST: nothing to watch
        if fallback is not None:
            for symbol in asked:
                if symbol not in conn.watching:
                    conn.watching.add(symbol)
                    nursery.start_soon(_watch_snapshot, venue, symbol, conn, timeout, fallback)


def _snapshot_on_its_way(conn: _ConnState, symbol: str, now: float, timeout: float) -> bool:
    """Subscribed less than `timeout` ago and no snapshot since: asking again is moot."""
    since = conn.subscribed_at.get(symbol, -math.inf)
    return now - since < timeout and conn.snapshot_at.get(symbol, -math.inf) < since


async def _resubscribe(
    ws: WsConnection,
    venue: VenueStream,
    conn: _ConnState,
    symbols: list[str],
    venue_of: dict[str, str],
    fallback: Callable[[str], None] | None,
) -> bool:
    """Resubscribe `symbols` in as few requests as the venue allows; False (and each sent
    to `fallback`) when that would pass the connection's cap on subscribe requests."""
    needed = 2 * _requests_for(venue, len(symbols))  # unsubscribe + subscribe
    cap = conn.requests
    if cap is not None and cap.room() < needed:
        _refuse_over_cap(venue, conn, cap, symbols, fallback)
        return False
    if conn.capped:
        log.info("%s: room for subscribe requests again on this connection", conn.label)
        conn.capped = False
    log.info("%s: resubscribing %s for fresh snapshots", conn.label, ", ".join(symbols))
    if cap is not None:
        cap.note(needed)  # counted as sent even if the connection fails halfway
    await venue.resubscribe(ws, [venue_of[s] for s in symbols])  # type: ignore[attr-defined]
    now = trio.current_time()
    for symbol in symbols:
        conn.subscribed_at[symbol] = now
    return True


def _refuse_over_cap(
    venue: VenueStream,
    conn: _ConnState,
    cap: RequestCap,
    symbols: list[str],
    fallback: Callable[[str], None] | None,
) -> None:
    """Not sent: the venue would refuse (or cut) past its cap. REST snapshots instead, or,
    without that path, a new connection (its count starts from zero)."""
    what = (
        f"{conn.label}: {cap.used()} subscribe requests sent on this connection in the "
        f"last hour (venue cap {cap.limit}/h, {cap.usable} used at most)"
    )
    if fallback is None:
        raise _Reconnect(f"{what}: reconnecting for a fresh count")
    (log.info if conn.capped else log.warning)(
        "%s: resync of %s by REST snapshot instead of a resubscribe",
        what,
        ", ".join(symbols),
    )
    conn.capped = True
    for symbol in symbols:
        fallback(symbol)


async def _watch_snapshot(
    venue: VenueStream,
    symbol: str,
    conn: _ConnState,
    timeout: float,
    fallback: Callable[[str], None],
) -> None:
    """Fall back to a REST snapshot when no in-stream snapshot came within `timeout` of
    the symbol's latest subscribe. A subscribe sent while watching (the book broke again
    soon after a snapshot) is watched in turn: checked against the older one, its
    snapshot looked present and the new subscribe went unwatched."""
    try:
        while True:
            since = conn.subscribed_at.get(symbol, trio.current_time())
            await trio.sleep_until(since + timeout)
            if conn.subscribed_at.get(symbol, since) == since:
                break
        if conn.snapshot_at.get(symbol, -math.inf) < since:
            log.warning(
                "%s/%s: no in-stream snapshot %.0fs after subscribing; using a REST snapshot",
                conn.label or venue.exchange,
                symbol,
                timeout,
            )
            fallback(symbol)
    finally:
        conn.watching.discard(symbol)


async def _keepalive(ws: WsConnection, venue: VenueStream) -> None:
    assert venue.keepalive_interval
    while True:
        await trio.sleep(venue.keepalive_interval)
        await venue.keepalive(ws)
