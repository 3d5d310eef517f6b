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
from zero again once a connection has lasted `backoff_max`.

Planned reconnect with overlap (hand-over): a healthy connection is replaced after
`reconnect_after` (before the venues' 24 h cut) the way the venues advise, by opening the
next connection *before* the current one closes. The next one subscribes and its frames
are kept back (`_ConnState.held`) until, for every symbol, the current one has handed on
at least up to the next one's first diff (at most `HANDOVER_READY_TIMEOUT`): from there
the two overlap. Only then is the current one closed the graceful way below, so it
hands on everything up to the venue's close answer. The connect loop then takes the
next connection over: a RECONNECT marker per symbol, then its kept-back frames and its
first live ones without the diffs the old connection already handed on (ids up to the
last one handed on per symbol, `_ConnState.skip`; the skip ends after that very id, at a
newer one, where the connection's own ids go back (a venue restart), or after
`HANDOVER_SKIP_FOR`). A venue sends every subscriber the same events, so the first diff
kept continues the chain: no gap, no resync, no second in-stream snapshot (one newer than
what the old connection handed on is kept, and its gap recorded). If the next connection
fails or stays silent, the current one is kept (WARNING) and the hand-over tried again
`backoff_max` later. If the current one is lost while the next one is open, the next
one takes over at once (no back-off), with its gap, if any, named after that loss; the
venue's own cut before a hand-over began is an ordinary reconnect. A venue whose ids two
connections cannot compare (`can_hand_over` False: OKX frames without seqId get
synthetic ids per connection) closes first and reconnects, as before.

Resyncs a connection left unanswered (resubscribed, or watched, with no snapshot yet when
it ended, planned or not) are asked for again on the next one: their watches ended with
it, and a venue that sends no snapshot on subscribe would never have healed the book.

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
the store. A runner that is connecting or backing off when the stop comes ends at once.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from typing import Protocol

import attrs
import trio

from cryptoflow.errors import ExchangeError, MalformedMessage
from cryptoflow.exchanges.base import Control, WsItem
from cryptoflow.models import MARKET_FUTURES, DepthDiff, GapKind, StreamEvent
from cryptoflow.net.ratelimit import RequestCap
from cryptoflow.net.ws import WsClosed, WsConnection, open_ws
from cryptoflow.pipeline.resync import ResyncQueue
from cryptoflow.pipeline.supervise import backoff_delay, retry_delay

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

#: hand-over (planned reconnect): how long the next connection may take to carry data for
#: every symbol before the current one is closed anyway; how many of its frames are kept
#: back meanwhile (past it the switch is made at once); how long after the switch its
#: diffs are checked against what the old connection handed on
HANDOVER_READY_TIMEOUT = 10.0
HANDOVER_MAX_HELD = 50_000
HANDOVER_SKIP_FOR = 5.0


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
    opened: float = 0.0  # trio clock: when it subscribed
    pinged_at: float = 0.0  # trio clock: its last keepalive (or its opening)
    #: the next connection during a hand-over: its frames, kept back (frame, receive ns,
    #: diffs) until the current connection has ended
    held: list[tuple[str | bytes, int, list[DepthDiff]]] | None = None
    #: after a hand-over: per symbol, the last id the old connection handed on; this
    #: connection's diffs up to it are dropped (until its first newer one, or `skip_until`)
    skip: dict[str, int] = attrs.field(factory=dict)
    skip_until: float = math.inf
    skip_seen: dict[str, int] = attrs.field(factory=dict)  # this connection's ids meanwhile


def _conn_state(venue: VenueStream, symbols: list[str], now: float, label: str = "") -> _ConnState:
    """A new connection's bookkeeping: every symbol was just subscribed, and the requests
    `on_open` sent count against the venue's cap, if it has one."""
    conn = _ConnState(
        frozenset(symbols),
        subscribed_at=dict.fromkeys(symbols, now),
        label=label or venue.exchange,
        opened=now,
        pinged_at=now,
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
    #: diffs a hand-over's next connection repeated (the old one had handed them on)
    repeated: int = 0
    handovers: int = 0  # connections taken over from a hand-over
    handover_failures: int = 0  # hand-over attempts given up (the old connection kept)
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


class _Reconnect(Exception):
    """The venue asked us to reconnect (e.g. OKX notice 64008)."""


class _Emitter:
    """Hands items on without ever waiting, tracking drops per symbol."""

    def __init__(self, out: trio.MemorySendChannel, exchange: str, stats: StreamStats) -> None:
        self.out = out
        self.exchange = exchange
        self.stats = stats
        self.dropped: dict[str, int] = {}
        #: per symbol, the `last_update_id` of the last diff handed on (by any connection)
        self.last_ids: dict[str, int] = {}

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
                reason="normalizer channel full",  # the count: `dropped` (markers add up)
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
                        reason="normalizer channel full",
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
    """Connect, pump, reconnect (back-off on failures; a planned reconnect hands over to
    a connection opened beforehand) until a stop closes a connection."""
    symbols = [symbol_of.get(s, s) for s in venue_symbols]
    venue_of = {s: v for v, s in zip(venue_symbols, symbols, strict=True)}
    failures = 0
    #: why the last connection ended: the next one's RECONNECT markers say it. Not
    #: `stats.last_error`: a failed attempt in between (a KuCoin token request's 503)
    #: did not break the stream, the end of the connection before it did
    ended = ""
    if stats.connects:  # restarted by `supervised` after an error this loop did not expect
        stats.last_error = ended = "the stream task restarted after an error"

    async def open_link() -> _Link:
        return await _open_link(venue, venue_symbols, symbols, source_ip, label)

    taken: _Link | None = None  # the next connection of a hand-over, already open
    last: _ConnState | None = None  # the connection before, for its unanswered resyncs
    while not closer.stopping:
        delay = 0.0
        opened: float | None = None
        lost: str | None = None  # why this connection (or attempt) failed, if it did
        lost_by: BaseException | None = None  # and the error that said so
        link, taken = taken, None
        handover = _Handover(
            open_link, closer, venue, emitter, stats, raw_sink, label, retry=backoff_max
        )
        try:
            async with trio.open_nursery() as around:  # the hand-over outlives the connection
                with trio.CancelScope() as scope:  # the connection's life; a drain sets a deadline
                    try:
                        handed_over = link is not None
                        if link is None:
                            link = await open_link()
                        closer.attach(link.ws, scope)
                        opened = trio.current_time()
                        stats.connects += 1
                        if handed_over:
                            _take_over(link, venue, emitter, stats, raw_sink, ended)
                        elif stats.connects > 1:
                            _mark_reconnect(venue.exchange, symbols, emitter, ended)
                        if last is not None and resync is not None:
                            # their watches ended with the old connection: asked again
                            # here, or a book broken just before it ended never heals
                            for symbol in _awaiting_snapshot(last):
                                resync.request(symbol)
                            last = None
                        log.info(
                            "%s: connected (%d streams)%s%s",
                            label,
                            len(venue_symbols),
                            f" from {source_ip}" if source_ip else "",
                            " (hand-over)" if handed_over else "",
                        )
                        around.start_soon(handover.run, reconnect_after)
                        await _pump(
                            link.ws,
                            venue,
                            emitter,
                            stats,
                            stall_timeout,
                            closer,
                            conn=link.conn,
                            resync=resync,
                            fallback=fallback,
                            venue_of=venue_of,
                            raw_sink=raw_sink,
                        )
                    except* (
                        OSError,
                        trio.TooSlowError,
                        ExchangeError,
                        _Reconnect,
                    ) as group:
                        # except*: these arrive wrapped in the ExceptionGroups of the
                        # nursery in _pump (a plain except never saw them)
                        exc = _first_leaf(group)
                        if closer.stopping or closer.planned:
                            why = "the stop" if closer.stopping else "a planned reconnect"
                            log.info("%s: stream closed for %s (%s)", label, why, exc)
                        else:
                            lost = stats.last_error = f"{type(exc).__name__}: {exc}"
                            lost_by = exc
                            stats.disconnects += 1
                            if opened is not None:  # a connection ended, not an attempt
                                ended = stats.last_error
                    finally:
                        if link is not None:
                            last = link.conn
                            await link.aclose()
                if scope.cancelled_caught:  # only a drain sets this scope a deadline
                    log.warning(
                        "%s: no close answer within %gs of our close frame; frames after it "
                        "are not read",
                        label,
                        closer.timeout,
                    )
                if not closer.stopping and (closer.planned or handover.link is not None):
                    taken = await handover.take()
                around.cancel_scope.cancel()  # a hand-over that did not come to its switch
        finally:
            if handover.link is not None:  # opened, not taken: the stop, or a failure
                await handover.link.aclose()
        if lost is not None and taken is not None:
            log.warning(
                "%s: stream lost (%s); the next connection, open for a hand-over, takes over",
                label,
                lost,
            )
        elif lost is not None:
            if opened is not None and trio.current_time() - opened >= backoff_max:
                failures = 0  # it was healthy: this loss is a first one again
            failures += 1
            backoff = backoff_delay(failures, initial=backoff_initial, maximum=backoff_max, rng=rng)
            # a connect that needs a REST call (a KuCoin token) refused by a throttle:
            # the budget holds that call for the venue's wait anyway; say that wait
            delay = retry_delay(lost_by, backoff)
            log.warning("%s: stream lost (%s); reconnecting in %.1fs", label, lost, delay)
        elif closer.planned:
            stats.last_error = ended = "planned reconnect"
            failures = 0
        closer.attach(None)
        if delay:  # never with a next connection taken: it is not left open meanwhile
            await trio.sleep(delay)
    if taken is not None:  # the stop came just as a hand-over switched
        await taken.aclose()


def _mark_reconnect(exchange: str, symbols: list[str], emitter: _Emitter, why: str) -> None:
    """A RECONNECT marker per symbol ahead of a new connection's first diff: it becomes a
    gap only if that diff does not continue what was handed on (`BookSync.on_event`)."""
    for sym in symbols:
        emitter.emit(
            sym,
            StreamEvent(
                exchange,
                MARKET_FUTURES,
                sym,
                GapKind.RECONNECT,
                time.time_ns(),
                reason=why or "planned reconnect",
            ),
        )


@attrs.define
class _Link:
    """An open connection and what closes it. Opened by one task, it may be read and
    closed by another: a hand-over's next connection is opened beside the current one
    and taken over by the connect loop, so it cannot live in an `async with` block."""

    ws: WsConnection
    conn: _ConnState
    stack: AsyncExitStack

    async def aclose(self) -> None:
        await self.stack.aclose()  # `open_ws`'s exit: bounded, shielded when cancelled


async def _open_link(
    venue: VenueStream,
    venue_symbols: Sequence[str],
    symbols: list[str],
    source_ip: str | None,
    label: str,
) -> _Link:
    """Connect (the venue's URL), upgrade and subscribe; no faster than the venue takes
    new connections from one IP, where it says (`connect_pacer`, OKX)."""
    pacer = getattr(venue, "connect_pacer", None)
    if pacer is not None:
        await pacer.wait()
    url = await venue.url(list(venue_symbols))
    stack = AsyncExitStack()
    try:
        ws = await stack.enter_async_context(open_ws(url, source_ip=source_ip))
        await venue.on_open(ws, list(venue_symbols))
    except BaseException:
        await stack.aclose()
        raise
    return _Link(ws, _conn_state(venue, symbols, trio.current_time(), label), stack)


#: what ends a connection without being a bug (the connect loop's `except*` list)
_LINK_ERRORS = (OSError, trio.TooSlowError, ExchangeError)


@attrs.define
class _Handover:
    """A planned reconnect with overlap (see the module docstring): after `run`'s wait,
    open the next connection and read it, its frames kept back, until the two overlap;
    then close the current one (planned) and keep reading until the connect loop `take`s
    the next one over."""

    open_link: Callable[[], Awaitable[_Link]]
    closer: _Closer
    venue: VenueStream
    emitter: _Emitter
    stats: StreamStats
    raw_sink: Callable[[str, str | bytes, int], None] | None
    label: str
    retry: float = 60.0
    link: _Link | None = None  # the next connection, from its opening until taken
    #: per symbol, the id handed on when the next connection opened: one handed on later
    #: that is lower means the venue restarted its ids meanwhile (`_restarted`)
    start_ids: dict[str, int] = attrs.field(factory=dict)
    _taken: bool = False  # `take` was called: the connect loop has moved on
    _readying: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _reading: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _done: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, after: float) -> None:
        try:
            await trio.sleep(after)
            if not getattr(self.venue, "can_hand_over", True):
                # ids the two connections cannot compare (OKX frames without seqId get
                # per-connection ones): close first, then a new connection, as before
                self.closer.planned = True
                await self.closer.close()
                return
            while not await self._open_ready():
                if self._taken:
                    return
                await trio.sleep(self.retry)
            if self._taken:  # the current connection ended while the next one readied
                return
            self.closer.planned = True
            await self.closer.close()  # the loop takes the next one once this one drained
            assert self.link is not None
            with self._reading:
                try:
                    await self._read(self.link, until_ready=False)
                except (*_LINK_ERRORS, _Reconnect) as exc:
                    await self._give_up(
                        f"the next connection failed during the hand-over "
                        f"({type(exc).__name__}: {exc}); reconnecting afresh"
                    )
        finally:
            self._done.set()

    async def take(self) -> _Link | None:
        """Stop reading the next connection and hand it over (None if it failed). Also
        when the current connection was lost while the next one readied: it is open and
        subscribed, and its kept-back frames are what the lost one did not hand on."""
        self._taken = True
        self._readying.cancel()
        self._reading.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await self._done.wait()
        if self.link is not None and self._restarted():
            await self._give_up(
                "the venue restarted its ids during the hand-over; the next connection's "
                "kept-back frames cannot be matched: reconnecting afresh"
            )
        link, self.link = self.link, None
        return link

    async def _give_up(self, what: str) -> None:
        """An attempt given up: counted, said at WARNING, its next connection closed."""
        self.stats.handover_failures += 1
        log.warning("%s: %s", self.label, what)
        link, self.link = self.link, None
        if link is not None:
            await link.aclose()

    def _restarted(self) -> bool:
        last_ids = self.emitter.last_ids
        return any(last_ids.get(s, i) < i for s, i in self.start_ids.items())

    async def _open_ready(self) -> bool:
        """Open the next connection and read it until it overlaps the current one (or
        `HANDOVER_READY_TIMEOUT`); False, logged and closed, when it fails or carries
        nothing at all (the current connection is kept)."""
        try:
            self.link = link = await self.open_link()
            link.conn.held = []
            handed_on = self.emitter.last_ids
            self.start_ids = {s: handed_on[s] for s in link.conn.symbols if s in handed_on}
            self._readying = trio.CancelScope()  # one per attempt; `take` cancels it
            if self._taken:
                self._readying.cancel()
            with trio.move_on_after(HANDOVER_READY_TIMEOUT), self._readying:
                await self._read(link, until_ready=True)
            if self._taken:
                return True
            if not link.conn.held:
                raise trio.TooSlowError(f"no book data within {HANDOVER_READY_TIMEOUT:g}s")
            return True
        except (*_LINK_ERRORS, _Reconnect) as exc:
            await self._give_up(
                f"planned reconnect: the next connection failed ({type(exc).__name__}: "
                f"{exc}); keeping this one, trying again in {self.retry:g}s"
            )
            return False

    async def _read(self, link: _Link, until_ready: bool) -> None:
        """Keep the next connection's frames back (and ping it on the venue's interval).
        With `until_ready`, return once the current connection has handed on, for every
        symbol, at least up to the next one's first diff (its snapshot, say): from there
        on the two overlap, so the switch loses nothing. Past `HANDOVER_MAX_HELD` frames:
        return at once (when readying: switch now), else stop reading until taken (the
        socket holds them). A venue restarting its ids meanwhile fails the attempt."""
        conn, held = link.conn, link.conn.held
        assert held is not None
        first: dict[str, int] = {}  # per symbol, the id of the next connection's first diff
        waiting = set(conn.symbols)
        handed_on = self.emitter.last_ids
        interval = self.venue.keepalive_interval
        while True:
            if interval and trio.current_time() >= conn.pinged_at + interval:
                await _ping(link.ws, self.venue, conn)
            seen = len(held)
            burst: list[str | bytes] = []
            with trio.move_on_at(conn.pinged_at + interval if interval else math.inf):
                burst = await link.ws.receive_burst()
            for raw in burst:
                _handle_frame(raw, self.venue, self.emitter, self.stats, conn, self.raw_sink)
            if until_ready:
                if self._restarted():
                    raise _Reconnect("the venue restarted its ids meanwhile")
                for _raw, _ns, item in held[seen:]:
                    for diff in item:
                        first.setdefault(diff.symbol, diff.last_update_id)
                waiting = {
                    s for s in waiting if s not in first or handed_on.get(s, -math.inf) < first[s]
                }
                if not waiting:
                    return
            if len(held) > HANDOVER_MAX_HELD:
                if until_ready:
                    return
                while True:  # read no more (the socket holds the rest); only keep it alive
                    if not interval:
                        await trio.sleep_forever()
                    await trio.sleep_until(conn.pinged_at + interval)
                    await _ping(link.ws, self.venue, conn)


def _take_over(
    link: _Link,
    venue: VenueStream,
    emitter: _Emitter,
    stats: StreamStats,
    raw_sink: Callable[[str, str | bytes, int], None] | None,
    why: str,
) -> None:
    """The switch to a hand-over's next connection: a RECONNECT marker per symbol, then
    its kept-back frames without what the old connection handed on already (and its
    first live ones, for `HANDOVER_SKIP_FOR`)."""
    conn = link.conn
    held, conn.held = conn.held or [], None
    last_ids = emitter.last_ids
    conn.skip = {s: last_ids[s] for s in conn.symbols if s in last_ids}
    conn.skip_until = trio.current_time() + HANDOVER_SKIP_FOR
    _mark_reconnect(venue.exchange, sorted(conn.symbols), emitter, why)
    repeated, stats.handovers = stats.repeated, stats.handovers + 1
    now = trio.current_time()
    for raw, recv_ns, item in held:
        for diff in item:
            if diff.is_snapshot:  # it came, dropped or not: a resync must resubscribe
                conn.snapshot_at[diff.symbol] = now
        _hand_on(raw, recv_ns, item, emitter, stats, conn, raw_sink)
    log.info(
        "%s: hand-over: %d frames kept back while the old connection drained, %d diffs "
        "it had already handed on dropped",
        conn.label,
        len(held),
        stats.repeated - repeated,
    )


def _awaiting_snapshot(conn: _ConnState) -> set[str]:
    """Symbols resubscribed on `conn` (after its opening) whose snapshot has not come, or
    watched for one: what a resync asked of it that it never answered."""
    asked = set(conn.watching) | {s for s, at in conn.subscribed_at.items() if at > conn.opened}
    return {
        s
        for s in asked
        if conn.snapshot_at.get(s, -math.inf) < conn.subscribed_at.get(s, -math.inf)
    }


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
                nursery.start_soon(_keepalive, ws, venue, conn)
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
    if not item:
        return False
    for diff in item:
        if diff.symbol not in conn.symbols:
            _unsubscribed(conn.label, diff.symbol, stats)
            return False
    if conn.held is not None:  # a hand-over's next connection: kept back until the switch
        conn.held.append((raw, recv_ns, item))
        return True
    _hand_on(raw, recv_ns, item, emitter, stats, conn, raw_sink)
    return True


def _hand_on(
    raw: str | bytes,
    recv_ns: int,
    item: list[DepthDiff],
    emitter: _Emitter,
    stats: StreamStats,
    conn: _ConnState,
    raw_sink: Callable[[str, str | bytes, int], None] | None,
) -> None:
    """Hand one frame's diffs on (and to raw capture)."""
    if conn.skip:
        item = _not_handed_on(item, conn, stats)
        if not item:
            return
    if raw_sink is not None:
        raw_sink(item[0].symbol, raw, recv_ns)
    last_ids = emitter.last_ids
    for diff in item:
        stats.diffs += 1
        if emitter.emit(diff.symbol, diff):
            last_ids[diff.symbol] = diff.last_update_id
            # a snapshot dropped for a full channel did not arrive: the watch must still
            # fall back to REST for it (counted as arrived, the book waited unanchored)
            if diff.is_snapshot:
                conn.snapshot_at[diff.symbol] = trio.current_time()


def _not_handed_on(item: list[DepthDiff], conn: _ConnState, stats: StreamStats) -> list[DepthDiff]:
    """After a hand-over: without the diffs the old connection handed on already (ids up
    to its last one per symbol). A symbol's check ends after the diff with that very id,
    at its first newer one, or where this connection's own ids go back (the venue
    restarted them: Bybit `u` 1, OKX after maintenance; those diffs are new, however low
    their ids), and every symbol's `HANDOVER_SKIP_FOR` after the switch (a restart this
    connection began with shows no step back: its chain break is then the reconnect's
    recorded gap, not a loss for good)."""
    skip = conn.skip
    if trio.current_time() > conn.skip_until:
        skip.clear()
        return item
    seen = conn.skip_seen
    kept = []
    for diff in item:
        symbol, last_id = diff.symbol, diff.last_update_id
        last = skip.get(symbol)
        if last is not None:
            restarted = last_id < seen.get(symbol, -math.inf)
            if not restarted and last_id <= last:
                seen[symbol] = last_id
                stats.repeated += 1
                if last_id == last:  # the old connection's last one: what follows is new
                    del skip[symbol]
                continue
            del skip[symbol]
        kept.append(diff)
    return kept


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
    now = trio.current_time()
    for symbol in symbols:  # before the send: a hand-over cutting it short asks again
        conn.subscribed_at[symbol] = now
    await venue.resubscribe(ws, [venue_of[s] for s in symbols])  # type: ignore[attr-defined]
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
    snapshot looked present and the new subscribe went unwatched.

    A watch cut short with its connection leaves the symbol in `conn.watching`: the next
    connection asks for it again (`_awaiting_snapshot`)."""
    while True:
        since = conn.subscribed_at.get(symbol, trio.current_time())
        await trio.sleep_until(since + timeout)
        if conn.subscribed_at.get(symbol, since) == since:
            break
    conn.watching.discard(symbol)
    if conn.snapshot_at.get(symbol, -math.inf) < since:
        log.warning(
            "%s/%s: no in-stream snapshot %.0fs after subscribing; using a REST snapshot",
            conn.label or venue.exchange,
            symbol,
            timeout,
        )
        fallback(symbol)


async def _keepalive(ws: WsConnection, venue: VenueStream, conn: _ConnState) -> None:
    """Every `keepalive_interval` from the connection's last ping: a connection taken over
    from a hand-over was pinged while it was kept back (KuCoin closes one unpinged for
    its pingInterval + pingTimeout, 28 s)."""
    interval = venue.keepalive_interval
    assert interval
    while True:
        await trio.sleep_until(conn.pinged_at + interval)
        await _ping(ws, venue, conn)


async def _ping(ws: WsConnection, venue: VenueStream, conn: _ConnState) -> None:
    await venue.keepalive(ws)
    conn.pinged_at = trio.current_time()
