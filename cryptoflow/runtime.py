"""Composition root: the one place that wires readers, normalizers and the writer.

```
root nursery
├── signal watcher: 1st SIGINT/SIGTERM -> stop readers; 2nd -> cancel everything
├── simulator (only with --simulate; the store is then --output only, see
│   `storage.factory.simulated_storage`)
├── writer (one per process: buffers per dataset/exchange/symbol, spool, uploaders)
└── exchange nursery (one per venue)
    └── shard nursery (one per source IP)
        ├── normalizer (book sync + flatten)      raw channel -> rows channel
        ├── graceful readers (end on stop, within request_timeout)
        │   ├── snapshot poller per symbol        -> raw channel (blocking send)
        │   └── WebSocket stream per symbol group -> raw channel (never blocks)
        └── readers scope (cancelled on stop)
            └── resync fetcher                    -> raw channel (blocking send)
```

Shutdown is two-stage (design.md): stop ends only the readers (a poller after its poll
in flight, a stream once the venue has answered its close frame, so every frame sent
before that is kept; the resync fetcher at once); each closes its clone of the raw
channel, so the normalizers drain and close their clones of the rows channel, and the
writer flushes every buffer to the spool and uploads under `shutdown_timeout` (what
misses the deadline stays in the spool for the next start). A second signal
cancels the root scope at once.
"""

from __future__ import annotations

import errno
import functools
import gc
import ipaddress
import logging
import math
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from cryptoflow.config_schema import EXCHANGES, MetricsSection, Settings, Shard, VenueSource
from cryptoflow.errors import (
    TRANSIENT_ERRORS,
    ConfigError,
    CryptoflowError,
    StorageError,
    UsageError,
    single_error_unwrapped,
)
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.limits import VENUE_LIMITS, snapshot_cost
from cryptoflow.models import DepthSnapshot, Gap, GapKind, SnapshotBody, SnapshotSource
from cryptoflow.net.http import make_http_client
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.bodies import BodyBatch
from cryptoflow.pipeline.normalize import Normalizer
from cryptoflow.pipeline.poller import PollStats, poll_snapshots
from cryptoflow.pipeline.raw import RawCapture, install_rest_hook
from cryptoflow.pipeline.resync import ResyncQueue, ResyncRouter, run_resync_fetcher
from cryptoflow.pipeline.rows import RowBatch
from cryptoflow.pipeline.stream import StreamStats, can_resubscribe, run_stream
from cryptoflow.pipeline.supervise import (
    backoff_delay,
    exit_after,
    retry_delay,
    supervised,
    unless_stopped,
)
from cryptoflow.pipeline.writer import WriterStats, rejected_note, run_writer
from cryptoflow.storage.spool import Spool

log = logging.getLogger("cryptoflow.runtime")

#: at most this many queued raw items are normalized in one `feed_many` call
NORMALIZE_BATCH = 1024


# --- the plan: what runs where ---------------------------------------------------------


@attrs.frozen
class ShardPlan:
    exchange: str
    shard: Shard
    symbols: tuple[tuple[str, str], ...]  # (normalized, venue symbol)
    source: VenueSource
    rest_url: str
    ws_url: str

    @property
    def label(self) -> str:
        return f"{self.exchange}/{self.shard.name}"


def select_exchanges(settings: Settings, exchange: str) -> list[str]:
    enabled = list(dict.fromkeys(settings.app.cryptoflow.exchanges))  # never one twice
    if exchange == "all":
        chosen = [e for e in enabled if e in registry.available()]
        skipped = [e for e in enabled if e not in registry.available()]
        if skipped:
            log.warning("not supported yet, skipped: %s", ", ".join(skipped))
        return chosen
    if exchange not in EXCHANGES:
        raise UsageError(
            f"--exchange {exchange!r}: unknown exchange; expected one of "
            f"{', '.join((*EXCHANGES, 'all'))}"
        )
    registry.get_venue(exchange)  # raises UsageError when not supported yet
    if exchange not in enabled:
        raise UsageError(
            f"--exchange {exchange}: not enabled in cryptoflow.exchanges of {settings.config_path}"
        )
    return [exchange]


def select_shards(settings: Settings, names: Sequence[str]) -> list[Shard]:
    if not names:
        return list(settings.shards)
    known = {s.name: s for s in settings.shards}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UsageError(
            f"--shard {', '.join(unknown)}: no such shard in ip_shards.yml; "
            f"known: {', '.join(known) or '(none)'}"
        )
    return [known[n] for n in dict.fromkeys(names)]


