"""End to end per venue (Bybit, OKX, KuCoin): `runtime.collect_main` against the simulator.

A tmp copy of configs/ points `source.<venue>.rest_url/ws_url` at the simulator; the
collector runs for a few seconds: both lanes must store rows (quantity in base units =
raw venue size x the instruments endpoint's multiplier), under the key layout; a
`ws_drop` fault must give a gap and the book must recover (resubscribe for Bybit/OKX,
REST snapshot for KuCoin); OKX also without an in-stream snapshot (REST seqId anchor).
"""

from __future__ import annotations

import functools
import logging
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
import trio
from configtools import make_config

from cryptoflow import runtime
from cryptoflow.book.sync import BookState
from cryptoflow.config import load_settings
from cryptoflow.sim import open_simulator
from cryptoflow.tools import validate

pytestmark = pytest.mark.slow

SYMS = ["BTCUSDT", "ETHUSDT"]
VENUE_SYMS = {
    "bybit": {"BTCUSDT": "BTCUSDT", "ETHUSDT": "ETHUSDT"},
    "okx": {"BTCUSDT": "BTC-USDT-SWAP", "ETHUSDT": "ETH-USDT-SWAP"},
    "kucoin": {"BTCUSDT": "XBTUSDTM", "ETHUSDT": "ETHUSDTM"},
}
#: what the simulator's instruments endpoints say (ctVal / multiplier)
MULTIPLIER = {
    "bybit": {"BTCUSDT": "1", "ETHUSDT": "1"},
    "okx": {"BTCUSDT": "0.01", "ETHUSDT": "0.1"},
    "kucoin": {"BTCUSDT": "0.001", "ETHUSDT": "0.01"},
}


def settings_for(tmp_path: Path, venue: str, sim, symbols=SYMS):
    cfg = make_config(
        tmp_path / "cfg",
        shards=[{"name": "main", "source_ip": None, "symbols": {venue: list(symbols)}}],
        overrides={
            "cryptoflow.exchanges": [venue],
            "cryptoflow.shutdown_timeout": 10.0,
            "reader.snapshot_interval": 1.0,
            "reader.jitter": 0.0,
            "reader.request_timeout": 3.0,
            "reader.backoff_initial": 0.05,
            "reader.backoff_max": 0.3,
            f"source.{venue}.rest_url": sim.rest_url,
            f"source.{venue}.ws_url": sim.ws_url,
            f"source.{venue}.depth_limit": 100,
            f"source.{venue}.snapshot_interval": 1.0,
            f"source.{venue}.stream_depth": 50,
            "storage.local_path": str(tmp_path / "out"),
            "storage.spool.path": str(tmp_path / "spool"),
            "writer.buffer.snapshot_flush_interval": 0.5,
            "writer.buffer.delta_flush_interval": 0.2,
            "writer.buffer.gap_flush_interval": 0.2,
        },
    )
    return load_settings(cfg, env={}, env_file=cfg.parent / ".env")


def read(out: Path, dataset: str, venue: str) -> pl.DataFrame:
    files = sorted((out / dataset / f"exchange={venue}").rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(p, hive_partitioning=False) for p in files])


async def wait_for(cond, timeout: float, what: str) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.05)


