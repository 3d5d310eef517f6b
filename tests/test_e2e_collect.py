"""Snapshot lane end to end: simulator (real sockets) -> collector -> S3 API (moto).

Row accounting is exact: with the delta lane off, every level the simulator served in a
200 response must be one stored row, under the documented key layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import trio
from configtools import make_config

from cryptoflow.config import load_settings
from cryptoflow.runtime import build_plans, collect_main
from cryptoflow.sim.server import open_simulator

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
KEY_RE = re.compile(
    r"^(?P<prefix>[^/]+)/snapshots/exchange=binance/market=futures/symbol=(?P<sym>[A-Z0-9]+)/"
    r"year=\d{4}/month=\d{2}/day=\d{2}/hour=\d{2}/(?P=sym)-\d+-\d+-\d+-\d+(-[0-9a-f]+)?\.parquet$"
)


def _config(tmp_path: Path, sim, **overrides) -> Path:
    base = {
        "source.binance.rest_url": sim.rest_url,
        "source.binance.ws_url": sim.ws_url,
        "source.binance.deltas": False,
        "source.binance.snapshot_interval": 0.5,
        "source.binance.depth_limit": 100,
        "reader.jitter": 0.05,
        "writer.buffer.snapshot_flush_interval": 1.0,
        "storage.spool.path": str(tmp_path / "spool"),
        "storage.local_path": str(tmp_path / "data"),
        "cryptoflow.shutdown_timeout": 10.0,
    }
    base.update(overrides)
    return make_config(
        tmp_path / "configs",
        shards=[{"name": "a", "source_ip": None, "symbols": {"binance": SYMBOLS}}],
        overrides=base,
    )


async def test_snapshots_to_s3_rows_equal_levels_served(tmp_path, s3_bucket):
    async with open_simulator(symbols=SYMBOLS, seed=3, tick_interval=0.05) as sim:
        cfg = _config(tmp_path, sim, **{"storage.s3.enabled": True, "storage.s3.prefix": "cf"})
        env = {
            "S3_BUCKET": s3_bucket.name,
            "S3_ENDPOINT_URL": s3_bucket.endpoint_url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
        }
        settings = load_settings(cfg, env=env, env_file=cfg.parent / ".env")
        plans = build_plans(settings, ["binance"], settings.shards)
        with trio.fail_after(30):
            result = await collect_main(
                settings,
                plans,
                output=None,
                duration=3.0,
                simulate=False,
                install_signal_handlers=False,
            )
        served = {s: sim.stats_json()["symbols"][s]["rest_levels"] for s in SYMBOLS}

    keys = s3_bucket.keys()
    assert keys, "nothing was uploaded"
    assert all(KEY_RE.match(k) for k in keys), [k for k in keys if not KEY_RE.match(k)]
    assert result.writer is not None and result.writer.spool_files == 0

    local = tmp_path / "readback"
    client = s3_bucket.client()
    for key in keys:
        dest = local / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(s3_bucket.name, key, str(dest))
    df = pl.scan_parquet(str(local / "cf/snapshots/**/*.parquet"), hive_partitioning=True).collect()
    per_symbol = dict(df.group_by("symbol").len().iter_rows())
    assert per_symbol == served
    assert all(n > 0 for n in served.values())
    # every snapshot is complete: levels 0..n-1 per side, bids descending
    one = df.filter(pl.col("symbol") == "BTCUSDT")
    first_id = one["last_update_id"].min()
    snap = one.filter(pl.col("last_update_id") == first_id)
    bids = snap.filter(pl.col("side") == "bid").sort("level")
    assert bids["level"].to_list() == list(range(bids.height))
    assert bids["price"].is_sorted(descending=True)
    assert set(df["year"].unique()) and df["exchange"].unique().to_list() == ["binance"]


async def test_local_output_and_other_symbols_unaffected_by_a_failing_one(tmp_path):
    async with open_simulator(symbols=SYMBOLS, seed=4, tick_interval=0.05) as sim:
        cfg = _config(tmp_path, sim)
        settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
        plans = build_plans(settings, ["binance"], settings.shards)
        for _ in range(3):
            sim.faults.add("rest_malformed", symbol="ETHUSDT", path="/fapi/v1/depth")
        with trio.fail_after(30):
            result = await collect_main(
                settings,
                plans,
                output=tmp_path / "out",
                duration=3.0,
                simulate=False,
                install_signal_handlers=False,
            )
        stats = sim.stats_json()["symbols"]
    df = pl.scan_parquet(str(tmp_path / "out/snapshots/**/*.parquet"), hive_partitioning=True)
    per_symbol = dict(df.group_by("symbol").len().collect().iter_rows())
    assert per_symbol == {s: stats[s]["rest_levels"] for s in SYMBOLS}
    polls = result.shards["binance/a"].polls
    assert polls["ETHUSDT"].malformed == 3 and "ETHUSDT" in polls["ETHUSDT"].last_error
    assert polls["BTCUSDT"].malformed == polls["BTCUSDT"].failed == 0
    assert polls["BTCUSDT"].ok >= 4
    assert polls["ETHUSDT"].ok - polls["ETHUSDT"].malformed >= 2  # polling went on after them


async def test_deltas_and_snapshots_lanes_together(tmp_path):
    async with open_simulator(symbols=SYMBOLS[:2], seed=5, tick_interval=0.05) as sim:
        cfg = _config(tmp_path, sim, **{"source.binance.deltas": True})
        settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
        plans = build_plans(settings, ["binance"], settings.shards)
        with trio.fail_after(30):
            await collect_main(
                settings,
                plans,
                output=tmp_path / "out",
                duration=3.0,
                simulate=False,
                install_signal_handlers=False,
            )
        stats = sim.stats_json()["symbols"]
    deltas = pl.scan_parquet(str(tmp_path / "out/deltas/**/*.parquet"), hive_partitioning=True)
    got = dict(deltas.group_by("symbol").len().collect().iter_rows())
    for sym in SYMBOLS[:2]:
        # every diff level the simulator sent is a stored row (none lost in flight)
        assert got[sym] == stats[sym]["ws_levels"], (sym, got[sym], stats[sym])
    # no break: only the `start` row each symbol gets where collection began
    gaps = pl.read_parquet(list((tmp_path / "out/gaps").rglob("*.parquet")))
    assert sorted(gaps.select("symbol", "kind").rows()) == [(s, "start") for s in SYMBOLS[:2]]


def test_collect_cli_argument_errors(tmp_path):
    from typer.testing import CliRunner

    from cryptoflow.cli import app

    runner = CliRunner()
    cfg = make_config(tmp_path / "c")
    r = runner.invoke(app, ["collect", "--config", str(cfg), "--exchange", "ftx"])
    assert r.exit_code == 2 and "unknown exchange" in r.output
    r = runner.invoke(app, ["collect", "--config", str(cfg), "--shard", "nope"])
    assert r.exit_code == 2 and "no such shard" in r.output and "main" in r.output
    r = runner.invoke(app, ["collect", "--config", str(cfg), "--duration", "-1"])
    assert r.exit_code == 2 and "--duration" in r.output
    r = runner.invoke(app, ["collect", "--config", str(tmp_path / "missing.yml")])
    assert r.exit_code == 2 and "not found" in r.output


def test_shard_option_selects_exactly_the_named_shards(tmp_path):
    from cryptoflow.runtime import select_shards

    cfg = make_config(
        tmp_path / "c",
        shards=[
            {"name": "a", "source_ip": None, "symbols": {"binance": ["BTCUSDT"]}},
            {"name": "b", "source_ip": "127.0.0.2", "symbols": {"binance": ["ETHUSDT"]}},
            {"name": "c", "source_ip": "127.0.0.3", "symbols": {"binance": ["SOLUSDT"]}},
        ],
    )
    settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
    chosen = select_shards(settings, ["c", "a"])
    plans = build_plans(settings, ["binance"], chosen)
    assert sorted(p.shard.name for p in plans) == ["a", "c"]
    assert {p.symbols for p in plans} == {(("BTCUSDT", "BTCUSDT"),), (("SOLUSDT", "SOLUSDT"),)}


async def test_simulate_gives_each_source_ip_its_own_address_and_budget():
    """`collect --simulate` used to drop every shard's source_ip: all shards reached the
    simulator from 127.0.0.1 and shared one per-IP budget (429/418 for a config that
    fits each IP). Each source IP now binds a loopback address of its own."""
    from cryptoflow.config_schema import Shard, VenueSource
    from cryptoflow.net.http import make_http_client
    from cryptoflow.runtime import ShardPlan, _start_simulator

    def plan(name: str, ip: str | None, symbol: str) -> ShardPlan:
        shard = Shard(name, ip, {"binance": [symbol]})
        return ShardPlan("binance", shard, ((symbol, symbol),), VenueSource(), "", "")

    plans = [plan("a", "10.1.0.1", "BTCUSDT"), plan("b", "10.1.0.2", "ETHUSDT")]
    plans.append(plan("c", None, "SOLUSDT"))
    async with trio.open_nursery() as nursery:
        simulated = await _start_simulator(nursery, plans)
        ips = [p.shard.source_ip for p in simulated]
        assert ips == ["127.0.0.2", "127.0.0.3", None]
        used = []
        for p in simulated:
            async with make_http_client(p.rest_url, source_ip=p.shard.source_ip, timeout=5) as h:
                for _ in range(2):
                    resp = await h.get(
                        "/fapi/v1/depth", params={"symbol": p.symbols[0][1], "limit": 1000}
                    )
                    assert resp.status_code == 200
                used.append(int(resp.headers["X-MBX-USED-WEIGHT-1M"]))
        assert used == [40, 40, 40]  # each address its own budget: 2 x weight 20
        nursery.cancel_scope.cancel()