def build_plans(
    settings: Settings, exchanges: Sequence[str], shards: Sequence[Shard]
) -> list[ShardPlan]:
    plans = []
    for exchange in exchanges:
        venue = registry.get_venue(exchange)
        source = settings.app.source.for_exchange(exchange)
        if not (source.snapshots or source.deltas):
            log.warning("%s: both lanes are off in source.%s; skipped", exchange, exchange)
            continue
        for shard in shards:
            pairs = []
            for sym in shard.symbols.get(exchange, []):
                entry = settings.symbols.get(sym)
                venue_sym = entry.venue_symbol(exchange) if entry else None
                if venue_sym:
                    pairs.append((sym, venue_sym))
            if pairs:
                plans.append(
                    ShardPlan(
                        exchange=exchange,
                        shard=shard,
                        symbols=tuple(pairs),
                        source=source,
                        rest_url=source.rest_url or venue.default_rest_url,
                        ws_url=source.ws_url or venue.default_ws_url,
                    )
                )
    return plans


# --- shutdown ------------------------------------------------------------------------


class StopControl:
    """First stop cancels the readers (graceful drain); `force` cancels everything."""

    def __init__(self) -> None:
        self.readers = trio.CancelScope()
        self._scopes: list[trio.CancelScope] = []  # one per shard: a scope is entered once
        self.requested = trio.Event()
        self.reason = ""
        self.forced = False
        self.force_requested = trio.Event()  # a second signal: the writer's drain ends too

    def reader_scope(self) -> trio.CancelScope:
        """A new cancel scope for one shard's readers, cancelled by `stop`."""
        scope = trio.CancelScope()
        if self.requested.is_set():
            scope.cancel()
        self._scopes.append(scope)
        return scope

    def stop(self, reason: str) -> None:
        if not self.requested.is_set():
            log.info("stopping (%s): readers stop, buffers drain and flush", reason)
            self.reason = reason
            self.requested.set()
            self.readers.cancel()
            for scope in self._scopes:
                scope.cancel()