async def run_venue(tmp_path: Path, venue: str, faults=(), **sim_kwargs):
    """`faults`: (kind, count, params) queued on the simulator before the collector starts."""
    vsyms = [VENUE_SYMS[venue][s] for s in SYMS]
    shard: dict = {}
    real_shard = runtime.run_shard

    async def spy(plan, settings, rows_send, stop, stats, *a, **k):  # type: ignore[no-untyped-def]
        shard["stats"] = stats
        await real_shard(plan, settings, rows_send, stop, stats, *a, **k)

    def sync_of(sym):
        st = shard.get("stats")
        if st is None or st.normalizer is None:
            return None
        return st.normalizer.syncs().get((venue, sym))

    def synced(sym):
        s = sync_of(sym)
        return s is not None and s.state is BookState.SYNCED

    result = {}
    async with open_simulator(
        venues=[venue],
        venue_symbols={venue: vsyms},
        tick_interval=0.02,
        ping_interval=None,
        depth=100,
        seed=5,
        **sim_kwargs,
    ) as sim:
        for kind, count, params in faults:
            sim.faults.add(kind, count, **params)
        settings = settings_for(tmp_path, venue, sim)
        plans = runtime.build_plans(settings, [venue], settings.shards)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(runtime, "run_shard", spy)
            async with trio.open_nursery() as nursery:

                async def main(task_status=trio.TASK_STATUS_IGNORED):
                    result["run"] = await runtime.collect_main(
                        settings,
                        plans,
                        output=tmp_path / "out",
                        duration=None,
                        simulate=False,
                        install_signal_handlers=False,
                        task_status=task_status,
                    )

                stop = await nursery.start(main)
                await wait_for(lambda: all(synced(s) for s in SYMS), 10, "initial sync")
                sim.faults.add("ws_drop", 1, symbol=vsyms[0], venue=venue)
                await wait_for(
                    lambda: sync_of("BTCUSDT").counters.breaks >= 1, 10, "gap after ws_drop"
                )
                await wait_for(
                    lambda: synced("BTCUSDT") and sync_of("BTCUSDT").counters.resyncs >= 1,
                    15,
                    "recovery",
                )
                await trio.sleep(1.2)  # one more poll + flushes
                stop.stop("test done")
                with trio.fail_after(20):
                    while "run" not in result:
                        await trio.sleep(0.05)
    return result["run"], shard["stats"]


def check_rows(out: Path, venue: str) -> None:
    deltas = read(out, "deltas", venue)
    snaps = read(out, "snapshots", venue)
    gaps = read(out, "gaps", venue)
    assert deltas.height > 0 and snaps.height > 0
    assert set(deltas["symbol"]) == set(SYMS) and set(snaps["symbol"]) == set(SYMS)
    assert set(deltas["exchange"]) == {venue} and set(deltas["market"]) == {"futures"}
    for frame in (deltas, snaps):
        for sym in SYMS:
            part = frame.filter(pl.col("symbol") == sym)
            mult = Decimal(MULTIPLIER[venue][sym])
            for raw, qty in part.select("raw_quantity", "quantity").head(200).iter_rows():
                assert Decimal(str(qty)) == pytest.approx(Decimal(str(raw)) * mult), (venue, sym)
    assert "poll" in set(snaps["source"])
    kinds = set(gaps.filter(pl.col("symbol") == "BTCUSDT")["kind"])
    assert kinds & {"sequence_break", "reconnect"} and "resync" in kinds
    for path in (out / "deltas").rglob("*.parquet"):
        parts = path.relative_to(out).parts
        assert parts[1] == f"exchange={venue}" and parts[2] == "market=futures"
        assert parts[3] in {f"symbol={s}" for s in SYMS}
        assert [p.split("=")[0] for p in parts[4:8]] == ["year", "month", "day", "hour"]


@pytest.mark.parametrize("venue", ["bybit", "okx", "kucoin"])
async def test_collect_venue_against_simulator(tmp_path, venue):
    run, _stats = await run_venue(tmp_path, venue)
    assert run.writer is not None
    check_rows(tmp_path / "out", venue)
    if venue in ("bybit", "okx"):  # healed in-stream: the resync snapshot came by resubscribe
        snaps = read(tmp_path / "out", "snapshots", venue)
        assert "stream" in set(snaps["source"])


async def test_okx_without_in_stream_snapshot_anchors_on_rest(tmp_path):
    await run_venue(tmp_path, "okx", okx_snapshot_in_stream=False)
    check_rows(tmp_path / "out", "okx")
    snaps = read(tmp_path / "out", "snapshots", "okx")
    assert "stream" not in set(snaps["source"])


@pytest.mark.parametrize(
    ("venue", "path"),
    [("okx", "/api/v5/public/instruments"), ("kucoin", "/api/v1/contracts/active")],
)
async def test_contract_sizes_wait_for_the_instruments_list(tmp_path, venue, path, caplog):
    """The instruments endpoint fails twice: the shard waits and retries, and every stored
    quantity is still raw size x the contract multiplier (never x 1)."""
    caplog.set_level(logging.INFO, logger="cryptoflow.runtime")
    run, _stats = await run_venue(
        tmp_path, venue, faults=[("rest_5xx", 2, {"path": path, "venue": venue})]
    )
    assert run.writer is not None
    check_rows(tmp_path / "out", venue)
    retries = [r for r in caplog.records if "cannot read the instruments list" in r.getMessage()]
    assert len(retries) == 2 and "instruments list read after 2 failed tries" in caplog.text


