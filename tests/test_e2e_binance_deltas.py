"""End to end: the collector (`runtime.collect_main`) against the simulator, real sockets.

Each test starts `open_simulator` on 127.0.0.1, points a tmp copy of `configs/` at it
(small shards, short intervals), runs the whole collector (readers, normalizer, writer,
local store) in the same trio run, injects faults through `sim.faults`, stops it
gracefully and reads the Parquet it wrote. Real time throughout (the writer encodes and
fsyncs in threads, so a MockClock would jump under it); every test is a few seconds.

Live state is reached through a spy on `runtime.run_shard` (the shard's `ShardStats`:
normalizer, stream and poll stats, raw channel) and a wrapper around `runtime.run_writer`
(its live `WriterStats`, optionally a slow input).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import resource
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import httpx
import polars as pl
import pytest
import trio
from ruamel.yaml import YAML

from cryptoflow import runtime
from cryptoflow.book.sync import BookState, BookSync
from cryptoflow.config import load_settings
from cryptoflow.config_schema import Settings
from cryptoflow.pipeline.writer import WriterStats
from cryptoflow.sim import open_simulator
from cryptoflow.tools import book as book_tool

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYMS = ["BTCUSDT", "ETHUSDT"]
SIM = {"tick_interval": 0.02, "ping_interval": None, "depth": 100, "seed": 3}

pytestmark = pytest.mark.slow


# --- settings -----------------------------------------------------------------------------


def make_settings(
    tmp_path: Path,
    sim: Any,
    *,
    symbols: list[str] = SYMS,
    reader: dict | None = None,
    binance: dict | None = None,
    channels: dict | None = None,
) -> Settings:
    """A tmp copy of configs/ pointed at `sim`, with one shard serving `symbols`."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(CONFIGS / "symbols.yml", folder / "symbols.yml")
    yaml = YAML(typ="safe")
    cfg = yaml.load(CONFIGS / "config.yml")
    cfg["cryptoflow"]["exchanges"] = ["binance"]
    cfg["cryptoflow"]["shutdown_timeout"] = 10.0
    cfg["reader"].update(
        {
            "snapshot_interval": 1.0,
            "jitter": 0.0,
            "request_timeout": 3.0,
            "backoff_initial": 0.05,
            "backoff_max": 0.3,
            "ws_stall_timeout": 5.0,
            **(reader or {}),
        }
    )
    cfg["source"]["binance"].update(
        {
            "depth_limit": 100,  # the simulator runs with depth=100: snapshot = full book
            "snapshot_interval": 1.0,
            "stream_speed": "100ms",
            "rest_url": sim.rest_url,
            "ws_url": sim.ws_url,
            **(binance or {}),
        }
    )
    cfg["channels"].update(channels or {})
    cfg["storage"]["local_path"] = str(tmp_path / "out")
    cfg["storage"]["spool"]["path"] = str(tmp_path / "spool")
    cfg["writer"]["buffer"].update(
        snapshot_flush_interval=0.5, delta_flush_interval=0.2, gap_flush_interval=0.2
    )
    yaml.default_flow_style = False
    with (folder / "config.yml").open("w") as f:
        yaml.dump(cfg, f)
    with (folder / "ip_shards.yml").open("w") as f:
        yaml.dump(
            {"shards": [{"name": "main", "source_ip": None, "symbols": {"binance": symbols}}]}, f
        )
    (folder / ".env").write_text("")
    return load_settings(folder / "config.yml", env={}, env_file=folder / ".env")


# --- running the collector ------------------------------------------------------------------


@attrs.define
class Run:
    out: Path
    stop: runtime.StopControl | None = None
    shard: runtime.ShardStats | None = None
    writer: WriterStats = attrs.field(factory=WriterStats)
    result: runtime.RunResult | None = None
    rows_channel: Any = None

    def sync(self, symbol: str) -> BookSync:
        assert self.shard is not None and self.shard.normalizer is not None
        return self.shard.normalizer.syncs()[("binance", symbol)]

    def synced(self, symbol: str) -> bool:
        if self.shard is None or self.shard.normalizer is None:
            return False
        s = self.shard.normalizer.syncs().get(("binance", symbol))
        return s is not None and s.state is BookState.SYNCED


