"""SIGTERM during collection: every received row is stored, exit within the deadline.

Real processes: the simulator runs standalone, the collector is `cryptoflow collect`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from configtools import make_config

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


def _start_sim() -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryptoflow.sim", "--symbols", ",".join(SYMBOLS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    return proc, json.loads(line)


@contextlib.contextmanager
def _sim_running():
    """A standalone simulator (its URLs), killed at the end."""
    sim, urls = _start_sim()
    try:
        yield urls
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()


def _sim_stats(rest_url: str) -> dict:
    import httpx

    return httpx.get(f"{rest_url}/_sim/stats", timeout=5).json()


def test_sigterm_flushes_everything_and_exits_within_deadline(tmp_path: Path) -> None:
    sim, urls = _start_sim()
    collector = None
    try:
        cfg = make_config(
            tmp_path / "configs",
            shards=[{"name": "a", "source_ip": None, "symbols": {"binance": SYMBOLS}}],
            overrides={
                "source.binance.rest_url": urls["rest_url"],
                "source.binance.ws_url": urls["ws_url"],
                "source.binance.snapshot_interval": 0.5,
                "source.binance.depth_limit": 100,
                # long flush intervals: at SIGTERM everything is still in memory
                "writer.buffer.snapshot_flush_interval": 600.0,
                "writer.buffer.delta_flush_interval": 600.0,
                "storage.spool.path": str(tmp_path / "spool"),
                "cryptoflow.shutdown_timeout": 10.0,
            },
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        collector = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cryptoflow",
                "collect",
                "--exchange",
                "binance",
                "--config",
                str(cfg),
                "--output",
                str(tmp_path / "out"),
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        # wait until data flows on both lanes (start-up is slow on a loaded CI machine)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            served = _sim_stats(urls["rest_url"])["symbols"]
            if all(s["rest_snapshots"] >= 2 and s["ws_levels"] > 0 for s in served.values()):
                break
            assert collector.poll() is None, collector.stderr.read()
            time.sleep(0.25)
        else:
            raise AssertionError("no data reached the collector within 40 s")
        time.sleep(1)
        assert collector.poll() is None, collector.stderr.read()
        sent = time.monotonic()
        collector.send_signal(signal.SIGTERM)
        _, err = collector.communicate(timeout=20)
        took = time.monotonic() - sent
        stats = _sim_stats(urls["rest_url"])["symbols"]
    finally:
        for p in (collector, sim):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert collector.returncode == 0, err
    assert took < 10.0 + 5, f"took {took:.1f}s"
    summary = re.search(r"rows received=(\d+) spooled=(\d+) uploaded=(\d+)", err)
    assert summary, err
    received, spooled, uploaded = map(int, summary.groups())
    assert received > 0 and received == spooled == uploaded, err
    snaps = pl.scan_parquet(str(tmp_path / "out/snapshots/**/*.parquet"), hive_partitioning=True)
    deltas = pl.scan_parquet(str(tmp_path / "out/deltas/**/*.parquet"), hive_partitioning=True)
    gaps = pl.scan_parquet(str(tmp_path / "out/gaps/**/*.parquet"), hive_partitioning=True)
    stored = sum(lf.select(pl.len()).collect().item() for lf in (snaps, deltas, gaps))
    assert stored == received
    # nothing the simulator sent is missing beyond what was in flight at the signal
    served = sum(s["rest_levels"] + s["ws_levels"] for s in stats.values())
    levels = (
        snaps.select(pl.len()).collect().item()
        + deltas.filter(
            pl.col("side").is_not_null()  # not the marker rows of messages without levels
        )
        .select(pl.len())
        .collect()
        .item()
    )
    assert levels <= served
    assert served - levels <= 2 * 200 + 500, (served, levels)
    assert not list((tmp_path / "spool").rglob("*.parquet"))


@contextlib.contextmanager
def _hung_s3_env():
    """The environment of a collector whose S3 endpoint accepts connections (backlog)
    and never answers: uploads hang."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(64)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(
        S3_BUCKET="b",
        S3_ENDPOINT_URL=f"http://127.0.0.1:{hung.getsockname()[1]}",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
        AWS_REGION="us-east-1",
    )
    try:
        yield env
    finally:
        hung.close()


def test_second_signal_exits_at_once_even_with_a_hung_s3(tmp_path: Path) -> None:
    """The first SIGINT drains (bounded by shutdown_timeout, 30 s here); the second must
    end the process at once, also while uploads hang on an S3 endpoint that accepts
    connections and never answers (the drain used to run on to its deadline)."""
    # a standalone simulator: `--simulate` stores only under --output, never in S3
    with _sim_running() as urls:
        cfg = make_config(
            tmp_path / "configs",
            shards=[{"name": "a", "source_ip": None, "symbols": {"binance": SYMBOLS}}],
            overrides={
                "source.binance.rest_url": urls["rest_url"],
                "source.binance.ws_url": urls["ws_url"],
                "storage.s3.enabled": True,
                "storage.upload_interval": 0.0,
                "storage.spool.path": str(tmp_path / "spool"),
                "cryptoflow.shutdown_timeout": 30.0,
            },
        )
        args = [sys.executable, "-m", "cryptoflow", "collect", "--exchange", "binance"]
        args += ["--config", str(cfg), "--duration", "60"]
        with _hung_s3_env() as env, _killed_at_end(args, env, tmp_path) as collector:
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and not list(tmp_path.glob("spool/**/*.parquet")):
                assert collector.poll() is None, collector.stdout.read()
                time.sleep(0.25)
            collector.send_signal(signal.SIGINT)  # drain: uploads hang
            time.sleep(1.0)
            assert collector.poll() is None  # still draining
            sent = time.monotonic()
            collector.send_signal(signal.SIGINT)
            out, _ = collector.communicate(timeout=25)
            took = time.monotonic() - sent
    assert collector.returncode == 130, out
    assert "second SIGINT: exiting now" in out
    assert took < 8.0, f"took {took:.1f}s after the second signal"  # was ~29 s


def test_ctrl_c_stops_spool_flush_against_a_hung_s3(tmp_path: Path) -> None:
    """`cryptoflow spool flush` ignored Ctrl-C while uploads hung (only SIGTERM ended it);
    now it stops within a few seconds and the file stays in the spool."""
    from cryptoflow.storage import parquet
    from cryptoflow.storage.spool import Spool

    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    frame = pl.DataFrame({"timestamp": [1_741_082_400_000], "x": [1]})
    key = "deltas/exchange=binance/market=futures/symbol=BTCUSDT/year=2025/month=03/"
    key += "day=04/hour=10/BTCUSDT-1-1-1741082400000-1741082400000.parquet"
    spool.write(key, parquet.encode(frame), rows=1)
    cfg = make_config(
        tmp_path / "configs",
        overrides={"storage.s3.enabled": True, "storage.spool.path": str(tmp_path / "spool")},
    )
    args = [sys.executable, "-m", "cryptoflow", "spool", "flush", "--config", str(cfg)]
    with _hung_s3_env() as env, _killed_at_end(args, env, tmp_path) as proc:
        time.sleep(3.0)  # scanning done, the upload hangs
        assert proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        took = time.monotonic() - sent
    assert proc.returncode == 130, out
    assert took < 8.0, f"took {took:.1f}s"
    assert list((tmp_path / "spool").rglob("*.parquet")), "the file must stay in the spool"


@contextlib.contextmanager
def _killed_at_end(args: list[str], env: dict[str, str], cwd: Path):
    """A child process (stdout and stderr together, text) that is killed if still alive."""
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