async def test_inverse_contracts_are_refused_by_check_and_skipped_by_collect(tmp_path, caplog):
    """OKX BTC-USD-SWAP and KuCoin XBTUSDM size in USD: no base-asset quantity without the
    price, so `validate-config --online` names them and `collect` leaves them out."""
    inverse = {"okx": "BTC-USD-SWAP", "kucoin": "XBTUSDM"}
    async with open_simulator(
        venues=list(inverse),
        venue_symbols={v: [VENUE_SYMS[v]["BTCUSDT"], inverse[v]] for v in inverse},
        tick_interval=0.02,
        ping_interval=None,
        depth=100,
    ) as sim:
        cfg = make_config(
            tmp_path / "cfg",
            shards=[
                {
                    "name": "main",
                    "source_ip": None,
                    "symbols": {v: ["BTCUSDT", "BTCUSD"] for v in inverse},
                }
            ],
            overrides={
                "cryptoflow.exchanges": list(inverse),
                "cryptoflow.shutdown_timeout": 10.0,
                "storage.local_path": str(tmp_path / "out"),
                "storage.spool.path": str(tmp_path / "spool"),
                **{f"source.{v}.rest_url": sim.rest_url for v in inverse},
                **{f"source.{v}.ws_url": sim.ws_url for v in inverse},
            },
        )
        with (cfg.parent / "symbols.yml").open("a") as fh:
            fh.write("  BTCUSD: {okx: BTC-USD-SWAP, kucoin: XBTUSDM}\n")
        settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
        problems = await trio.to_thread.run_sync(functools.partial(validate.check_online, settings))
        assert sorted(problems) == [
            "kucoin: BTCUSD -> 'XBTUSDM' cannot be collected: an inverse contract (multiplier -1, "
            "sizes in quote currency): base-asset sizes would need each level's price; only "
            "linear contracts are supported",
            "okx: BTCUSD -> 'BTC-USD-SWAP' cannot be collected: an inverse swap (ctVal 10 USD a "
            "contract): base-asset sizes would need each level's price; only linear swaps are "
            "supported",
        ]
        plans = runtime.build_plans(settings, list(inverse), settings.shards)
        run = await runtime.collect_main(
            settings,
            plans,
            output=tmp_path / "out",
            duration=2.0,
            simulate=False,
            install_signal_handlers=False,
        )
    assert run.writer is not None
    for venue in inverse:
        for dataset in ("deltas", "snapshots"):
            assert set(read(tmp_path / "out", dataset, venue)["symbol"]) == {"BTCUSDT"}
        assert f"{venue}/main: BTCUSD ({inverse[venue]}) not collected: an inverse" in caplog.text


async def test_check_online_names_unlisted_symbols(tmp_path):
    async with open_simulator(
        venues=["bybit", "okx", "kucoin"],
        venue_symbols={v: list(m.values()) for v, m in VENUE_SYMS.items()},
        ping_interval=None,
    ) as sim:
        cfg = make_config(
            tmp_path / "cfg",
            shards=[
                {
                    "name": "main",
                    "source_ip": None,
                    "symbols": {v: ["BTCUSDT", "ETHUSDT", "SOLUSDT"] for v in VENUE_SYMS},
                }
            ],
            overrides={
                "cryptoflow.exchanges": list(VENUE_SYMS),
                **{f"source.{v}.rest_url": sim.rest_url for v in VENUE_SYMS},
            },
        )
        settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
        problems = await trio.to_thread.run_sync(functools.partial(validate.check_online, settings))
    assert sorted(problems) == [
        "bybit: SOLUSDT -> 'SOLUSDT' is not listed by bybit "
        "(symbols.yml maps it; fix the name or set it to null)",
        "kucoin: SOLUSDT -> 'SOLUSDTM' is not listed by kucoin "
        "(symbols.yml maps it; fix the name or set it to null)",
        "okx: SOLUSDT -> 'SOL-USDT-SWAP' is not listed by okx "
        "(symbols.yml maps it; fix the name or set it to null)",
    ]
