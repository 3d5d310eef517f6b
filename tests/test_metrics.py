"""Ops metrics: the collector reads the real stats objects; /metrics, /healthz and /livez
over HTTP."""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import DepthDiff, DepthSnapshot
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.ops.health import OpsApp, check_health, serve_ops
from cryptoflow.ops.metrics import Freshness, build_registry, iter_symbols
from cryptoflow.pipeline.normalize import Normalizer
from cryptoflow.pipeline.poller import PollStats
from cryptoflow.pipeline.stream import StreamStats
from cryptoflow.pipeline.writer import WriterStats
from cryptoflow.runtime import RunResult, ShardStats
from cryptoflow.storage.spool import Spool


def diff(first, last, prev, symbol="BTCUSDT") -> DepthDiff:
    return DepthDiff(
        "binance", "futures", symbol, last, last - 1, first, last, prev,
        [["1.5", "2"]], [["1.6", "1"]], last * 1_000_000,
    )  # fmt: skip


def snapshot(last, symbol="BTCUSDT") -> DepthSnapshot:
    return DepthSnapshot(
        "binance", "futures", symbol, last, None, last,
        [["1.5", "1"]], [["1.6", "1"]], last * 1_000_000,
    )  # fmt: skip


@attrs.define
class WriterStatsPlus(WriterStats):
    """WriterStats with the fields proposed for the writer (per-symbol rows, timings)."""

    rows_by_symbol: Counter = attrs.field(factory=Counter)
    upload_seconds_sum: float = 0.0
    upload_seconds_count: int = 0
    upload_seconds_max: float = 0.0


def make_normalizer() -> Normalizer:
    n = Normalizer({"binance": RULES})
    n.feed(diff(1, 10, 0))  # BTCUSDT: waits for a snapshot
    n.feed(snapshot(5))  # anchors
    n.feed(diff(11, 20, 10))  # synced
    n.feed(diff(30, 40, 29))  # break: 1 gap, resync requested
    n.feed(snapshot(35))  # re-anchored: 1 resync
    n.feed(diff(50, 60, 49, symbol="ETHUSDT"))
    return n


def make_result(writer: WriterStats | None = None) -> tuple[RunResult, trio.MemorySendChannel]:
    normalizer = make_normalizer()
    send, _recv = trio.open_memory_channel[object](10)
    for i in range(3):
        send.send_nowait(i)
    shard = ShardStats(
        polls={
            "BTCUSDT": PollStats(polls=3, ok=2, failed=1, skipped_slots=1, malformed=1),
            "SOLUSDT": PollStats(),  # configured, no data yet
        },
        streams=[
            StreamStats(
                connects=1,
                frames=7,
                diffs=4,
                dropped=1,
                handovers=2,
                handover_failures=1,
                repeated=57,
            )
        ],
        budget=RateBudget(2400, name="binance/main"),
        normalizer=normalizer,
        raw_channel=send,
    )
    if writer is None:
        writer = WriterStatsPlus()
        writer.rows_received.update({"deltas": 10, "snapshots": 4, "gaps": 1})
        writer.rows_uploaded.update({"deltas": 6})
        writer.rows_by_symbol.update(
            {("deltas", "binance", "BTCUSDT"): 8, ("snapshots", "binance", "BTCUSDT"): 4}
        )
        writer.files_uploaded, writer.upload_failures = 3, 2
        writer.snapshot_bodies_rejected = 1
        writer.spool_files, writer.spool_bytes, writer.buffered_rows = 4, 12345, 17
        writer.upload_seconds_sum, writer.upload_seconds_count = 1.5, 3
        writer.upload_seconds_max = 0.9
        writer.spool_delay[0], writer.spool_delay[9], writer.spool_delay[-1] = 5, 3, 1
        writer.spool_delay_from_receive[0] = 9
    return RunResult(writer=writer, shards={"binance/main": shard}), send


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(data, name, **labels) -> float:
    return data[(name, frozenset(labels.items()))]


SYM = {"exchange": "binance", "shard": "main"}


