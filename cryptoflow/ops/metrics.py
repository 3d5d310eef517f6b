"""Prometheus metrics over the live run statistics (read at scrape time, no hot-path cost).

`RunCollector` is a prometheus_client custom collector: every scrape walks the `RunResult`
(writer stats, per-shard poll/stream/budget stats, the normalizer's `BookSync` counters,
channel statistics) and turns what it finds into metric families. Nothing in the pipeline
calls into this module; the counters it reads are plain integers the stages already keep.
It is registered on a private `CollectorRegistry` (`build_registry`), never the global one.

Labels: `exchange` (binance, ...), `shard` (ip_shards.yml name), `symbol` (normalized,
BTCUSDT), `lane` (`deltas` = WebSocket diff stream, `snapshots` = REST snapshots),
`dataset` (snapshots, deltas, gaps).

Per symbol (from the normalizer's `BookSync` of each shard):
- `cryptoflow_messages_total{exchange,shard,symbol,lane}` messages received (diffs; snapshots)
- `cryptoflow_gaps_total{exchange,shard,symbol}` stream breaks (gap rows of a lost-data kind)
- `cryptoflow_resyncs_total{exchange,shard,symbol}` books re-anchored after a break
- `cryptoflow_book_sync_events_total{exchange,shard,symbol,event}` every `SyncCounters` field
  (applied, duplicates, stale_dropped, snapshots_too_old, buffer_overflow, drift, ...)
- `cryptoflow_book_synced{exchange,shard,symbol}` 1 while the book is synced
- `cryptoflow_last_event_age_seconds{exchange,shard,symbol,lane}` seconds since the last
  message of that lane was received (absent until the first one)
- `cryptoflow_symbol_rows_total{exchange,symbol,dataset}` rows accepted by the writer
  (only when `WriterStats.rows_by_symbol` exists)

Per snapshot poller / WebSocket connection:
- `cryptoflow_polls_total{exchange,shard,symbol,outcome}` outcome = ok | failed | throttled
  (a response, none, a throttle) | malformed (of the ok ones: a body found malformed when
  parsed, which for in-sync symbols is at the writer's flush)
- `cryptoflow_poll_skipped_slots_total{exchange,shard,symbol}`
- `cryptoflow_ws_frames_total`, `cryptoflow_ws_diffs_total`, `cryptoflow_ws_dropped_total`,
  `cryptoflow_ws_malformed_total`, `cryptoflow_ws_connects_total`,
  `cryptoflow_ws_disconnects_total`, `cryptoflow_ws_handovers_total`,
  `cryptoflow_ws_handover_failures_total`, `cryptoflow_ws_repeated_total`
  `{exchange,shard,stream}` (stream = connection index)

Per shard (REST budget of its source IP, and its raw channel):
- `cryptoflow_rest_weight_used{exchange,shard}` weight sent in the last 60 s (sliding),
  whatever the venue's own window (the budget paces in that: 5 s Bybit, 2 s OKX, 30 s
  KuCoin), so used / limit is the share of the minute's budget spent
- `cryptoflow_rest_weight_limit{exchange,shard}` the venue's limit per minute (the
  configured `weight_limit_per_minute`, or the documented one scaled to a minute)
- `cryptoflow_rest_venue_used_weight{exchange,shard}` the venue's last usage header
- `cryptoflow_rest_blocked_seconds{exchange,shard}` time left in a throttle/ban pause
- `cryptoflow_rest_requests_total`, `cryptoflow_rest_weight_sent_total`,
  `cryptoflow_rest_throttles_total`, `cryptoflow_rest_bans_total`,
  `cryptoflow_rest_paced_waits_total` `{exchange,shard}`
- `cryptoflow_channel_depth{exchange,shard,channel}` / `cryptoflow_channel_capacity{...}`
  items queued / capacity (`raw` per shard; `rows` with empty exchange/shard when the
  RunResult has a `rows_channel`)

Writer and spool (one per process):
- `cryptoflow_rows_received_total{dataset}` (rows of poll bodies once read at their
  flush: a body left out as malformed holds none), `cryptoflow_rows_spooled_total{dataset}`,
  `cryptoflow_rows_uploaded_total{dataset}`, `cryptoflow_rows_set_aside_total{dataset}`
  (rows the layout cannot place, kept in the spool's quarantine)
- `cryptoflow_flushes_total`, `cryptoflow_flush_failures_total`,
  `cryptoflow_spool_full_events_total`, `cryptoflow_files_spooled_total`,
  `cryptoflow_bytes_spooled_total`, `cryptoflow_files_uploaded_total`,
  `cryptoflow_bytes_uploaded_total`, `cryptoflow_upload_failures_total`,
  `cryptoflow_snapshot_bodies_rejected_total` (poll bodies read at the flush and left out)
- `cryptoflow_buffered_rows`, `cryptoflow_buffered_bytes`, `cryptoflow_writer_backpressure` (0/1),
  `cryptoflow_spool_files`, `cryptoflow_spool_bytes`, `cryptoflow_spool_max_bytes`
  (the latter when the spool is known)
- `cryptoflow_spool_delay_seconds{since=event|receive}` (histogram, buckets only): delta
  rows by exchange event time / our receive time -> on disk in the spool
- `cryptoflow_upload_seconds` (summary: `_sum`, `_count`) plus
  `cryptoflow_upload_seconds_max`, from WriterStats `upload_seconds_sum/_count/_max`
  (flushes are not timed: none of their time is a metric)

Last event age: taken from `BookSync.last_diff_receive_ns` / `last_snapshot_receive_ns`
(local receive time, ns) when those attributes exist; otherwise a `Freshness` tracker
notes, at each read, when the lane's message counter last moved (resolution = the read
interval: scrape, /healthz or the live status tick).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from cryptoflow.pipeline.writer import DELAY_EDGES_S

LANES = ("deltas", "snapshots")
DATASETS = ("snapshots", "deltas", "gaps")

ResultGetter = Callable[[], Any]


# --- reading the run result (shared by metrics, /healthz, live status, CloudWatch) ---------


@attrs.define
class SymbolView:
    """What is known about one (exchange, shard, symbol) at one read."""

    exchange: str
    shard: str
    symbol: str
    messages: dict[str, int]  # lane -> messages received
    gaps: int = 0
    resyncs: int = 0
    synced: bool = False
    counters: dict[str, int] = attrs.field(factory=dict)  # SyncCounters fields
    rows: dict[str, int] | None = None  # dataset -> rows (None: writer has no per-symbol rows)
    receive_ns: dict[str, int | None] = attrs.field(factory=dict)  # lane -> last receive (ns)
    polls: Any = None  # PollStats or None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.exchange, self.shard, self.symbol)


def split_label(label: str) -> tuple[str, str]:
    exchange, _, shard = label.partition("/")
    return exchange, shard or "default"


def _counters_dict(counters: Any) -> dict[str, int]:
    if counters is None:
        return {}
    if attrs.has(type(counters)):
        return {f.name: int(getattr(counters, f.name)) for f in attrs.fields(type(counters))}
    return {k: int(v) for k, v in vars(counters).items() if isinstance(v, int)}


def _rows_by_symbol(result: Any) -> dict[tuple[str, str], dict[str, int]] | None:
    """(exchange, symbol) -> dataset -> rows, from `WriterStats.rows_by_symbol` if present."""
    writer = getattr(result, "writer", None)
    table = getattr(writer, "rows_by_symbol", None) if writer is not None else None
    if table is None:
        return None
    out: dict[tuple[str, str], dict[str, int]] = {}
    for key, n in list(table.items()):
        try:
            dataset, exchange, symbol = key
        except (TypeError, ValueError):
            continue
        dataset = getattr(dataset, "value", dataset)
        per = out.setdefault((exchange, symbol), {})
        per[dataset] = per.get(dataset, 0) + int(n)
    return out


def iter_symbols(result: Any) -> Iterator[SymbolView]:
    """Every symbol of every shard: those the normalizer has seen plus configured pollers."""
    if result is None:
        return
    rows = _rows_by_symbol(result)
    for label, shard in list(getattr(result, "shards", {}).items()):
        exchange, shard_name = split_label(label)
        normalizer = getattr(shard, "normalizer", None)
        syncs = normalizer.syncs() if normalizer is not None else {}
        polls = dict(getattr(shard, "polls", {}) or {})
        by_symbol: dict[str, Any] = {sym: s for (ex, sym), s in syncs.items() if ex == exchange}
        for sym in sorted(set(by_symbol) | set(polls)):
            sync = by_symbol.get(sym)
            counters = _counters_dict(getattr(sync, "counters", None))
            view = SymbolView(
                exchange=exchange,
                shard=shard_name,
                symbol=sym,
                messages={
                    "deltas": counters.get("diffs", 0),
                    "snapshots": counters.get("snapshots", 0),
                },
                gaps=counters.get("breaks", 0),
                resyncs=counters.get("resyncs", 0),
                synced=getattr(getattr(sync, "state", None), "value", "") == "synced",
                counters=counters,
                rows=None if rows is None else rows.get((exchange, sym), {}),
                receive_ns={
                    "deltas": getattr(sync, "last_diff_receive_ns", None),
                    "snapshots": getattr(sync, "last_snapshot_receive_ns", None),
                },
                polls=polls.get(sym),
            )
            yield view


def watched_lanes(view: SymbolView) -> tuple[str, ...]:
    """Lanes whose silence means trouble: deltas always (once data came), snapshots only
    where a REST poller runs (otherwise snapshots arrive only on resync)."""
    return LANES if view.polls is not None else ("deltas",)


class Freshness:
    """Age of the last message per (exchange, shard, symbol, lane).

    Uses the receive time when the stats carry one; otherwise remembers when the lane's
    message counter was last seen to move (first sight of a non-zero counter = now).
    `clock` is monotonic seconds, `wall_ns` the wall clock in ns (for receive times).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.clock = clock
        self.wall_ns = wall_ns
        self._seen: dict[tuple[str, ...], tuple[int, float]] = {}

    def age(self, view: SymbolView, lane: str) -> float | None:
        """Seconds since the lane's last message, or None if it never received one."""
        received = view.receive_ns.get(lane)
        if received is not None:
            return max(0.0, (self.wall_ns() - received) / 1e9)
        count = view.messages.get(lane, 0)
        if count <= 0:
            return None
        key = (*view.key, lane)
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != count:
            self._seen[key] = (count, now)
            return 0.0
        return max(0.0, now - seen[1])


