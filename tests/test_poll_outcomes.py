"""Poll outcomes end to end, per venue: a malformed REST snapshot body counts `malformed`
(one of the `ok` polls: the request worked, the body did not), never `failed`, wherever
it is caught (docs/operations.md, `cryptoflow_polls_total`).

Bybit, OKX and KuCoin parse at the fetch a body that is not certainly a success (it may
be an error or a throttle), so a body without its code field is found malformed there;
a body the HTTP client cannot decode is found so at the fetch on every venue; a
truncated one is found by the normalizer or at the writer's flush. All were counted
`failed` when the fetch found them, `malformed` otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from configtools import make_config

from cryptoflow import runtime
from cryptoflow.config import load_settings
from cryptoflow.sim import open_simulator

pytestmark = pytest.mark.slow

VENUE_SYMS = {
    "binance": {"BTCUSDT": "BTCUSDT", "ETHUSDT": "ETHUSDT"},
    "bybit": {"BTCUSDT": "BTCUSDT", "ETHUSDT": "ETHUSDT"},
    "okx": {"BTCUSDT": "BTC-USDT-SWAP", "ETHUSDT": "ETH-USDT-SWAP"},
    "kucoin": {"BTCUSDT": "XBTUSDTM", "ETHUSDT": "ETHUSDTM"},
}
DEPTH_PATH = {
    "binance": "/fapi/v1/depth",
    "bybit": "/v5/market/orderbook",
    "okx": "/api/v5/market/books",
    "kucoin": "/api/v1/level2/snapshot",
}
#: the field whose absence makes the body "not certainly a success" (Binance: its id,
#: which it never checks at the fetch)
CODE_FIELD = {"binance": "lastUpdateId", "bybit": "retCode", "okx": "code", "kucoin": "code"}


def settings_for(tmp_path: Path, venue: str, sim):
    cfg = make_config(
        tmp_path / "cfg",
        shards=[{"name": "main", "source_ip": None, "symbols": {venue: list(VENUE_SYMS[venue])}}],
        overrides={
            "cryptoflow.exchanges": [venue],
            "cryptoflow.shutdown_timeout": 10.0,
            "reader.snapshot_interval": 0.3,
            "reader.jitter": 0.0,
            "reader.request_timeout": 3.0,
            f"source.{venue}.deltas": False,
            f"source.{venue}.rest_url": sim.rest_url,
            f"source.{venue}.ws_url": sim.ws_url,
            f"source.{venue}.depth_limit": 100,
            f"source.{venue}.snapshot_interval": 0.3,
            "storage.local_path": str(tmp_path / "out"),
            "storage.spool.path": str(tmp_path / "spool"),
            "writer.buffer.snapshot_flush_interval": 0.5,
        },
    )
    return load_settings(cfg, env={}, env_file=cfg.parent / ".env")


@pytest.mark.parametrize("venue", ["binance", "bybit", "okx", "kucoin"])
async def test_a_malformed_poll_body_counts_malformed_not_failed(tmp_path, venue, caplog):
    caplog.set_level(logging.WARNING, logger="cryptoflow")
    eth = VENUE_SYMS[venue]["ETHUSDT"]
    # one at a time: faults of different kinds queued together hit the same response
    faults = [
        ("rest_undecodable", {}),
        ("rest_missing_fields", {"fields": [CODE_FIELD[venue]]}),
        ("rest_malformed", {}),
    ]
    result: dict = {}
    async with open_simulator(
        venues=[venue],
        venue_symbols={venue: list(VENUE_SYMS[venue].values())},
        tick_interval=0.05,
        ping_interval=None,
        depth=100,
        seed=9,
    ) as sim:
        settings = settings_for(tmp_path, venue, sim)
        plans = runtime.build_plans(settings, [venue], settings.shards)

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

        with trio.fail_after(40):
            async with trio.open_nursery() as nursery:
                stop = await nursery.start(main)
                for kind, params in faults:
                    sim.faults.add(kind, symbol=eth, path=DEPTH_PATH[venue], venue=venue, **params)
                    while sim.faults.applied[kind] < 1:
                        await trio.sleep(0.05)
                await trio.sleep(0.8)  # a good poll after them, and a flush
                stop.stop("test done")

    polls = result["run"].shards[f"{venue}/main"].polls
    eth_polls, btc = polls["ETHUSDT"], polls["BTCUSDT"]
    assert (eth_polls.malformed, eth_polls.failed, eth_polls.throttled) == (3, 0, 0), eth_polls
    assert eth_polls.ok - eth_polls.malformed >= 1  # polling went on after them
    assert btc.malformed == btc.failed == 0 and btc.ok >= 2
    lines = [r.getMessage() for r in caplog.records if "snapshot failed" in r.getMessage()]
    assert len(lines) == 3, lines
    assert all(line.startswith(f"snapshot failed: {venue}/ETHUSDT: ") for line in lines), lines