def check_counters(data) -> None:
    btc = {**SYM, "symbol": "BTCUSDT"}
    assert value(data, "cryptoflow_messages_total", **btc, lane="deltas") == 3
    assert value(data, "cryptoflow_messages_total", **btc, lane="snapshots") == 2
    assert value(data, "cryptoflow_gaps_total", **btc) == 1
    assert value(data, "cryptoflow_resyncs_total", **btc) == 1
    assert value(data, "cryptoflow_book_synced", **btc) == 1
    assert value(data, "cryptoflow_book_sync_events_total", **btc, event="applied") >= 2
    eth = {**SYM, "symbol": "ETHUSDT"}
    assert value(data, "cryptoflow_messages_total", **eth, lane="deltas") == 1
    assert value(data, "cryptoflow_gaps_total", **eth) == 0
    sol = {**SYM, "symbol": "SOLUSDT"}
    assert value(data, "cryptoflow_messages_total", **sol, lane="deltas") == 0
    assert (
        "cryptoflow_last_event_age_seconds",
        frozenset({**sol, "lane": "deltas"}.items()),
    ) not in data  # never received anything: no age
    assert value(data, "cryptoflow_last_event_age_seconds", **btc, lane="deltas") >= 0
    assert value(data, "cryptoflow_polls_total", **btc, outcome="ok") == 2
    assert value(data, "cryptoflow_polls_total", **btc, outcome="failed") == 1
    assert value(data, "cryptoflow_polls_total", **btc, outcome="malformed") == 1
    assert value(data, "cryptoflow_poll_skipped_slots_total", **btc) == 1
    assert value(data, "cryptoflow_ws_frames_total", **SYM, stream="0") == 7
    assert value(data, "cryptoflow_ws_dropped_total", **SYM, stream="0") == 1
    assert value(data, "cryptoflow_ws_handovers_total", **SYM, stream="0") == 2
    assert value(data, "cryptoflow_ws_handover_failures_total", **SYM, stream="0") == 1
    assert value(data, "cryptoflow_ws_repeated_total", **SYM, stream="0") == 57
    assert value(data, "cryptoflow_channel_depth", **SYM, channel="raw") == 3
    assert value(data, "cryptoflow_channel_capacity", **SYM, channel="raw") == 10
    assert value(data, "cryptoflow_rest_weight_limit", **SYM) == 2400
    assert value(data, "cryptoflow_rows_received_total", dataset="deltas") == 10
    assert value(data, "cryptoflow_rows_uploaded_total", dataset="deltas") == 6
    assert value(data, "cryptoflow_rows_uploaded_total", dataset="gaps") == 0
    assert value(data, "cryptoflow_upload_failures_total") == 2
    assert value(data, "cryptoflow_snapshot_bodies_rejected_total") == 1
    assert value(data, "cryptoflow_files_uploaded_total") == 3
    assert value(data, "cryptoflow_spool_bytes") == 12345
    assert value(data, "cryptoflow_spool_files") == 4
    assert value(data, "cryptoflow_buffered_rows") == 17
    assert value(data, "cryptoflow_upload_seconds_count") == 3
    assert value(data, "cryptoflow_upload_seconds_sum") == 1.5
    assert value(data, "cryptoflow_upload_seconds_max") == 0.9
    # event -> spooled delay of delta rows: cumulative buckets
    ev = {"since": "event"}
    assert value(data, "cryptoflow_spool_delay_seconds_bucket", **ev, le="0.1") == 5
    assert value(data, "cryptoflow_spool_delay_seconds_bucket", **ev, le="0.9") == 5
    assert value(data, "cryptoflow_spool_delay_seconds_bucket", **ev, le="1.0") == 8
    assert value(data, "cryptoflow_spool_delay_seconds_bucket", **ev, le="+Inf") == 9
    rc = {"since": "receive"}
    assert value(data, "cryptoflow_spool_delay_seconds_bucket", **rc, le="0.1") == 9
    rows = {"exchange": "binance", "symbol": "BTCUSDT"}
    assert value(data, "cryptoflow_symbol_rows_total", **rows, dataset="deltas") == 8
    assert value(data, "cryptoflow_symbol_rows_total", **rows, dataset="snapshots") == 4


async def test_collector_matches_stats():
    result, _send = make_result()
    budget = result.shards["binance/main"].budget
    await budget.acquire(5)
    await budget.acquire(2)
    budget.throttle(30.0)
    budget.observe_used(17)
    from prometheus_client import generate_latest

    registry, _ = build_registry(lambda: result)
    data = samples(generate_latest(registry).decode())
    check_counters(data)
    assert value(data, "cryptoflow_rest_weight_used", **SYM) == 7
    assert value(data, "cryptoflow_rest_requests_total", **SYM) == 2
    assert value(data, "cryptoflow_rest_weight_sent_total", **SYM) == 7
    assert value(data, "cryptoflow_rest_throttles_total", **SYM) == 1
    assert value(data, "cryptoflow_rest_bans_total", **SYM) == 0
    assert value(data, "cryptoflow_rest_venue_used_weight", **SYM) == 17
    assert 29 < value(data, "cryptoflow_rest_blocked_seconds", **SYM) <= 30