async def _watch_signals(
    stop: StopControl,
    root: trio.CancelScope,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()  # handlers installed: a signal from here on stops cleanly
        async for signum in signals:
            name = signal.Signals(signum).name
            if not stop.requested.is_set():
                stop.stop(name)
            else:
                log.warning("second %s: exiting now; unflushed buffers are lost", name)
                stop.forced = True
                stop.force_requested.set()
                root.cancel()
                exit_after(FORCE_GRACE_S)  # a thread stuck in a call must not hold it
                return


#: after a second signal, the process exits within this many seconds whatever runs
FORCE_GRACE_S = 3.0


async def _stop_after(stop: StopControl, seconds: float) -> None:
    await trio.sleep(seconds)
    stop.stop(f"--duration {seconds:g}s reached")


# --- one shard -----------------------------------------------------------------------


@attrs.define
class ShardStats:
    polls: dict[str, PollStats] = attrs.field(factory=dict)
    streams: list[StreamStats] = attrs.field(factory=list)
    budget: RateBudget | None = None
    normalizer: Normalizer | None = None
    raw_channel: trio.MemorySendChannel | None = None  # for its statistics() (queue depth)
    #: what `/healthz` expects data for (`never_received` once `metrics.stale_after` has
    #: passed since `started`, trio clock): the symbols the shard collects (narrowed by
    #: the instruments check) on every lane its source runs; None = not judged
    symbols: tuple[str, ...] = ()
    lanes: tuple[str, ...] = ()
    started: float | None = None

    @classmethod
    def for_plan(cls, plan: ShardPlan) -> ShardStats:
        """Stats of a shard starting now: every planned symbol on every lane it runs."""
        on = {"deltas": plan.source.deltas, "snapshots": plan.source.snapshots}
        return cls(
            symbols=tuple(sym for sym, _venue_sym in plan.symbols),
            lanes=tuple(lane for lane, runs in on.items() if runs),
            started=trio.current_time(),
        )


async def run_shard(
    plan: ShardPlan,
    settings: Settings,
    rows_send: trio.MemorySendChannel[RowBatch],
    stop: StopControl,
    stats: ShardStats,
    raw: RawCapture | None = None,
) -> None:
    venue = registry.get_venue(plan.exchange)
    app = settings.app
    source = plan.source
    _, venue_limit = snapshot_cost(plan.exchange, source.depth_limit)
    limit = source.weight_limit_per_minute or venue_limit
    budget = RateBudget(
        limit,
        safety=source.weight_safety,
        window=VENUE_LIMITS[plan.exchange].window,
        name=plan.label,
    )
    stats.budget = budget
    source_ip = plan.shard.source_ip
    venue_of = {sym: venue_sym for sym, venue_sym in plan.symbols}
    raw_send, raw_recv = trio.open_memory_channel[object](app.channels.raw_capacity)
    #: poll snapshots left unparsed for the writer (where the venue can read them in
    #: batches and no book is kept: a kept book needs every snapshot's levels)
    codec = None if app.processor.verify_book else venue.snapshot_codec
    normalizer = Normalizer(
        {plan.exchange: venue.rules},
        track_book=app.processor.verify_book,
        codecs={plan.exchange: codec} if codec else None,
        mark_start=True,
    )
    resync = ResyncRouter(ResyncQueue())  # REST fetcher queue + per-connection queues
    stats.normalizer = normalizer
    stats.raw_channel = raw_send

    async with make_http_client(
        plan.rest_url, source_ip=source_ip, timeout=app.reader.request_timeout
    ) as http:
        rest = venue.make_rest(http, budget)
        symbols = await _check_instruments(
            rest,
            plan,
            normalizer,
            required=venue.sizes_in_contracts,
            retry=functools.partial(
                backoff_delay,
                initial=app.reader.backoff_initial,
                maximum=app.reader.backoff_max,
                rng=random.Random(),
            ),
            stopping=stop.requested,
        )
        # a symbol the check left out (logged there) is not collected: nothing to expect
        stats.symbols = tuple(sym for sym, _venue_sym in symbols)
        if raw is not None:
            install_rest_hook(http)
            _describe_instruments(raw, plan.exchange, symbols, normalizer)

        async def fetch(sym: str, source_kind: SnapshotSource) -> DepthSnapshot | SnapshotBody:
            get: Callable[..., Awaitable[DepthSnapshot | SnapshotBody]] = rest.fetch_snapshot
            if codec is not None and source_kind is SnapshotSource.POLL:
                get = rest.fetch_snapshot_body
            if raw is None:
                return await get(
                    sym, venue_of[sym], depth_limit=source.depth_limit, source=source_kind
                )
            with raw.rest_slot() as slot:  # raw capture: keep the response body as received
                snapshot = await get(
                    sym, venue_of[sym], depth_limit=source.depth_limit, source=source_kind
                )
            raw.rest(plan.exchange, sym, slot, snapshot.receive_time)
            return snapshot

        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                _run_normalizer, raw_recv, rows_send, normalizer, resync, stats.polls
            )
            async with raw_send:
                # pollers and streams stop gracefully, within request_timeout (a poll in
                # flight is finished; a stream reads up to the venue's close answer); the
                # resync fetcher is cancelled at once
                with trio.CancelScope() as polling:
                    async with trio.open_nursery() as pollers:
                        with stop.reader_scope():
                            async with trio.open_nursery() as readers:
                                _start_readers(
                                    readers,
                                    plan,
                                    settings,
                                    symbols,
                                    raw_send,
                                    resync,
                                    fetch,
                                    stats,
                                    rest,
                                    raw_sink=raw.ws_sink(plan.exchange) if raw else None,
                                    pollers=pollers,
                                    stopping=stop.requested,
                                )
                        await stop.requested.wait()
                        polling.deadline = trio.current_time() + settings.app.reader.request_timeout


def _describe_instruments(
    raw: RawCapture, exchange: str, symbols: Sequence[tuple[str, str]], normalizer: Normalizer
) -> None:
    """Raw capture: each raw file of a symbol begins with its stored name, venue name and
    the multiplier its rows are stored with, so that a replay needs no instruments list of
    its own and names it as collect does (`RawCapture.describe`)."""
    read_ns = time.time_ns()  # just after the list was read
    for sym, venue_sym in symbols:
        raw.describe(exchange, sym, venue_sym, normalizer.multiplier(exchange, sym), read_ns)


#: a poll may return the body unparsed (`SnapshotBody`); a resync fetch always parses
Fetch = Callable[[str, SnapshotSource], Awaitable[DepthSnapshot | SnapshotBody]]