class SlowInput:
    """The writer's input channel, slowed down while `delay` > 0 (a slow writer)."""

    def __init__(self, inner: trio.MemoryReceiveChannel) -> None:
        self.inner = inner
        self.delay = 0.0

    async def receive(self) -> Any:
        if self.delay:
            await trio.sleep(self.delay)
        return await self.inner.receive()

    def receive_nowait(self) -> Any:
        if self.delay:  # slow: one batch per `delay`, never a queued one at once
            raise trio.WouldBlock
        return self.inner.receive_nowait()

    async def __aenter__(self) -> SlowInput:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def collector(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, slow: bool = False
) -> AsyncIterator[Run]:
    """Run collect_main until the block ends, then stop it gracefully (bounded)."""
    run = Run(out=tmp_path / "out")
    real_shard, real_writer = runtime.run_shard, runtime.run_writer

    async def spy_shard(plan, settings, rows_send, stop, stats, *args, **kwargs):  # type: ignore[no-untyped-def]
        run.shard = stats
        await real_shard(plan, settings, rows_send, stop, stats, *args, **kwargs)

    async def spy_writer(rows_recv, *args, **kwargs):  # type: ignore[no-untyped-def]
        run.rows_channel = SlowInput(rows_recv) if slow else rows_recv
        if kwargs.get("stats") is not None:
            run.writer = kwargs["stats"]
        else:
            kwargs["stats"] = run.writer
        return await real_writer(run.rows_channel, *args, **kwargs)

    monkeypatch.setattr(runtime, "run_shard", spy_shard)
    monkeypatch.setattr(runtime, "run_writer", spy_writer)
    plans = runtime.build_plans(settings, ["binance"], settings.shards)
    assert plans and plans[0].ws_url.startswith("ws://127.0.0.1")

    async def main(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        run.result = await runtime.collect_main(
            settings,
            plans,
            output=run.out,
            duration=None,
            simulate=False,
            install_signal_handlers=False,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        run.stop = await nursery.start(main)
        try:
            yield run
        finally:
            run.stop.stop("test done")
        with trio.fail_after(15):
            while run.result is None:
                await trio.sleep(0.02)


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    with trio.move_on_after(timeout):
        while not cond():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what or cond}")


async def synced(run: Run, symbols: list[str] = SYMS) -> None:
    await wait_for(lambda: all(run.synced(s) for s in symbols), what="initial sync")


async def settle(sim: Any, pause: float = 0.4) -> dict[str, dict]:
    """Freeze the simulator's books, let the last events arrive; their final state."""
    sim.pause()
    await trio.sleep(pause)
    return {s: sim.book(s) for s in sim.symbols}


# --- reading what was stored ----------------------------------------------------------------


def read(out: Path, dataset: str, symbol: str | None = None) -> pl.DataFrame:
    files = [
        p
        for p in sorted(out.rglob("*.parquet"))
        if dataset in p.parts[len(out.parts) :][:2]
        and (symbol is None or f"symbol={symbol}" in p.parts)
    ]
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(p, hive_partitioning=False) for p in files])


def messages(deltas: pl.DataFrame) -> list[tuple[int, int, int]]:
    """(first, last, prev) update ids of the stored diffs, in arrival order."""
    return (
        deltas.group_by("first_update_id", "last_update_id", "prev_update_id")
        .agg(t=pl.col("receive_time").min())
        .sort("t", "last_update_id")
        .select("first_update_id", "last_update_id", "prev_update_id")
        .rows()
    )