async def test_weight_used_is_the_last_minute_beside_the_per_minute_limit(autojump_clock):
    """A budget paced in the venue's 2 s window (OKX) and spent to its safety share for
    30 s: the used gauge is the weight of the last 60 s, comparable with the per-minute
    limit, not the 2 s pacing window (which read as ~3 % of the limit)."""
    budget = RateBudget(1200, safety=0.8, window=2.0, name="okx/main")
    result = RunResult(shards={"okx/main": ShardStats(budget=budget)})
    registry, _ = build_registry(lambda: result)
    from prometheus_client import generate_latest

    okx = {"exchange": "okx", "shard": "main"}
    t0 = trio.current_time()
    while trio.current_time() - t0 < 30:
        await budget.acquire(1)
    data = samples(generate_latest(registry).decode())
    assert value(data, "cryptoflow_rest_weight_limit", **okx) == 1200
    used = value(data, "cryptoflow_rest_weight_used", **okx)
    assert used == budget.stats.weight_sent >= 0.8 * 1200 / 2 * 0.95  # ~half a minute's
    await trio.sleep(45)  # the first 15 s of sends are now older than 60 s
    data = samples(generate_latest(registry).decode())
    assert 0 < value(data, "cryptoflow_rest_weight_used", **okx) < used
    await trio.sleep(60)
    data = samples(generate_latest(registry).decode())
    assert value(data, "cryptoflow_rest_weight_used", **okx) == 0


def test_collector_without_proposed_fields_and_outside_trio():
    """A fresh WriterStats (nothing written yet), no RunResult yet, no trio run."""
    result, _send = make_result(WriterStats())
    registry, _ = build_registry(lambda: result)
    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    assert (
        'cryptoflow_symbol_rows_total{dataset="deltas",exchange="binance",symbol="BTCUSDT"} 0.0'
        in text
    )
    assert "cryptoflow_upload_seconds_count 0.0" in text
    assert "cryptoflow_rest_weight_used{" not in text  # needs the trio clock
    assert 'cryptoflow_rest_weight_limit{exchange="binance",shard="main"} 2400.0' in text
    empty, _ = build_registry(lambda: None)
    assert "cryptoflow_messages_total" in generate_latest(empty).decode()  # HELP/TYPE only


def test_the_metrics_documented_are_the_metrics_a_run_emits(tmp_path: Path):
    """Found by an audit: the module docstring listed `cryptoflow_flush_seconds` and
    `cryptoflow_flush_seconds_max`, which no run emits (the writer does not time its
    flushes). A scrape over the real WriterStats, with a spool, emits exactly the
    families the docstring names."""
    import re

    from prometheus_client import generate_latest

    from cryptoflow.ops import metrics

    result, _send = make_result(WriterStats())
    registry, _ = build_registry(lambda: result, spool=Spool(tmp_path / "s", max_bytes=10))
    text = generate_latest(registry).decode()
    emitted = set(re.findall(r"^# TYPE (cryptoflow_\w+)", text, re.M))
    documented = set(re.findall(r"cryptoflow_\w+", metrics.__doc__ or ""))
    assert documented == emitted


def test_freshness_prefers_receive_time_and_tracks_counter_moves():
    now = [100.0]
    wall = [10_000_000_000_000]
    fresh = Freshness(clock=lambda: now[0], wall_ns=lambda: wall[0])
    result, _send = make_result()
    (btc,) = [v for v in iter_symbols(result) if v.symbol == "BTCUSDT"]
    assert fresh.age(btc, "deltas") == 0.0  # first sight
    now[0] = 130.0
    assert fresh.age(btc, "deltas") == 30.0  # counter did not move
    btc.messages["deltas"] += 1
    assert fresh.age(btc, "deltas") == 0.0
    btc.receive_ns["deltas"] = wall[0] - 5_000_000_000
    assert fresh.age(btc, "deltas") == 5.0


