"""Scrape /metrics and /healthz during a real collect run; counters match rows written.
A metrics address that cannot be bound is a config error before anything is collected."""

from __future__ import annotations

import re
import socket

import httpx
import pytest
import trio
from configtools import make_config
from typer.testing import CliRunner

from cryptoflow.cli import app as cli_app
from cryptoflow.config import load_settings
from cryptoflow.runtime import RunResult, build_plans, collect_main
from cryptoflow.sim.server import open_simulator

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_metrics_move_during_a_run_and_match_rows_written(tmp_path):
    async with open_simulator(symbols=SYMBOLS, seed=7, tick_interval=0.05) as sim:
        cfg = make_config(
            tmp_path / "configs",
            shards=[{"name": "a", "source_ip": None, "symbols": {"binance": SYMBOLS}}],
            overrides={
                "source.binance.rest_url": sim.rest_url,
                "source.binance.ws_url": sim.ws_url,
                "source.binance.snapshot_interval": 0.5,
                "source.binance.depth_limit": 50,
                "writer.buffer.snapshot_flush_interval": 0.5,
                "writer.buffer.delta_flush_interval": 0.5,
                "storage.spool.path": str(tmp_path / "spool"),
                "metrics.enabled": True,
                "metrics.port": 0,
            },
        )
        settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
        plans = build_plans(settings, ["binance"], settings.shards)
        result = RunResult()
        scrapes: list[str] = []
        health: list[int] = []

        async def scrape() -> None:
            while result.ops_port is None:
                await trio.sleep(0.05)
            base = f"http://127.0.0.1:{result.ops_port}"
            async with httpx.AsyncClient() as client:
                for _ in range(2):
                    await trio.sleep(1.5)
                    scrapes.append((await client.get(f"{base}/metrics")).text)
                    health.append((await client.get(f"{base}/healthz")).status_code)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(scrape)
                await collect_main(
                    settings,
                    plans,
                    output=tmp_path / "out",
                    duration=4.0,
                    simulate=False,
                    install_signal_handlers=False,
                    result=result,
                )

    assert len(scrapes) == 2 and health == [200, 200]
    first, second = scrapes
    for name in ("cryptoflow_rows_received_total", "cryptoflow_messages_total"):
        assert _metric(second, name) > _metric(first, name) > 0, name
    assert re.search(r'cryptoflow_polls_total\{.*outcome="ok".*\} [1-9]', second)
    # the last scrape's per-symbol rows never exceed what the writer finally received
    ws = result.writer
    for sym in SYMBOLS:
        scraped = _metric(second, "cryptoflow_symbol_rows_total", symbol=sym, dataset="deltas")
        final_rows = ws.rows_by_symbol[("deltas", "binance", sym)]
        assert 0 < scraped <= final_rows
    assert sum(ws.rows_uploaded.values()) == sum(ws.rows_received.values())


async def test_healthz_says_never_received_for_a_shard_whose_connection_never_opens(tmp_path):
    """A shard on a source IP this host does not have never connects: no lane of it ever
    received data, so none went stale and /healthz answered 200 all the run long while
    nothing was recorded. Now each of its lanes is `never_received` once
    `metrics.stale_after` has passed since the start; /livez stays 200."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    cfg = make_config(
        tmp_path / "configs",
        shards=[{"name": "a", "source_ip": "192.0.2.1", "symbols": {"binance": SYMBOLS}}],
        overrides={
            "source.binance.rest_url": f"http://127.0.0.1:{closed}",
            "source.binance.ws_url": f"ws://127.0.0.1:{closed}",
            "source.binance.snapshots": False,  # one lane: what is judged is exact
            "storage.spool.path": str(tmp_path / "spool"),
            "metrics.enabled": True,
            "metrics.port": 0,
            "metrics.stale_after": 1.0,
        },
    )
    settings = load_settings(cfg, env={}, env_file=cfg.parent / ".env")
    plans = build_plans(settings, ["binance"], settings.shards)
    result = RunResult()
    answers: list[tuple[int, dict]] = []

    async def probe_health() -> None:
        while result.ops_port is None:
            await trio.sleep(0.05)
        base = f"http://127.0.0.1:{result.ops_port}"
        async with httpx.AsyncClient() as client:
            await trio.sleep(1.5)
            r = await client.get(f"{base}/healthz")
            answers.append((r.status_code, r.json()))
            r = await client.get(f"{base}/livez")
            answers.append((r.status_code, r.json()))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe_health)
            await collect_main(
                settings,
                plans,
                output=tmp_path / "out",
                duration=2.5,
                simulate=False,
                install_signal_handlers=False,
                result=result,
            )

    (health_code, health), (live_code, live) = answers
    assert health_code == 503 and health["status"] == "unhealthy", health
    assert sorted(
        (x["reason"], x["exchange"], x["shard"], x["symbol"], x["lane"]) for x in health["reasons"]
    ) == [("never_received", "binance", "a", sym, "deltas") for sym in sorted(SYMBOLS)]
    assert (live_code, live) == (200, {"status": "alive"})


def _collect_with_metrics_at(tmp_path, host: str, port: int):
    cfg = make_config(
        tmp_path / "configs",
        shards=[{"name": "a", "source_ip": None, "symbols": {"binance": SYMBOLS}}],
        overrides={
            "storage.spool.path": str(tmp_path / "spool"),
            "storage.local_path": str(tmp_path / "data"),
            "metrics.enabled": True,
            "metrics.host": host,
            "metrics.port": port,
        },
    )
    args = ["collect", "--config", str(cfg), "--exchange", "binance", "--simulate"]
    args += ["--output", str(tmp_path / "data")]
    return cfg, CliRunner().invoke(cli_app, [*args, "--duration", "5", "--no-status"])


def _assert_nothing_collected(tmp_path, output: str) -> None:
    assert "ExceptionGroup" not in output and "Traceback" not in output
    assert "collecting" not in output and "simulator:" not in output
    assert not list(tmp_path.glob("spool/**/*.parquet"))
    assert not list(tmp_path.glob("data.spool/**/*.parquet"))  # --simulate's own spool
    assert not list(tmp_path.glob("data/**/*.parquet"))


def test_busy_metrics_port_is_a_config_error_before_collecting(tmp_path):
    with socket.socket() as other:  # another process's listener on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        cfg, res = _collect_with_metrics_at(tmp_path, "127.0.0.1", port)
    assert res.exit_code == 2, res.output
    assert re.search(
        rf"^{re.escape(str(cfg))}:\d+: metrics\.port: 127\.0\.0\.1:{port} is in use \(",
        res.output,
        re.M,
    ), res.output
    _assert_nothing_collected(tmp_path, res.output)


@pytest.mark.parametrize(
    ("host", "says"),
    [
        ("metrics.invalid", "does not resolve to an address"),  # RFC 6761: never resolves
        ("192.0.2.1", "is not an address of this host"),  # TEST-NET-1: on no host
    ],
)
def test_unusable_metrics_host_is_a_config_error_before_collecting(tmp_path, host, says):
    cfg, res = _collect_with_metrics_at(tmp_path, host, 0)
    assert res.exit_code == 2, res.output
    assert re.search(
        rf"^{re.escape(str(cfg))}:\d+: metrics\.host: .*{re.escape(host)}.* {says} \(",
        res.output,
        re.M,
    ), res.output
    _assert_nothing_collected(tmp_path, res.output)