def holes(msgs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """(last good id, first id after) for every diff that does not continue the previous."""
    out = []
    for (_, last, _), (first, _, prev) in itertools.pairwise(msgs):
        if prev != last:
            out.append((last, first))
    return out


def gaps_of(out: Path, symbol: str | None = None) -> list[dict]:
    """The stored gap rows but the `start` row each symbol gets when collection starts
    (checked by `starts_of`): the tests here are about breaks."""
    g = read(out, "gaps", symbol)
    return [r for r in g.sort("detected_at").to_dicts() if r["kind"] != "start"]


def starts_of(out: Path) -> dict[str, int]:
    """`start` rows per symbol."""
    g = read(out, "gaps", None)
    if g.is_empty():
        return {}
    rows = g.filter(pl.col("kind") == "start")
    return dict(Counter(rows["symbol"].to_list()))


def kinds(gaps: list[dict]) -> list[str]:
    return [g["kind"] for g in gaps]


def decimal_side(levels: dict) -> dict[Decimal, Decimal]:
    return {Decimal(str(p)): Decimal(str(q)) for p, q in levels.items()}


def stored_side(df: pl.DataFrame, side: str) -> dict[Decimal, Decimal]:
    """price -> quantity of one side of stored rows (floats) as decimals."""
    rows = df.filter(side=side).select("price", "quantity").rows()
    return {Decimal(str(p)): Decimal(str(q)) for p, q in rows}


def own_rebuild(out: Path, symbol: str, snapshot_id: int) -> tuple[dict, dict, int]:
    """Book = stored snapshot `snapshot_id` + every stored diff after it, checked to chain."""
    snaps = read(out, "snapshots", symbol).filter(pl.col("last_update_id") == snapshot_id)
    snaps = snaps.filter(pl.col("receive_time") == snaps["receive_time"].min())
    bids, asks = stored_side(snaps, "bid"), stored_side(snaps, "ask")
    deltas = read(out, "deltas", symbol).filter(pl.col("last_update_id") > snapshot_id)
    msgs = sorted(
        set(deltas.select("first_update_id", "last_update_id", "prev_update_id").rows()),
        key=lambda m: m[1],
    )
    assert msgs, "no diffs after the snapshot"
    assert msgs[0][0] <= snapshot_id + 1 <= msgs[0][1] + 1, (snapshot_id, msgs[0])
    assert holes(msgs) == []
    for side, price, qty in (
        deltas.unique(["last_update_id", "side", "price"], keep="first", maintain_order=True)
        .sort("last_update_id", maintain_order=True)
        .select("side", "price", "quantity")
        .iter_rows()
    ):
        book = bids if side == "bid" else asks
        if qty == 0:
            book.pop(Decimal(str(price)), None)
        else:
            book[Decimal(str(price))] = Decimal(str(qty))
    return bids, asks, msgs[-1][1]


# --- WebSocket faults -----------------------------------------------------------------------


async def test_ws_drop_one_break_then_resync_and_rebuilt_book_equals_simulator(
    tmp_path, monkeypatch, caplog
):
    """A dropped event is a real hole: exactly one sequence_break naming it, then a resync
    gap; later diffs continue; the book rebuilt from the Parquet equals the simulator's.
    The break is a WARNING; the resync, the heal, an INFO line saying what healed (it
    was a WARNING with an empty reason, row and line alike)."""
    caplog.set_level(logging.INFO, logger="cryptoflow.runtime")
    async with open_simulator(symbols=SYMS, **SIM) as sim:
        settings = make_settings(tmp_path, sim)
        async with collector(settings, tmp_path, monkeypatch) as run:
            await synced(run)
            await trio.sleep(0.3)
            sim.faults.add("ws_drop", symbol="BTCUSDT")
            await wait_for(lambda: run.sync("BTCUSDT").counters.resyncs == 1, what="resync")
            assert run.synced("BTCUSDT")
            await trio.sleep(1.6)  # diffs continue; a poll snapshot lands after the resync
            final = await settle(sim)
        btc = run.sync("BTCUSDT")
    assert sim.faults.applied["ws_drop"] == 1
    assert sim.stats.symbols["BTCUSDT"].ws_drops == 1

    out = run.out
    stored = messages(read(out, "deltas", "BTCUSDT"))
    hole = holes(stored)
    assert len(hole) == 1 and hole[0][1] > hole[0][0] + 1  # ids really missing
    gaps = gaps_of(out)
    assert {g["symbol"] for g in gaps} == {"BTCUSDT"}
    assert kinds(gaps) == ["sequence_break", "resync"]
    brk, res = gaps
    assert (brk["last_good_id"], brk["first_id_after"]) == hole[0]
    assert res["last_good_id"] == brk["last_good_id"]
    assert res["first_id_after"] >= brk["first_id_after"] - 1
    assert res["detected_at"] >= brk["detected_at"]
    snaps = read(out, "snapshots", "BTCUSDT")
    assert res["first_id_after"] in set(snaps.filter(source="resync")["last_update_id"])
    assert res["reason"] == (
        f"healed: book re-anchored on resync snapshot {res['first_id_after']} "
        f"after the break at {brk['last_good_id']}"
    )
    said = [(r.levelname, r.getMessage()) for r in caplog.records if ": gap (" in r.getMessage()]
    assert said == [
        ("WARNING", f"binance/BTCUSDT: gap (sequence_break): {brk['reason']}"),
        ("INFO", f"binance/BTCUSDT: gap (resync): {res['reason']}"),
    ]
    assert holes(messages(read(out, "deltas", "ETHUSDT"))) == []

    # the book recovered and follows the stream to the simulator's final state
    for sym in SYMS:
        assert run.sync(sym).book_id == final[sym]["lastUpdateId"]
    assert btc.counters.breaks == 1 and btc.counters.resyncs == 1
    assert stored[-1][1] == final["BTCUSDT"]["lastUpdateId"]

    want_bids = decimal_side(final["BTCUSDT"]["bids"])
    want_asks = decimal_side(final["BTCUSDT"]["asks"])
    # (1) cryptoflow book at the last stored delta (latest snapshot + later deltas)
    last_ts = int(read(out, "deltas", "BTCUSDT")["timestamp"].dt.epoch("ms").max())
    df, facts = book_tool.rebuild(out, "binance", "BTCUSDT", last_ts)
    assert facts["last_update_id"] == final["BTCUSDT"]["lastUpdateId"] and facts["messages"] > 0
    assert stored_side(df, "bid") == want_bids and stored_side(df, "ask") == want_asks
    # (2) own rebuild from the resync snapshot across every diff stored after it
    bids, asks, last = own_rebuild(out, "BTCUSDT", res["first_id_after"])
    assert last == final["BTCUSDT"]["lastUpdateId"]
    assert bids == want_bids and asks == want_asks


async def one_fault(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    *,
    count: int = 1,
    after: float = 0.8,
    reader: dict | None = None,
    sim_opts: dict | None = None,
    **params: Any,
) -> tuple[Any, Run, dict[str, dict]]:
    """Sync, inject `kind`, wait until applied + `after`, freeze; (sim, run, final books)."""
    async with open_simulator(symbols=SYMS, **{**SIM, **(sim_opts or {})}) as sim:
        settings = make_settings(tmp_path, sim, reader=reader)
        async with collector(settings, tmp_path, monkeypatch) as run:
            await synced(run)
            await trio.sleep(0.2)
            sim.faults.add(kind, count=count, **params)
            await wait_for(lambda: sim.faults.applied[kind] >= count, what=kind)
            await trio.sleep(after)
            final = await settle(sim)
    return sim, run, final


def assert_recovered(run: Run, final: dict[str, dict]) -> None:
    """Every book followed the stream to the simulator's final state."""
    for sym in final:
        assert run.synced(sym), sym
        assert run.sync(sym).book_id == final[sym]["lastUpdateId"], sym


async def test_ws_duplicate_is_dropped_without_a_gap(tmp_path, monkeypatch):
    """book/sync.py: exact duplicates (same first/last id, not continuing) are dropped and
    counted, never written twice, and are not a break."""
    _sim, run, final = await one_fault(tmp_path, monkeypatch, "ws_duplicate", symbol="BTCUSDT")
    btc = run.sync("BTCUSDT")
    assert btc.counters.duplicates == 1
    assert btc.counters.breaks == 0 and btc.counters.resyncs == 0
    assert gaps_of(run.out) == []
    # where collection began, one row per symbol (a restart's downtime shows there)
    assert starts_of(run.out) == {"BTCUSDT": 1, "ETHUSDT": 1}
    stored = messages(read(run.out, "deltas", "BTCUSDT"))
    assert len(stored) == len(set(stored)) and holes(stored) == []
    assert_recovered(run, final)


async def test_ws_out_of_order_is_a_gap_then_resync(tmp_path, monkeypatch):
    """A swapped pair: the later event arrives first (a sequence break), the held one
    after it (older than the chain: a break that does not move the chain back). Both are
    stored; the book resyncs once; no id is missing from the stored diffs."""
    _sim, run, final = await one_fault(tmp_path, monkeypatch, "ws_out_of_order", symbol="BTCUSDT")
    gaps = gaps_of(run.out)
    assert {g["symbol"] for g in gaps} == {"BTCUSDT"}
    breaks = [g for g in gaps if g["kind"] == "sequence_break"]
    assert breaks and kinds(gaps)[-1] == "resync" and kinds(gaps).count("resync") == 1
    assert any("out of order" in g["reason"] for g in breaks)
    stored = messages(read(run.out, "deltas", "BTCUSDT"))
    assert (breaks[0]["last_good_id"], breaks[0]["first_id_after"]) == holes(stored)[0]
    by_id = sorted(set(stored), key=lambda m: m[1])
    assert holes(by_id) == []  # nothing lost: sorted by id, the stored stream is whole
    assert run.sync("BTCUSDT").counters.resyncs == 1
    assert_recovered(run, final)


@pytest.mark.parametrize(
    ("kind", "params", "stat", "cause"),
    [
        (  # a close frame, as a venue sends before maintenance
            "ws_close",
            {"code": 1001, "reason": "service maintenance"},
            "closed_by_fault",
            "WsClosed: WebSocket closed (1001: service maintenance)",
        ),
        (  # the TCP connection ends without one
            "ws_abort",
            {},
            "aborted_by_fault",
            "WsClosed: WebSocket closed (1006: connection closed without a close frame)",
        ),
    ],
)
async def test_ws_close_reconnects_with_reconnect_gap(
    tmp_path, monkeypatch, caplog, kind, params, stat, cause
):
    """The simulator ends the connection both symbols share instead of sending an event,
    so that event (and the ticks until the new subscription) are lost: the stream does
    not continue across the reconnect, which is a `reconnect` gap (not sequence_break)
    naming the hole and the cause, then a resync. The reader reconnects itself (no
    crash/restart). A close frame's code and reason reach the gap row and the log line
    (the simulator used to drop TCP without the frame whenever another stream of the
    connection sent meanwhile: a 1006 with no reason); a connection that ends without
    one is a 1006."""
    caplog.set_level(logging.INFO, logger="cryptoflow")
    sim, run, final = await one_fault(
        tmp_path, monkeypatch, kind, symbol="BTCUSDT", after=1.2, **params
    )
    assert sim.stats.ws[stat] == 1
    (stream,) = run.shard.streams
    assert stream.connects == 2 and stream.disconnects == 1
    assert stream.last_error == cause
    lost = [r.getMessage() for r in caplog.records if "stream lost" in r.getMessage()]
    assert len(lost) == 1 and f"stream lost ({cause}); reconnecting in" in lost[0], lost
    assert_reconnect_gaps(run, cause)
    assert holes(messages(read(run.out, "deltas", "BTCUSDT")))  # BTC's event was lost
    assert not any("crashed" in r.getMessage() for r in caplog.records)
    assert_recovered(run, final)


def assert_reconnect_gaps(run: Run, cause: str) -> None:
    """Per symbol: the stream continued across the reconnect (no gap at all), or it did
    not and there is one `reconnect` gap naming the hole and the cause, then a resync."""
    for sym in SYMS:
        gaps = gaps_of(run.out, sym)
        stored = messages(read(run.out, "deltas", sym))
        if not holes(stored):
            assert gaps == [], sym
            continue
        assert kinds(gaps) == ["reconnect", "resync"], sym
        assert (gaps[0]["last_good_id"], gaps[0]["first_id_after"]) == holes(stored)[0]
        assert cause in gaps[0]["reason"], gaps[0]["reason"]


async def test_ws_stall_longer_than_stall_timeout_reconnects(tmp_path, monkeypatch, caplog):
    """No message for reader.ws_stall_timeout on the connection -> reconnect. Stall is
    detected per connection, so both streams of the connection are stalled here."""
    _sim, run, final = await one_fault(
        tmp_path,
        monkeypatch,
        "ws_stall",
        count=len(SYMS),
        seconds=1.5,
        reader={"ws_stall_timeout": 0.5},
        after=1.5,
    )
    (stream,) = run.shard.streams
    assert stream.connects == 2 and stream.disconnects == 1
    assert "stalled" in stream.last_error
    assert_reconnect_gaps(run, "stalled")
    assert "reconnect" in kinds(gaps_of(run.out))
    assert not any("crashed" in r.getMessage() for r in caplog.records)
    assert_recovered(run, final)


async def test_ws_malformed_frame_is_counted_and_skipped(tmp_path, monkeypatch, caplog):
    """A non-JSON frame is logged and counted; no crash, no reconnect; nothing was lost
    (the event follows it), so there is no gap."""
    caplog.set_level(logging.WARNING, logger="cryptoflow.stream")
    _sim, run, final = await one_fault(tmp_path, monkeypatch, "ws_malformed", symbol="BTCUSDT")
    (stream,) = run.shard.streams
    assert stream.malformed == 1 and stream.connects == 1 and stream.disconnects == 0
    assert any("malformed frame skipped" in r.getMessage() for r in caplog.records)
    assert gaps_of(run.out) == []
    assert holes(messages(read(run.out, "deltas", "BTCUSDT"))) == []
    assert_recovered(run, final)


async def test_ws_server_ping_is_answered(tmp_path, monkeypatch):
    sim, run, final = await one_fault(tmp_path, monkeypatch, "ws_ping", symbol="BTCUSDT")
    assert sim.stats.ws["pings_sent"] == 1
    assert sim.stats.ws["pongs_received"] == 1 and sim.stats.ws["pings_unanswered"] == 0
    (stream,) = run.shard.streams
    assert stream.connects == 1
    assert gaps_of(run.out) == []
    assert_recovered(run, final)


# --- overload -------------------------------------------------------------------------------


async def test_slow_writer_overload_bounded_gap_records_then_resync(tmp_path, monkeypatch, caplog):
    """Tiny channels and a writer that takes 0.3 s per batch: the WebSocket reader never
    waits, queues stay within capacity, dropped stretches become `consumer_overload`
    gaps naming the hole, nothing crashes, and each symbol resyncs once there is room."""
    caplog.set_level(logging.WARNING)
    raw_cap, rows_cap = 4, 2
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    depth = {"raw": 0, "rows": 0}
    async with open_simulator(symbols=SYMS, **SIM) as sim:
        settings = make_settings(
            tmp_path, sim, channels={"raw_capacity": raw_cap, "rows_capacity": rows_cap}
        )
        async with collector(settings, tmp_path, monkeypatch, slow=True) as run:
            await synced(run)

            async def sample() -> None:
                while True:
                    depth["raw"] = max(
                        depth["raw"], run.shard.raw_channel.statistics().current_buffer_used
                    )
                    depth["rows"] = max(
                        depth["rows"],
                        run.rows_channel.inner.statistics().current_buffer_used,
                    )
                    await trio.sleep(0.005)

            async with trio.open_nursery() as n:
                n.start_soon(sample)
                run.rows_channel.delay = 0.3  # the writer is slow now
                await wait_for(lambda: run.shard.streams[0].dropped >= 10, what="drops")
                await trio.sleep(0.5)
                run.rows_channel.delay = 0.0  # room again
                await wait_for(
                    lambda: all(run.sync(s).counters.resyncs >= 1 and run.synced(s) for s in SYMS),
                    what="resync after overload",
                )
                await trio.sleep(0.3)
                n.cancel_scope.cancel()
            final = await settle(sim)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    assert run.result is not None and run.result.stop_reason == "test done"
    assert not any("crashed" in r.getMessage() for r in caplog.records)
    (stream,) = run.shard.streams
    assert stream.dropped >= 10 and stream.disconnects == 0
    assert 0 < depth["raw"] <= raw_cap and 0 < depth["rows"] <= rows_cap
    writer = run.writer
    assert writer.max_buffered_rows_seen <= settings.app.writer.buffer.max_rows * 2
    assert rss_after - rss_before < 200 * 1024  # KiB: no unbounded growth
    said = 0  # the drops the gap rows name add up to the drops (they used to say fewer)
    for sym in SYMS:
        gaps = gaps_of(run.out, sym)
        assert set(kinds(gaps)) <= {"consumer_overload", "resync"}, sym
        assert kinds(gaps)[0] == "consumer_overload" and kinds(gaps)[-1] == "resync", sym
        overloads = [g for g in gaps if g["kind"] == "consumer_overload"]
        said += sum(int(re.search(r"dropped (\d+) messages", g["reason"])[1]) for g in overloads)
        stored_holes = holes(messages(read(run.out, "deltas", sym)))
        assert stored_holes, sym
        assert [(g["last_good_id"], g["first_id_after"]) for g in overloads] == stored_holes
    assert said == stream.dropped
    assert_recovered(run, final)


# --- REST faults on the snapshot lane ---------------------------------------------------------


async def test_rest_errors_are_logged_counted_and_polling_goes_on(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="cryptoflow.poller")
    faults = [
        ("rest_5xx", "HTTP 503"),
        ("rest_malformed", "invalid JSON"),
        ("rest_missing_fields", "lastUpdateId"),
    ]
    async with open_simulator(symbols=SYMS, **SIM) as sim:
        settings = make_settings(tmp_path, sim, binance={"snapshot_interval": 0.2})
        async with collector(settings, tmp_path, monkeypatch) as run:
            await synced(run)
            for kind, _ in faults:
                sim.faults.add(kind, symbol="BTCUSDT", path="/fapi/v1/depth")
                await wait_for(lambda kind=kind: sim.faults.applied[kind] == 1, what=kind)
            ok_after_faults = run.shard.polls["BTCUSDT"].ok
            await trio.sleep(0.7)
            final = await settle(sim, 0.3)
    btc, eth = run.shard.polls["BTCUSDT"], run.shard.polls["ETHUSDT"]
    # the 503 failed; the two bad bodies came (ok) and were found malformed when parsed
    assert btc.failed == 1 and btc.malformed == 2 and btc.throttled == eth.throttled == 0
    assert eth.failed == eth.malformed == 0
    assert btc.ok > ok_after_faults  # still polling
    assert eth.ok >= btc.ok - 1
    failed = [r.getMessage() for r in caplog.records if "snapshot failed" in r.getMessage()]
    assert len(failed) == 3
    for (_, reason), msg in zip(faults, failed, strict=True):
        assert "binance/BTCUSDT" in msg and reason in msg, msg
    assert gaps_of(run.out) == []
    snaps = read(run.out, "snapshots", "BTCUSDT")
    assert snaps.filter(source="poll")["last_update_id"].n_unique() >= 3
    assert_recovered(run, final)


def _depth_requests(sim: Any) -> list[dict]:
    (client,) = sim.stats_json()["clients"].values()
    return [r for r in client["requests"] if r["target"].startswith("/fapi/v1/depth")]


async def test_rest_429_then_418_backs_off_as_told_and_never_sends_while_banned(
    tmp_path, monkeypatch
):
    # One symbol, so one poller: with two, a request already in flight when the 429 is
    # sent arrives "while throttled" and the simulator bans the IP for real (see report:
    # concurrent requests per IP race a 429).
    async with open_simulator(symbols=["BTCUSDT"], **SIM) as sim:
        settings = make_settings(
            tmp_path, sim, symbols=["BTCUSDT"], binance={"snapshot_interval": 0.2}
        )
        async with collector(settings, tmp_path, monkeypatch) as run:
            await synced(run, ["BTCUSDT"])
            sim.faults.add("rest_429", path="/fapi/v1/depth", retry_after=2)
            await wait_for(lambda: sim.faults.applied["rest_429"] == 1)
            sim.faults.add("rest_418", path="/fapi/v1/depth", retry_after=1)
            await wait_for(lambda: sim.faults.applied["rest_418"] == 1, timeout=6)
            await trio.sleep(1.5)
            final = await settle(sim, 0.3)
    reqs = _depth_requests(sim)
    (client,) = sim.stats_json()["clients"].values()
    assert client["violations"] == 0 and client["bans"] == 1
    assert [r["violation"] for r in reqs if r["violation"]] == []
    statuses = [r["status"] for r in reqs]
    assert statuses.count(429) == 1 and statuses.count(418) == 1
    for status, wait in ((429, 2.0), (418, 1.0)):
        i = statuses.index(status)
        told = reqs[i]["mono"]
        # requests already in flight when the answer came may land just after it; none
        # is *sent* later than that until the wait is over
        later = [r["mono"] - told for r in reqs[i + 1 :]]
        assert later, status
        early = [dt for dt in later if dt < wait - 0.05]
        assert all(dt < 0.05 for dt in early), (status, early)
        assert max(later) >= wait - 0.05
    assert statuses[-1] == 200  # polling resumed
    polls = run.shard.polls
    assert sum(p.throttled for p in polls.values()) >= 1
    assert run.shard.budget.stats.throttles == 1 and run.shard.budget.stats.bans == 1
    assert_recovered(run, final)


class WallClock(trio.abc.Clock):
    """trio time = Unix time, so the simulator's weight windows are wall-clock minutes,
    like Binance's and like the collector's reading of X-MBX-USED-WEIGHT-1M."""

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return time.time()

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return deadline - time.time()


@pytest.fixture
def wall_clock() -> WallClock:
    return WallClock()


async def test_used_weight_header_near_the_limit_pauses_requests(tmp_path, monkeypatch, wall_clock):
    """Another client on the same IP has used most of the minute's weight: the collector's
    own count is low, but the venue's X-MBX-USED-WEIGHT-1M header says the IP is near the
    limit, so it stops sending until the minute rolls over: no 429."""
    limit = 200
    if 60 - time.time() % 60 < 6:  # keep the whole test inside one weight minute
        await trio.sleep(60 - time.time() % 60 + 0.1)
    async with open_simulator(symbols=SYMS, weight_limit=limit, **SIM) as sim:
        async with httpx.AsyncClient(base_url=sim.rest_url, timeout=5) as other:
            for lim in [1000] * 7 + [100] * 3:  # 7 x 20 + 3 x 5 = 155 weight
                r = await other.get("/fapi/v1/depth", params={"symbol": "ETHUSDT", "limit": lim})
                assert r.status_code == 200
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "155"
        n_other = len(_depth_requests(sim))
        settings = make_settings(
            tmp_path,
            sim,
            binance={
                "snapshot_interval": 0.1,
                "weight_limit_per_minute": limit,
                "weight_safety": 0.8,
            },
        )
        async with collector(settings, tmp_path, monkeypatch) as run:
            await trio.sleep(2.0)
            budget = run.shard.budget
            assert budget.blocked_for > 2.0  # waiting for the minute to roll over
    (client,) = sim.stats_json()["clients"].values()
    reqs = _depth_requests(sim)[n_other:]
    assert all(r["status"] == 200 for r in reqs), [r["status"] for r in reqs]
    assert client["used_weight"] <= limit and client["violations"] == 0
    assert budget.stats.last_used_header >= 0.8 * limit
    # at 10 polls/s it would have sent ~40 requests in 2 s; it stopped near 0.8 x limit
    # (at most the requests already in flight: 2 pollers + 1 resync fetcher)
    assert len(reqs) <= math.ceil((0.8 * limit - 155) / 5) + 3