def test_check_health_with_receive_times_and_spool(tmp_path: Path):
    result, _send = make_result()
    sync = result.shards["binance/main"].normalizer.syncs()[("binance", "BTCUSDT")]
    wall = time.time_ns()
    sync.last_diff_receive_ns = wall - 90 * 10**9  # the proposed BookSync attribute
    fresh = Freshness(wall_ns=lambda: wall)
    reasons = check_health(result, stale_after=60.0, freshness=fresh)
    assert [(r["reason"], r["symbol"], r["lane"]) for r in reasons] == [
        ("stale", "BTCUSDT", "deltas")
    ]
    assert reasons[0]["age_seconds"] == 90.0
    sync.last_diff_receive_ns = wall - 10 * 10**9
    assert check_health(result, stale_after=60.0, freshness=fresh) == []
    # ETHUSDT has no poller: its snapshots lane (resyncs only) is never judged stale
    eth = result.shards["binance/main"].normalizer.syncs()[("binance", "ETHUSDT")]
    eth.last_snapshot_receive_ns = wall - 3600 * 10**9
    eth.last_diff_receive_ns = wall
    assert check_health(result, stale_after=60.0, freshness=fresh) == []
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    spool.write("deltas/x.parquet", b"x" * 100)
    assert check_health(result, spool=spool, freshness=fresh) == []
    spool.max_bytes = 50
    (r,) = check_health(result, spool=spool, freshness=fresh)
    assert r == {"reason": "spool_over_limit", "bytes": 100, "max_bytes": 50}
    result.writer.backpressure = True
    spool.max_bytes = 1000
    assert [r["reason"] for r in check_health(result, spool=spool, freshness=fresh)] == [
        "writer_backpressure"
    ]
    # the spool refuses before it passes its limit: the writer's state says it is full
    result.writer.backpressure = False
    result.writer.spool_refusing = True
    assert [r["reason"] for r in check_health(result, spool=spool, freshness=fresh)] == [
        "spool_full"
    ]


async def test_http_metrics_and_healthz(mock_clock, tmp_path: Path):
    result, _send = make_result()
    holder: dict = {"result": None}  # the run result appears later, as in collect_main
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(
                serve_ops, lambda: holder["result"], port=0, stale_after=60.0, spool=spool
            )
        )
        assert port > 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/healthz")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            r = await client.get("/metrics")
            assert r.status_code == 200 and "cryptoflow_messages_total" in r.text

            holder["result"] = result
            r = await client.get("/metrics")
            assert r.headers["content-type"].startswith("text/plain")
            check_counters(samples(r.text))
            r = await client.get("/healthz")  # first sight of the counters
            assert r.status_code == 200

            # counters move, then nothing for 61 s: stale
            normalizer = result.shards["binance/main"].normalizer
            normalizer.feed(diff(41, 45, 40))
            mock_clock.jump(30)
            assert (await client.get("/healthz")).status_code == 200
            mock_clock.jump(61)
            r = await client.get("/healthz")
            assert r.status_code == 503
            body = r.json()
            assert body["status"] == "unhealthy"
            stale = {(x["symbol"], x["lane"]) for x in body["reasons"]}
            assert ("BTCUSDT", "deltas") in stale and ("ETHUSDT", "deltas") in stale
            assert ("BTCUSDT", "snapshots") in stale  # polled: snapshots must keep coming
            assert ("SOLUSDT", "deltas") not in stale  # never received data
            data = samples((await client.get("/metrics")).text)
            age = value(
                data,
                "cryptoflow_last_event_age_seconds",
                **SYM,
                symbol="BTCUSDT",
                lane="deltas",
            )
            assert age == pytest.approx(61.0)
            assert value(data, "cryptoflow_spool_max_bytes") == 1000

            # data flows again -> healthy; then the spool goes over its limit -> 503
            normalizer.feed(diff(46, 50, 45))
            normalizer.feed(diff(61, 70, 60, symbol="ETHUSDT"))
            normalizer.feed(snapshot(50))
            normalizer.feed(snapshot(70, symbol="ETHUSDT"))
            assert (await client.get("/healthz")).status_code == 200
            spool.write("deltas/y.parquet", b"y" * 200)
            spool.max_bytes = 100
            r = await client.get("/healthz")
            assert r.status_code == 503
            assert r.json()["reasons"] == [
                {"reason": "spool_over_limit", "bytes": 200, "max_bytes": 100}
            ]

            assert (await client.get("/nope")).status_code == 404
            assert (await client.post("/metrics")).status_code == 405
            r = await client.head("/healthz")
            assert r.status_code == 503 and r.content == b""
        nursery.cancel_scope.cancel()


