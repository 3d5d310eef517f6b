"""inspect / verify / book / compact on data the real pipeline wrote (simulator -> collect).

The tools' own tests use generated data; this one feeds them what `collect` produces,
with a real sequence gap injected, so the two sides agree on layout, schema and gaps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import trio
from configtools import make_config
from rich.console import Console

from cryptoflow.config import load_settings
from cryptoflow.runtime import build_plans, collect_main
from cryptoflow.sim.server import open_simulator
from cryptoflow.tools import book, compact, inspect, verify

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def _console() -> Console:
    return Console(width=200, force_terminal=False, record=True)


async def test_tools_agree_with_what_collect_wrote(tmp_path):
    out = tmp_path / "out"
    async with open_simulator(symbols=SYMBOLS, seed=11, tick_interval=0.05, depth=100) as sim:
        cfg = make_config(
            tmp_path / "configs",
            shards=[{"name": "a", "source_ip": None, "symbols": {"binance": SYMBOLS}}],
            overrides={
                "source.binance.rest_url": sim.rest_url,
                "source.binance.ws_url": sim.ws_url,
                "source.binance.snapshot_interval": 1.0,
                "source.binance.depth_limit": 100,
                "writer.buffer.snapshot_flush_interval": 1.0,
                "storage.spool.path": str(tmp_path / "spool"),
                "storage.upload_interval": 0.0,
            },
        )
        settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
        plans = build_plans(settings, ["binance"], settings.shards)

        async def drop_one_later() -> None:
            await trio.sleep(2.0)
            sim.faults.add("ws_drop", symbol="BTCUSDT")

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drop_one_later)
                await collect_main(
                    settings,
                    plans,
                    output=out,
                    duration=5.0,
                    simulate=False,
                    install_signal_handlers=False,
                )

    gaps = pl.read_parquet(list((out / "gaps").rglob("*.parquet")))
    assert set(gaps["kind"]) >= {"sequence_break", "resync"}

    # verify: the injected break is covered by its gap row -> known, not a problem
    c = _console()
    assert verify.run(str(out), console=c) == 0, c.export_text()
    assert "known" in c.export_text().lower()

    # inspect: both symbols, both datasets, the gap counted for BTCUSDT
    c = _console()
    assert inspect.run(str(out), console=c) == 0, c.export_text()
    text = c.export_text()
    for word in ("deltas", "snapshots", "BTCUSDT", "ETHUSDT"):
        assert word in text

    # book: at the last delta of ETHUSDT (no gap) the rebuilt book is served
    deltas = pl.scan_parquet(str(out / "deltas/**/*.parquet"), hive_partitioning=True)
    eth_last = (
        deltas.filter(pl.col("symbol") == "ETHUSDT").select(pl.col("timestamp").max()).collect()
    ).item()
    at = eth_last.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    c = _console()
    assert book.run(str(out), "binance", "ETHUSDT", at, depth=5, console=c) == 0, c.export_text()
    assert "bid" in c.export_text()

    # compact (treating the current hour as closed): same rows, one file per hour, and
    # the compacted tree still verifies
    before = {
        ds: pl.scan_parquet(str(out / ds / "**/*.parquet")).select(pl.len()).collect().item()
        for ds in ("deltas", "snapshots", "gaps")
    }
    c = _console()
    later = datetime.now(UTC) + timedelta(hours=3)
    assert compact.run(str(out), now=later, console=c) == 0, c.export_text()
    after = {
        ds: pl.scan_parquet(str(out / ds / "**/*.parquet")).select(pl.len()).collect().item()
        for ds in ("deltas", "snapshots", "gaps")
    }
    assert after == before
    for hour_dir in {p.parent for p in (out / "deltas").rglob("*.parquet")}:
        assert len(list(hour_dir.glob("*.parquet"))) == 1, hour_dir
    c = _console()
    assert verify.run(str(out), console=c) == 0, c.export_text()


def test_a_message_without_levels_keeps_the_stored_chain_whole(tmp_path):
    """KuCoin's price-0 change moves the sequence on but changes no level. Stored as a
    marker row (side null), `verify` sees an unbroken chain; stored as nothing (before),
    it reported a continuity break 17 -> 19 where nothing was lost."""
    from cryptoflow.exchanges.kucoin import parse as kucoin_parse
    from cryptoflow.exchanges.kucoin.rules import RULES
    from cryptoflow.models import Dataset
    from cryptoflow.pipeline.normalize import Normalizer, frame_from_batch
    from cryptoflow.storage.layout import files_for_frame
    from cryptoflow.tools.datasets import open_root

    t0 = 1_767_314_000_000

    def msg(seq: int, change: str) -> bytes:
        return (
            b'{"type":"message","topic":"/contractMarket/level2:XBTUSDTM","subject":"level2",'
            b'"data":{"sequence":%d,"change":"%s","timestamp":%d}}'
            % (seq, change.encode(), t0 + seq)
        )

    snapshot = kucoin_parse.parse_rest_snapshot(
        b'{"code":"200000","data":{"symbol":"XBTUSDTM","sequence":16,'
        b'"asks":[[5000.0,80]],"bids":[[4999.0,1]],"ts":%d}}' % ((t0 + 16) * 10**6),
        "BTCUSDT",
        (t0 + 16) * 10**6,
    )
    norm = Normalizer({"kucoin": RULES})
    norm.set_multiplier("kucoin", "BTCUSDT", "0.001")
    changes = [(17, "5000.0,sell,83"), (18, "0,sell,0"), (19, "4999,buy,2")]
    diffs = [
        d
        for seq, change in changes
        for d in kucoin_parse.parse_ws_message(
            msg(seq, change), (t0 + seq) * 10**6, {"XBTUSDTM": "BTCUSDT"}
        )
    ]
    out = norm.feed_many([snapshot, *diffs])
    assert out.gaps == []
    for b in out.batches:  # as the writer stores them
        for key, _, data in files_for_frame(
            b.dataset, b.exchange, b.market, b.symbol, frame_from_batch(b)
        ):
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(data)
    stored = pl.read_parquet(list((tmp_path / Dataset.DELTAS.value).rglob("*.parquet")))
    assert stored["last_update_id"].to_list() == [17, 18, 19]
    assert stored["side"].to_list() == ["ask", None, "bid"]

    c = _console()
    assert verify.run(str(tmp_path), console=c) == 0, c.export_text()
    assert "continuity break" not in c.export_text()
    with open_root(str(tmp_path)) as root:
        rows, _ = book.rebuild(root, "kucoin", "BTCUSDT", t0 + 19)
    assert rows.select("side", "price", "quantity").rows() == [
        ("bid", 4999.0, 0.002),
        ("ask", 5000.0, 0.083),
    ]