def channel_depths(result: Any) -> Iterator[tuple[str, str, str, int, float]]:
    """(exchange, shard, channel, items queued, capacity) for every known channel."""
    if result is None:
        return
    for label, shard in list(getattr(result, "shards", {}).items()):
        exchange, shard_name = split_label(label)
        stats = _channel_stats(getattr(shard, "raw_channel", None))
        if stats is not None:
            yield (exchange, shard_name, "raw", *stats)
    stats = _channel_stats(getattr(result, "rows_channel", None))
    if stats is not None:
        yield ("", "", "rows", *stats)


def _channel_stats(channel: Any) -> tuple[int, float] | None:
    if channel is None:
        return None
    try:
        st = channel.statistics()
    except Exception:
        return None
    return int(st.current_buffer_used), float(st.max_buffer_size)


def _budget_now(budget: Any) -> tuple[int | None, float | None]:
    """(weight used in the last 60 s, seconds blocked); None outside a trio run."""
    try:
        return budget.used_last_minute(), float(budget.blocked_for)
    except RuntimeError:  # trio.current_time() outside trio
        return None, None


# --- the collector ---------------------------------------------------------------------


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class RunCollector(Collector):
    """Turns the current `RunResult` (from `result_getter`) into metric families."""

    def __init__(
        self,
        result_getter: ResultGetter,
        *,
        spool: Any = None,
        freshness: Freshness | None = None,
    ) -> None:
        self.result_getter = result_getter
        self.spool = spool
        self.freshness = freshness or Freshness()

    def collect(self) -> Iterator[Any]:
        result = self.result_getter()
        yield from self._symbols(result)
        yield from self._readers(result)
        yield from self._shards(result)
        yield from self._writer(result)

    # per symbol
    def _symbols(self, result: Any) -> Iterator[Any]:
        sl = ("exchange", "shard", "symbol")
        messages = _counter("cryptoflow_messages", "Messages received per lane", (*sl, "lane"))
        gaps = _counter("cryptoflow_gaps", "Stream breaks detected (lost data)", sl)
        resyncs = _counter("cryptoflow_resyncs", "Books re-anchored after a break", sl)
        events = _counter(
            "cryptoflow_book_sync_events", "Book-sync counters by event", (*sl, "event")
        )
        synced = _gauge("cryptoflow_book_synced", "1 while the book is synced", sl)
        age = _gauge(
            "cryptoflow_last_event_age_seconds",
            "Seconds since the lane's last message was received",
            (*sl, "lane"),
        )
        rows = _counter(
            "cryptoflow_symbol_rows",
            "Rows accepted by the writer",
            ("exchange", "symbol", "dataset"),
        )
        have_rows = False
        rows_seen: set[tuple[str, str]] = set()
        for v in iter_symbols(result):
            lv = [v.exchange, v.shard, v.symbol]
            for lane in LANES:
                messages.add_metric([*lv, lane], v.messages.get(lane, 0))
                a = self.freshness.age(v, lane)
                if a is not None:
                    age.add_metric([*lv, lane], a)
            gaps.add_metric(lv, v.gaps)
            resyncs.add_metric(lv, v.resyncs)
            synced.add_metric(lv, 1.0 if v.synced else 0.0)
            for event, n in v.counters.items():
                events.add_metric([*lv, event], n)
            if v.rows is not None:
                have_rows = True
                if (v.exchange, v.symbol) not in rows_seen:  # one writer: not per shard
                    rows_seen.add((v.exchange, v.symbol))
                    for dataset in DATASETS:
                        rows.add_metric([v.exchange, v.symbol, dataset], v.rows.get(dataset, 0))
        yield from (messages, gaps, resyncs, events, synced, age)
        if have_rows:
            yield rows

    # pollers and streams
    def _readers(self, result: Any) -> Iterator[Any]:
        sl = ("exchange", "shard", "symbol")
        polls = _counter("cryptoflow_polls", "REST snapshot polls by outcome", (*sl, "outcome"))
        skipped = _counter(
            "cryptoflow_poll_skipped_slots", "Poll slots skipped (poll ran late)", sl
        )
        wl = ("exchange", "shard", "stream")
        ws = {
            name: _counter(f"cryptoflow_ws_{name}", doc, wl)
            for name, doc in (
                ("frames", "WebSocket frames received"),
                ("diffs", "Depth diffs parsed from frames"),
                ("dropped", "Diffs dropped because the consumer was too slow"),
                ("malformed", "Frames that failed to parse"),
                ("connects", "WebSocket connections opened"),
                ("disconnects", "WebSocket connections lost"),
                ("handovers", "Connections taken over from a hand-over (no gap if continuous)"),
                ("handover_failures", "Hand-over attempts given up (the old connection kept)"),
                ("repeated", "Diffs a hand-over's next connection repeated (dropped)"),
            )
        }
        for label, shard in list(getattr(result, "shards", {}).items()) if result else []:
            exchange, shard_name = split_label(label)
            for sym, ps in sorted((getattr(shard, "polls", {}) or {}).items()):
                lv = [exchange, shard_name, sym]
                for outcome in ("ok", "failed", "throttled", "malformed"):
                    polls.add_metric([*lv, outcome], getattr(ps, outcome, 0))
                skipped.add_metric(lv, getattr(ps, "skipped_slots", 0))
            for i, st in enumerate(list(getattr(shard, "streams", []) or [])):
                for name, fam in ws.items():
                    fam.add_metric([exchange, shard_name, str(i)], getattr(st, name, 0))
        yield polls
        yield skipped
        yield from ws.values()

    # REST budget and channels
    def _shards(self, result: Any) -> Iterator[Any]:
        sl = ("exchange", "shard")
        used = _gauge(
            "cryptoflow_rest_weight_used", "REST weight sent in the last 60 s (sliding)", sl
        )
        limit = _gauge(
            "cryptoflow_rest_weight_limit", "Venue REST weight limit per minute (60 s)", sl
        )
        header = _gauge(
            "cryptoflow_rest_venue_used_weight", "Venue-reported weight used (last header)", sl
        )
        blocked = _gauge(
            "cryptoflow_rest_blocked_seconds", "Seconds left in a throttle/ban pause", sl
        )
        budget_counters = {
            field: _counter(f"cryptoflow_rest_{name}", doc, sl)
            for field, name, doc in (
                ("requests", "requests", "REST requests sent"),
                ("weight_sent", "weight_sent", "REST weight sent"),
                ("throttles", "throttles", "Throttle responses (429)"),
                ("bans", "bans", "Ban responses (418/403)"),
                ("paced_waits", "paced_waits", "Waits to stay under the weight budget"),
            )
        }
        depth = _gauge(
            "cryptoflow_channel_depth", "Items queued in a stage channel", (*sl, "channel")
        )
        capacity = _gauge(
            "cryptoflow_channel_capacity", "Capacity of a stage channel", (*sl, "channel")
        )
        for label, shard in list(getattr(result, "shards", {}).items()) if result else []:
            exchange, shard_name = split_label(label)
            lv = [exchange, shard_name]
            budget = getattr(shard, "budget", None)
            if budget is None:
                continue
            limit.add_metric(lv, float(getattr(budget, "limit", 0)))
            used_now, blocked_now = _budget_now(budget)
            if used_now is not None:
                used.add_metric(lv, float(used_now))
                blocked.add_metric(lv, float(blocked_now or 0.0))
            bstats = getattr(budget, "stats", None)
            last = getattr(bstats, "last_used_header", None)
            if last is not None:
                header.add_metric(lv, float(last))
            for field, fam in budget_counters.items():
                fam.add_metric(lv, getattr(bstats, field, 0))
        for exchange, shard_name, channel, n, cap in channel_depths(result):
            depth.add_metric([exchange, shard_name, channel], n)
            capacity.add_metric([exchange, shard_name, channel], cap)
        yield from (used, limit, header, blocked, *budget_counters.values(), depth, capacity)

    # writer and spool
    def _writer(self, result: Any) -> Iterator[Any]:
        ws = getattr(result, "writer", None) if result is not None else None
        spool = self.spool if self.spool is not None else getattr(result, "spool", None)
        if ws is not None:
            for attr, name, doc in (
                ("rows_received", "rows_received", "Rows received by the writer"),
                ("rows_spooled", "rows_spooled", "Rows in complete spool files"),
                ("rows_uploaded", "rows_uploaded", "Rows verified in storage"),
                (
                    "rows_set_aside",
                    "rows_set_aside",
                    "Rows set aside in the spool's quarantine (never uploaded; logged)",
                ),
            ):
                fam = _counter(f"cryptoflow_{name}", doc, ("dataset",))
                per = dict(getattr(ws, attr, {}) or {})
                for dataset in sorted(set(DATASETS) | set(per)):
                    fam.add_metric([dataset], per.get(dataset, 0))
                yield fam
            for attr, doc in (
                ("flushes", "Buffers flushed to the spool"),
                ("flush_failures", "Flushes refused (spool full or disk error)"),
                ("spool_full_events", "Flushes refused because the spool was full"),
                ("files_spooled", "Files written to the spool"),
                ("bytes_spooled", "Bytes written to the spool"),
                ("files_uploaded", "Files uploaded and verified"),
                ("bytes_uploaded", "Bytes uploaded and verified"),
                (
                    "upload_failures",
                    "Uploads that failed after the store's own retries (each failed S3 "
                    "attempt is a WARNING log line)",
                ),
                (
                    "snapshot_bodies_rejected",
                    "Poll snapshot bodies left out at the flush (malformed; logged)",
                ),
            ):
                fam = _counter(f"cryptoflow_{attr}", doc)
                fam.add_metric([], getattr(ws, attr, 0))
                yield fam
            for attr, doc in (
                ("buffered_rows", "Rows buffered in memory, not yet spooled"),
                ("buffered_bytes", "Estimated memory of the writer's buffers (the cap counts it)"),
                ("spool_files", "Files waiting in the spool"),
                ("spool_bytes", "Bytes waiting in the spool"),
            ):
                fam = _gauge(f"cryptoflow_{attr}", doc)
                fam.add_metric([], float(getattr(ws, attr, 0)))
                yield fam
            fam = _gauge("cryptoflow_writer_backpressure", "1 while the writer pauses its input")
            fam.add_metric([], 1.0 if getattr(ws, "backpressure", False) else 0.0)
            yield fam
            for what, doc in (("upload", "Upload duration"),):
                count = getattr(ws, f"{what}_seconds_count", None)
                if count is None:
                    continue
                summ = SummaryMetricFamily(f"cryptoflow_{what}_seconds", doc, labels=[])
                summ.add_metric([], count, float(getattr(ws, f"{what}_seconds_sum", 0.0)))
                yield summ
                mx = getattr(ws, f"{what}_seconds_max", None)
                if mx is not None:
                    fam = _gauge(f"cryptoflow_{what}_seconds_max", f"Longest {what} so far")
                    fam.add_metric([], float(mx))
                    yield fam
            hist = HistogramMetricFamily(
                "cryptoflow_spool_delay_seconds",
                "Delta rows by time -> on disk in the spool (since: event = exchange event "
                "time, receive = our receive time)",
                labels=["since"],
            )
            for since, attr in (("event", "spool_delay"), ("receive", "spool_delay_from_receive")):
                counts = getattr(ws, attr, None)
                if not counts:
                    continue
                cumulative, buckets = 0, []
                for edge, n in zip([*DELAY_EDGES_S, float("inf")], counts, strict=True):
                    cumulative += n
                    buckets.append(
                        ("+Inf" if edge == float("inf") else str(float(edge)), cumulative)
                    )
                hist.add_metric([since], buckets, None)
            if hist.samples:
                yield hist
        elif spool is not None:  # before the writer reports: the spool itself
            for attr in ("files", "bytes"):
                fam = _gauge(f"cryptoflow_spool_{attr}", f"{attr.capitalize()} in the spool")
                fam.add_metric([], float(getattr(spool, attr, 0)))
                yield fam
        if spool is not None and getattr(spool, "max_bytes", None) is not None:
            fam = _gauge("cryptoflow_spool_max_bytes", "Spool size limit")
            fam.add_metric([], float(spool.max_bytes))
            yield fam


def build_registry(
    result_getter: ResultGetter,
    *,
    spool: Any = None,
    freshness: Freshness | None = None,
) -> tuple[CollectorRegistry, RunCollector]:
    """A private registry holding one `RunCollector` (the global registry is untouched)."""
    registry = CollectorRegistry(auto_describe=False)
    collector = RunCollector(result_getter, spool=spool, freshness=freshness)
    registry.register(collector)
    return registry, collector