async def test_livez_stays_ok_while_healthz_is_unhealthy(mock_clock, tmp_path: Path):
    """Liveness (what restarts the pod) must not follow /healthz: one stale symbol or a
    full spool is a 503 there, and a restart would gap every symbol for it."""
    result, _send = make_result()
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_ops, lambda: result, port=0, stale_after=60.0, spool=spool)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/healthz")).status_code == 200  # first sight
            mock_clock.jump(61)  # every symbol that had data goes stale
            r = await client.get("/healthz")
            assert r.status_code == 503
            assert {x["reason"] for x in r.json()["reasons"]} == {"stale"}
            r = await client.get("/livez")
            assert r.status_code == 200 and r.json() == {"status": "alive"}
            # the writer held up by a full spool: still alive
            result.writer.spool_refusing = True
            result.writer.backpressure = True
            assert (await client.get("/healthz")).status_code == 503
            assert (await client.get("/livez")).status_code == 200
            r = await client.head("/livez")
            assert r.status_code == 200 and r.content == b""
            assert (await client.post("/livez")).status_code == 405
        nursery.cancel_scope.cancel()


def refused_and_silent_result(started: float) -> RunResult:
    """binance/main runs both lanes for three symbols since `started`: BTCUSDT gets data
    on both, ETHUSDT only polls (the venue refused its subscription), SOLUSDT nothing (no
    stats of its own yet: its connection never opened, every poll failed)."""
    shard = ShardStats(
        polls={"BTCUSDT": PollStats(), "ETHUSDT": PollStats(), "SOLUSDT": PollStats(failed=3)},
        normalizer=Normalizer({"binance": RULES}),
        symbols=("BTCUSDT", "ETHUSDT", "SOLUSDT"),
        lanes=("deltas", "snapshots"),
        started=started,
    )
    return RunResult(writer=WriterStats(), shards={"binance/main": shard})


async def test_healthz_judges_lanes_that_never_received(mock_clock):
    """A lane that never received anything was never judged: a shard whose connection
    never opens or a refused subscription left /healthz 200 while nothing of it was
    recorded. Once `stale_after` has passed since the shard started, each such lane is
    a `never_received` reason of its own; /livez does not follow."""
    result = refused_and_silent_result(trio.current_time())
    normalizer = result.shards["binance/main"].normalizer
    last = [0]

    def data_flows() -> None:  # BTCUSDT: diffs and polls; ETHUSDT: polls only
        last[0] += 10
        normalizer.feed(diff(last[0] + 1, last[0] + 10, last[0]))
        normalizer.feed(snapshot(last[0] + 5))
        normalizer.feed(snapshot(last[0] + 5, symbol="ETHUSDT"))

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(serve_ops, lambda: result, port=0, stale_after=60.0)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            data_flows()
            assert (await client.get("/healthz")).status_code == 200
            mock_clock.jump(59)
            data_flows()
            assert (await client.get("/healthz")).status_code == 200  # within the grace
            mock_clock.jump(2)
            data_flows()
            r = await client.get("/healthz")
            assert r.status_code == 503
            reasons = r.json()["reasons"]
            assert {(x["reason"], x["symbol"], x["lane"]) for x in reasons} == {
                ("never_received", "ETHUSDT", "deltas"),
                ("never_received", "SOLUSDT", "deltas"),
                ("never_received", "SOLUSDT", "snapshots"),
            }
            assert reasons[0] == {
                "reason": "never_received",
                "exchange": "binance",
                "shard": "main",
                "symbol": "ETHUSDT",
                "lane": "deltas",
                "waited_seconds": 61.0,
                "stale_after": 60.0,
            }
            r = await client.get("/livez")
            assert r.status_code == 200 and r.json() == {"status": "alive"}

            # SOLUSDT's connection opens and ETHUSDT's subscription goes through
            normalizer.feed(snapshot(100, symbol="SOLUSDT"))
            normalizer.feed(diff(101, 110, 100, symbol="SOLUSDT"))
            normalizer.feed(diff(last[0] + 11, last[0] + 20, last[0] + 10, symbol="ETHUSDT"))
            assert (await client.get("/healthz")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_bad_request_does_not_kill_server():
    app_result, _send = make_result()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(serve_ops, lambda: app_result, port=0))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"\x00garbage\r\n\r\n")
        with trio.fail_after(5):
            while await stream.receive_some(1024):
                pass
        await stream.aclose()
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{port}/healthz")
            assert r.status_code == 200
        nursery.cancel_scope.cancel()


async def test_ops_app_routes_without_server():
    result, _send = make_result()
    app = OpsApp(lambda: result)
    status, _ctype, body = app.handle("GET", "/healthz?verbose=1")
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert app.handle("GET", "/")[0] == 200