def _start_readers(
    readers: trio.Nursery,
    plan: ShardPlan,
    settings: Settings,
    symbols: tuple[tuple[str, str], ...],
    raw_send: trio.MemorySendChannel,
    resync: ResyncRouter,
    fetch: Fetch,
    stats: ShardStats,
    rest: registry.VenueRestClient | None = None,
    raw_sink: Callable[..., None] | None = None,
    *,
    pollers: trio.Nursery | None = None,
    stopping: trio.Event | None = None,
) -> None:
    """Start the shard's readers: a poller per symbol and a stream per symbol group (in
    `pollers` when given: on `stopping` a poller ends after its poll in flight, a stream
    after the venue's answer to its close frame), and the REST resync fetcher; each under
    `supervised` so one crash restarts only that task."""
    app = settings.app
    source = plan.source
    interval = source.snapshot_interval or app.reader.snapshot_interval
    rng = random.Random()
    if source.snapshots:
        for sym, _venue_sym in symbols:
            poll_stats = stats.polls.setdefault(sym, PollStats())
            (pollers or readers).start_soon(
                functools.partial(
                    supervised,
                    f"{plan.label} poller {sym}",
                    lambda sym=sym, st=poll_stats: poll_snapshots(
                        functools.partial(fetch, sym, SnapshotSource.POLL),
                        raw_send.clone(),
                        exchange=plan.exchange,
                        symbol=sym,
                        interval=interval,
                        jitter=app.reader.jitter,
                        rng=rng,
                        stats=st,
                        stopping=stopping,
                    ),
                )
            )
    if source.deltas:
        venue = registry.get_venue(plan.exchange)
        symbol_of = {venue_sym: sym for sym, venue_sym in symbols}
        stream = venue.make_stream(source, plan.ws_url, symbol_of, rest)
        venue_symbols = [v for _, v in symbols]
        size = max(1, stream.streams_per_connection)
        for i in range(0, len(venue_symbols), size):
            group = venue_symbols[i : i + size]
            st = StreamStats()
            stats.streams.append(st)
            conn_queue = None  # resubscribe venues: this connection serves their resyncs
            if venue.rules.resync_by == "resubscribe" and can_resubscribe(stream):
                conn_queue = ResyncQueue()
                resync.route([symbol_of[v] for v in group], conn_queue)
            (pollers or readers).start_soon(
                functools.partial(
                    supervised,
                    f"{plan.label} stream #{i // size}",
                    lambda group=group, st=st, conn_queue=conn_queue: run_stream(
                        stream,
                        group,
                        symbol_of,
                        raw_send.clone(),
                        source_ip=plan.shard.source_ip,
                        reconnect_after=app.reader.ws_reconnect_after,
                        backoff_initial=app.reader.backoff_initial,
                        backoff_max=app.reader.backoff_max,
                        stall_timeout=app.reader.ws_stall_timeout,
                        stats=st,
                        resync=conn_queue,
                        fallback=resync.request_rest,
                        raw_sink=raw_sink,
                        stopping=stopping,
                        label=plan.label,
                    ),
                )
            )
        readers.start_soon(
            functools.partial(
                supervised,
                f"{plan.label} resync",
                lambda: run_resync_fetcher(
                    resync.rest,
                    functools.partial(_fetch_resync, fetch),
                    raw_send.clone(),
                    exchange=plan.exchange,
                    backoff_initial=app.reader.backoff_initial,
                    backoff_max=app.reader.backoff_max,
                ),
            )
        )


async def _fetch_resync(fetch: Fetch, sym: str) -> DepthSnapshot:
    return await fetch(sym, SnapshotSource.RESYNC)


async def _check_instruments(
    rest: registry.VenueRestClient,
    plan: ShardPlan,
    normalizer: Normalizer,
    *,
    required: bool,
    retry: Callable[[int], float],
    stopping: trio.Event,
) -> tuple[tuple[str, str], ...]:
    """Warn about (and skip) symbols the venue does not list, and log and skip contracts
    whose sizes cannot be stored in base units (inverse); set contract multipliers.

    A failed instruments request is not fatal where sizes are base units (the symbols are
    tried as configured). Where they are contracts (`required`) it is retried until it
    succeeds or the stop: rows stored without the multiplier would hold contracts
    labelled as base units, silently wrong by the contract size.
    """
    failures = 0
    while True:
        try:
            # raced with the stop: a ban can hold the budget for minutes
            instruments = await unless_stopped(stopping, rest.fetch_instruments)
            if instruments is None:
                return ()
            break
        except CryptoflowError as exc:
            if not required:
                log.warning("%s: instruments check skipped: %s", plan.label, exc)
                return plan.symbols
            failures += 1
            delay = retry_delay(exc, retry(failures))  # a throttle's own wait, if longer
            log.warning(
                "%s: cannot read the instruments list (%s); sizes are in contracts, so "
                "nothing is collected until it is read: retry in %.3gs",
                plan.label,
                exc,
                delay,
            )
        with trio.move_on_after(delay):
            await stopping.wait()
        if stopping.is_set():
            return ()
    if failures:
        log.info("%s: instruments list read after %d failed tries", plan.label, failures)
    kept = []
    for sym, venue_sym in plan.symbols:
        inst = instruments.get(venue_sym)
        if inst is None or not inst.status_ok:
            log.warning(
                "%s: %s (%s) is not listed as trading; not collected",
                plan.label,
                sym,
                venue_sym,
            )
            continue
        if inst.unsupported:
            log.error("%s: %s (%s) not collected: %s", plan.label, sym, venue_sym, inst.unsupported)
            continue
        normalizer.set_multiplier(plan.exchange, sym, inst.multiplier_text)
        kept.append((sym, venue_sym))
    return tuple(kept)


def _poll_failed(polls: dict[str, PollStats] | None, symbol: str, error: str) -> None:
    """A poll whose body turned out malformed when parsed (by the normalizer, or at the
    writer's flush): its poller counted the response ok; this counts it `malformed`."""
    poll = polls.get(symbol) if polls is not None else None
    if poll is not None:
        poll.malformed += 1
        poll.last_error = error


def _body_rejected(
    polls: dict[str, PollStats] | None,
    symbol: str,
    sync_hook: Callable[[str], None] | None,
    error: str,
) -> None:
    """A poll body the writer's flush rejected: counted `malformed` for its poller, and
    its `BookSync` told (`on_body_rejected`: its lane no longer counts bodies unread)."""
    _poll_failed(polls, symbol, error)
    if sync_hook is not None:
        sync_hook(error)


#: how loud each gap row's log line is: a loss is a WARNING; the resync that heals it is
#: news, not trouble, and a start row per symbol at every start is bookkeeping
_GAP_LOG_LEVEL = {GapKind.RESYNC: logging.INFO, GapKind.START: logging.DEBUG}


def _log_gap(gap: Gap) -> None:
    log.log(
        _GAP_LOG_LEVEL.get(gap.kind, logging.WARNING),
        "%s/%s: gap (%s): %s",
        gap.exchange,
        gap.symbol,
        gap.kind.value,
        gap.reason,
    )


async def _run_normalizer(
    raw_recv: trio.MemoryReceiveChannel,
    rows_send: trio.MemorySendChannel[RowBatch],
    normalizer: Normalizer,
    resync: ResyncQueue | ResyncRouter,
    polls: dict[str, PollStats] | None = None,
) -> None:
    async with raw_recv, rows_send:
        async for item in raw_recv:
            # take what is already queued too: one feed_many per burst keeps one-change
            # messages (KuCoin) from costing a batch each (same rows as item by item)
            items = [item]
            while len(items) < NORMALIZE_BATCH:
                try:
                    items.append(raw_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            out = normalizer.feed_many(items)
            for exchange_symbol in out.resync_requests:
                resync.request(exchange_symbol[1])
            for gap in out.gaps:
                _log_gap(gap)
            for symbol, error in out.errors:
                log.warning("snapshot failed: %s", error)
                _poll_failed(polls, symbol, error)
            for body in out.bodies:  # the writer reads these; it reports the bad ones here
                body.on_rejected = functools.partial(
                    _body_rejected, polls, body.symbol, body.on_rejected
                )
            batches: list[RowBatch | BodyBatch] = [*out.batches, *out.bodies]
            # nothing parsed stays referenced while this task waits for the next burst
            del item, items, out
            for batch in batches:
                # no scheduler round trip per batch while the channel has room; when it
                # is full, wait (back-pressure) as before
                try:
                    rows_send.send_nowait(batch)
                except trio.WouldBlock:
                    await rows_send.send(batch)
            del batches


# --- the whole run -------------------------------------------------------------------


@attrs.define
class RunResult:
    """Live view of a run: filled as stages start, read by metrics/status at scrape time."""

    writer: WriterStats | None = None
    shards: dict[str, ShardStats] = attrs.field(factory=dict)
    stop_reason: str = ""
    forced: bool = False
    spool: Spool | None = None
    rows_channel: trio.MemorySendChannel | None = None
    ops_port: int | None = None  # bound /metrics + /healthz port, when enabled


async def collect_main(
    settings: Settings,
    plans: list[ShardPlan],
    *,
    output: Path | None,
    duration: float | None,
    simulate: bool,
    install_signal_handlers: bool = True,
    live_status: bool = False,
    status_console: Any = None,
    result: RunResult | None = None,
    task_status: trio.TaskStatus[StopControl] = trio.TASK_STATUS_IGNORED,
) -> RunResult:
    """Run the whole collector until stopped. Pass `result` to watch it while it runs."""
    from cryptoflow.storage.factory import (
        build_spool,
        build_store,
        check_output_writable,
        check_spool_apart,
        describe,
        simulated_storage,
    )

    app = settings.app
    result = result if result is not None else RunResult()
    result.writer = WriterStats()
    stop = StopControl()
    limiter = trio.CapacityLimiter(max(1, app.writer.encode_threads))
    # before any task: plain, clear errors (exit 2) for paths that cannot be used
    storage = app.storage
    if simulate:  # made-up books: only under --output, never the configured store or spool
        storage = simulated_storage(storage, settings.env, output, settings.config_path)
        log.info(
            "--simulate: made-up books go to %s only (spool %s), not to the configured "
            "store or spool",
            output,
            storage.spool.path,
        )
    check_spool_apart(storage, settings.env, output, settings.config_path)
    _check_spool_or_raise(storage, settings.config_path)
    check_output_writable(storage, settings.env, output, settings.config_path)
    store = build_store(storage, settings.env, output)
    ops_listeners = await _open_ops_or_raise(app.metrics, settings.config_path)
    async with trio.open_nursery() as root:
        if install_signal_handlers:
            # first, and started (the handler installed) before anything slow: a signal
            # before it was a KeyboardInterrupt wherever the process was, e.g. in the
            # simulator building its books (a traceback and exit 1, not a clean stop)
            await root.start(_watch_signals, stop, root.cancel_scope)
        if ops_listeners is not None:  # from here on serve_ops owns (closes) them
            await _start_ops_server(root, settings, result, ops_listeners)
        if simulate:
            plans = await _start_simulator(root, plans)
        spool: Spool = build_spool(storage)
        result.spool = spool
        report = await _scan_or_raise(spool)
        raw = RawCapture() if storage.raw_capture else None
        await _start_ops(
            root,
            settings,
            result,
            live_status=live_status,
            console=status_console,
            simulated=simulate,
        )
        log.info(
            "collecting %s -> %s (spool %s: %d files waiting from earlier runs)",
            ", ".join(p.label for p in plans) or "nothing",
            describe(store),
            spool.root,
            len(spool.pending()),
        )
        del report
        if duration is not None:
            root.start_soon(_stop_after, stop, duration)
        rows_send, rows_recv = trio.open_memory_channel[RowBatch](app.channels.rows_capacity)
        result.rows_channel = rows_send
        writer_done = trio.Event()

        async def writer_task() -> None:
            result.writer = await run_writer(
                rows_recv,
                store,
                spool,
                app.writer.buffer,
                limiter=limiter,
                shutdown_timeout=app.cryptoflow.shutdown_timeout,
                stats=result.writer,
                max_age=storage.spool.max_age,
                raw=raw,
                upload_interval=storage.upload_interval,
                forced=stop.force_requested,
            )
            writer_done.set()

        root.start_soon(writer_task)
        task_status.started(stop)
        async with rows_send, trio.open_nursery() as venues:
            for plan in plans:
                st = result.shards.setdefault(plan.label, ShardStats.for_plan(plan))
                venues.start_soon(
                    functools.partial(
                        supervised,
                        f"{plan.label} shard",
                        functools.partial(
                            run_shard, plan, settings, rows_send.clone(), stop, st, raw=raw
                        ),
                    )
                )
            if not plans:
                stop.stop("nothing to collect")
        await writer_done.wait()
        root.cancel_scope.cancel()
    result.stop_reason = stop.reason
    result.forced = stop.forced
    return result


async def _open_ops_or_raise(
    metrics: MetricsSection, config_path: str
) -> list[trio.SocketListener] | None:
    """Bind the ops endpoint (when enabled) before anything is collected: a busy port or a
    host that is not an address of this machine is a ConfigError naming the key (exit 2),
    not an anonymous error out of the running service's nursery."""
    if not metrics.enabled:
        return None
    from cryptoflow.config import key_location
    from cryptoflow.ops.health import open_ops_listeners

    try:
        return await open_ops_listeners(metrics.host, metrics.port)
    except OSError as exc:
        key, problem = _ops_bind_problem(exc, metrics.host, metrics.port)
        where = key_location(config_path, key) if config_path else key
        raise ConfigError([f"{where}: {problem}"]) from exc


def _ops_bind_problem(exc: OSError, host: str, port: int) -> tuple[str, str]:
    """(config key to blame, one-line reason) for a failed bind of `host:port`."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return "metrics.host", f"{host!r} does not resolve to an address ({reason})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "metrics.host", f"{host} is not an address of this host ({reason})"
    if exc.errno == errno.EADDRINUSE:
        return "metrics.port", f"{host}:{port} is in use ({reason}): another process listens there"
    if exc.errno == errno.EACCES:
        return "metrics.port", f"{host}:{port}: not allowed to listen there ({reason})"
    return "metrics.port", f"cannot listen on {host}:{port} ({reason})"


async def _start_ops_server(
    nursery: trio.Nursery,
    settings: Settings,
    result: RunResult,
    listeners: list[trio.SocketListener],
) -> None:
    """/metrics, /healthz and /livez on the listeners bound by `_open_ops_or_raise`.

    Started before the spool exists: the endpoint reads `result.spool` at each request.
    """
    from cryptoflow.ops.health import serve_ops

    metrics = settings.app.metrics
    result.ops_port = await nursery.start(
        functools.partial(
            serve_ops,
            lambda: result,
            host=metrics.host,
            port=metrics.port,
            stale_after=metrics.stale_after,
            listeners=listeners,
        )
    )
    log.info("metrics: http://%s:%d/metrics, /healthz and /livez", metrics.host, result.ops_port)


async def _start_ops(
    nursery: trio.Nursery,
    settings: Settings,
    result: RunResult,
    *,
    live_status: bool,
    console: Any = None,
    simulated: bool = False,
) -> None:
    """The live terminal table, CloudWatch: each only when asked for (the metrics
    endpoint is started first, by `_start_ops_server`).

    They read the run's stats objects when ticked, never on the hot path. A `--simulate`
    run publishes nothing to CloudWatch: its made-up figures would land in the production
    namespace beside the real collectors' (its rows never reach the real store either).
    """
    metrics = settings.app.metrics
    if live_status:
        from cryptoflow.ops.status import run_live_status

        nursery.start_soon(
            functools.partial(
                run_live_status,
                lambda: result,
                console=console,
                stale_after=metrics.stale_after,
            )
        )
    cw = metrics.cloudwatch
    if cw.enabled and simulated:
        log.info("--simulate: metrics.cloudwatch is on, but nothing is published to it")
    elif cw.enabled:
        from cryptoflow.ops.cloudwatch import publish_cloudwatch

        env = settings.env
        nursery.start_soon(
            functools.partial(
                publish_cloudwatch,
                lambda: result,
                interval=cw.interval,
                namespace=cw.namespace,
                service=settings.app.cryptoflow.name,
                client_kwargs={
                    "region": cw.region or env.aws_region,
                    "endpoint_url": cw.endpoint_url or None,
                    "aws_access_key_id": env.aws_access_key_id,
                    "aws_secret_access_key": env.aws_secret_access_key,
                },
            )
        )


def _check_spool_or_raise(storage, config_path: str = "") -> None:
    """Spool dir creatable + writable + free space, or a clear error before collecting
    (a ConfigError naming the key: exit 2, like any unusable setting)."""
    from cryptoflow.config import key_location
    from cryptoflow.storage.spool import check_spool_dir

    errors, warnings = check_spool_dir(Path(storage.spool.path), storage.spool.max_bytes)
    for line in warnings:
        log.warning("%s", line)
    if errors:
        where = key_location(config_path, "storage.spool.path") if config_path else ""
        raise ConfigError(
            [f"{where}: {e.removeprefix('storage.spool.path ')}" if where else e for e in errors]
        )


async def _scan_or_raise(spool: Spool):
    """The start-up scan (`Spool.scan`), or one line saying why it failed. A failure of
    the machine (a disk error, too many open files, memory short) says nothing of the
    spool's files, so the scan moved none of them: the start fails, the next one scans
    again (a supervisor restarts the collector)."""
    try:
        return await trio.to_thread.run_sync(spool.scan)
    except TRANSIENT_ERRORS as exc:
        why = str(exc) or type(exc).__name__  # a bare MemoryError has no message
        raise StorageError(
            f"spool {spool.root}: the start-up scan failed ({why}): the machine's trouble, "
            "not a file's; nothing is quarantined for it and the next start scans again"
        ) from exc


async def _start_simulator(nursery: trio.Nursery, plans: list[ShardPlan]) -> list[ShardPlan]:
    from cryptoflow.sim.server import serve_simulator

    by_venue: dict[str, set[str]] = {}
    for p in plans:
        by_venue.setdefault(p.exchange, set()).update(v for _, v in p.symbols)
    venue_symbols = {ex: sorted(syms) for ex, syms in by_venue.items()}
    sim = await nursery.start(
        functools.partial(
            serve_simulator,
            symbols=venue_symbols.get("binance", []),
            venue_symbols=venue_symbols,
            venues=list(venue_symbols),
            # ids from the clock (µs): a later run into the same output continues above
            # this one's, as a venue's do across a restart (`verify`, `book` read them so)
            id_base=time.time_ns() // 1000,
        )
    )
    log.info("simulator: REST %s, WebSocket %s", sim.rest_url, sim.ws_url)
    loopback = simulated_source_ips(plans)
    for ip, local in loopback.items():
        if ip is not None:
            log.info("simulator: source_ip %s binds %s", ip, local)
    return [
        attrs.evolve(
            p,
            rest_url=sim.rest_url,
            ws_url=sim.ws_url,
            shard=attrs.evolve(p.shard, source_ip=loopback[p.shard.source_ip]),
        )
        for p in plans
    ]


def simulated_source_ips(plans: Sequence[ShardPlan]) -> dict[str | None, str | None]:
    """Each shard's `source_ip` -> a loopback address of its own to bind in `--simulate`.

    The simulator keeps its rate budgets per client address, as the venues do per IP, so
    shards must reach it from as many addresses as they have source IPs: all from one
    address, a config that fits each IP (`shards list`) got 429s and bans. The host's
    addresses are not the simulator's, so each source IP becomes 127.0.0.2, .3, ...
    (Linux routes all of 127/8 to the loopback without configuration); the shard on the
    default route (no source_ip) stays unbound and arrives from 127.0.0.1.
    """
    ips = dict.fromkeys(p.shard.source_ip for p in plans if p.shard.source_ip is not None)
    mapping: dict[str | None, str | None] = {None: None}
    for n, ip in enumerate(ips, start=2):
        mapping[ip] = str(ipaddress.IPv4Address("127.0.0.0") + n)
    return mapping


def _tune_gc() -> None:
    """Move everything imported so far out of the collector's way and collect less often.

    Measured in a 60 s soak (docs/benchmarks.md): full collections scanned ~110k
    long-lived objects (modules, tables) again and again; freezing them and raising the
    gen-0 threshold cut GC time from ~4 s to ~0.2 s per minute, ~6 % of a core.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run_collect(
    *,
    config_path: Path,
    exchange: str,
    output: Path | None,
    duration: float | None,
    simulate: bool,
    shards: Sequence[str],
    debug: bool,
    status: bool | None = None,
) -> int:
    from cryptoflow.config import load_settings
    from cryptoflow.ops.logging import setup_logging

    settings = load_settings(config_path, uses_s3=not simulate)
    lg = settings.app.logging
    live = sys.stdout.isatty() if status is None else status
    console = None
    if live:
        from rich.console import Console

        console = Console()
    try:
        setup_logging(
            level=settings.env.log_level or lg.level,
            fmt=lg.format,
            output=lg.output,
            debug=debug,
            secrets=(settings.env.aws_secret_access_key, settings.env.aws_access_key_id),
            console=console,
        )
    except OSError as exc:  # a log file that cannot be opened
        from cryptoflow.config import key_location

        where = key_location(config_path, "logging.output")
        raise ConfigError([f"{where}: cannot open {lg.output!r}: {exc.strerror or exc}"]) from exc
    if duration is not None and not (math.isfinite(duration) and duration > 0):
        raise UsageError(f"--duration {duration:g}: must be a positive number of seconds")
    exchanges = select_exchanges(settings, exchange)
    plans = build_plans(settings, exchanges, select_shards(settings, shards))
    if not plans:
        raise UsageError(f"--exchange {exchange}: no shard lists a symbol for it")
    _tune_gc()
    # a start that fails inside the root nursery (the spool scan) says why, not "an
    # ExceptionGroup of 1 sub-exception"
    with single_error_unwrapped():
        result = trio.run(
            functools.partial(
                collect_main,
                settings,
                plans,
                output=output,
                duration=duration,
                simulate=simulate,
                live_status=live,
                status_console=console,
            )
        )
    if result.forced:
        return 130
    ws = result.writer
    if ws is not None:
        received = sum(ws.rows_received.values())
        spooled = sum(ws.rows_spooled.values())
        log.info(
            "done (%s): rows received=%d spooled=%d uploaded=%d; files uploaded=%d, "
            "left in spool=%d%s",
            result.stop_reason,
            received,
            spooled,
            sum(ws.rows_uploaded.values()),
            ws.files_uploaded,
            ws.spool_files,
            rejected_note(ws.snapshot_bodies_rejected),
        )
    return 130 if result.stop_reason == "SIGINT" else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
