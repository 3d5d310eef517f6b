"""`collect --simulate`: where its made-up books go (only `--output`), and Ctrl-C at start.

Real processes (`python -m cryptoflow collect`), a moto S3 server (conftest `s3_bucket`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import boto3
import polars as pl
import pytest
from configtools import make_config
from conftest import tiny_frame_from_columns
from storage_support import Collector, read_local_dataset, s3_env, spool_files, write_config
from typer.testing import CliRunner

from cryptoflow.cli import app as cli_app
from cryptoflow.errors import single_error_unwrapped
from cryptoflow.models import Dataset
from cryptoflow.storage import layout
from cryptoflow.storage.spool import Spool


def _real_spool_file(spool: Path) -> Path:
    """One file a real run left waiting for upload in the configured spool."""
    ids = list(range(7))
    ts = [1_741_082_400_000 + i for i in ids]
    columns = {
        "timestamp": ts,
        "receive_time": [t * 1_000_000 for t in ts],
        "first_update_id": ids,
        "last_update_id": ids,
        "prev_update_id": [i - 1 for i in ids],
        "side": ["bid"] * 7,
        "price": [str(100 + i) for i in ids],
        "quantity": ["1"] * 7,
        "raw_quantity": ["1"] * 7,
    }
    frame = tiny_frame_from_columns(Dataset.DELTAS, "binance", "futures", "XRPUSDT", columns)
    [(key, _, data)] = layout.files_for_frame(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", frame
    )
    return Spool(spool, max_bytes=10**9).write(key, data).path


def test_simulate_stores_only_under_output_even_with_s3_enabled(tmp_path, s3_bucket):
    """Found by the CLI audit: with `storage.s3.enabled`, `collect --simulate --output DIR`
    uploaded the made-up books to the bucket (mixed in with real data, not marked) and
    never created DIR; and it drained the configured spool, so a real run's waiting file
    went up with them (into DIR when S3 is off). Now the simulated rows are in DIR only,
    through a spool of their own beside it, and the real spool's file stays for the next
    real run."""
    spool = tmp_path / "spool"
    real = _real_spool_file(spool)
    cfg = write_config(tmp_path / "cfg", sim=None, spool=spool, s3=True, symbols=["BTCUSDT"])
    _publish_to_cloudwatch(cfg, s3_bucket.endpoint_url, "SimTest")
    out = tmp_path / "out"
    env = s3_env(s3_bucket.endpoint_url, s3_bucket.name)
    col = Collector(cfg, tmp_path / "c.log", env=env, duration=3, output=out, simulate=True)
    try:
        assert col.wait(40) == 0, col.text()
    finally:
        col.kill()
    text = col.text()
    assert s3_bucket.keys() == [], text
    assert f"collecting binance/main -> local:{out} (spool {out}.spool: " in text
    deltas = read_local_dataset(out, "deltas")
    snapshots = read_local_dataset(out, "snapshots")
    assert deltas.height > 0 and snapshots.height > 0
    assert set(deltas["symbol"]) == set(snapshots["symbol"]) == {"BTCUSDT"}
    assert spool_files(spool) == [real]  # untouched, not in the simulated output
    assert not spool_files(tmp_path / "out.spool")
    # nor made-up figures in the production CloudWatch namespace (moto serves it too)
    assert "--simulate: metrics.cloudwatch is on, but nothing is published to it" in text
    client = boto3.client(
        "cloudwatch",
        endpoint_url=s3_bucket.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    assert client.list_metrics(Namespace="SimTest")["Metrics"] == []


def _publish_to_cloudwatch(cfg: Path, endpoint_url: str, namespace: str) -> None:
    """Turn on `metrics.cloudwatch` in `cfg`, every second, at `endpoint_url`."""
    from ruamel.yaml import YAML

    yaml = YAML()
    doc = yaml.load(cfg.read_text())
    cw = doc["metrics"]["cloudwatch"]
    cw.update(enabled=True, interval=1.0, namespace=namespace, endpoint_url=endpoint_url)
    cw["region"] = "us-east-1"
    yaml.dump(doc, cfg)


def test_simulate_needs_no_s3_secrets(tmp_path):
    """Found by review: a production config (S3 on) with no S3_BUCKET on the host failed
    `collect --simulate` as a config error, though the run never uses S3: the documented
    way to try an image or a host without the venues did not run there."""
    cfg = write_config(tmp_path / "cfg", sim=None, spool=tmp_path / "spool", s3=True)
    out = tmp_path / "out"
    col = Collector(cfg, tmp_path / "c.log", duration=2, output=out, simulate=True)
    try:
        assert col.wait(40) == 0, col.text()  # the environment has no AWS_*/S3_* at all
    finally:
        col.kill()
    assert read_local_dataset(out, "deltas").height > 0
    res = CliRunner().invoke(cli_app, ["validate-config", "-c", str(cfg)], env={"S3_BUCKET": ""})
    assert res.exit_code == 2 and "S3_BUCKET is not set" in res.output  # a real run needs it


def test_two_simulated_runs_into_one_output_verify(tmp_path):
    """Found by the read-back audit: every `--simulate` start gave the books the same ids
    (they follow the seed), so a second run into the same `--output` stored updates with
    the first run's ids: `verify` reported hundreds of "conflicting" messages and `book`
    refused. Ids now start from the clock, above an earlier run's, as a venue's do across
    a restart; the two runs are then one chain with a `start` row between them."""
    # Binance: no in-stream snapshot restarts its chain (the audit saw Binance and KuCoin)
    cfg = write_config(tmp_path / "cfg", sim=None, spool=tmp_path / "spool")
    out = tmp_path / "out"
    between = None
    for n in (1, 2):
        col = Collector(cfg, tmp_path / f"c{n}.log", duration=3, output=out, simulate=True)
        try:
            assert col.wait(40) == 0, col.text()
        finally:
            col.kill()
        between = between or datetime.now(UTC)
    deltas = read_local_dataset(out, "deltas")
    first = deltas.filter(pl.col("receive_time") < between)
    second = deltas.filter(pl.col("receive_time") >= between)
    assert first.height and second.height
    below = first.group_by("symbol").agg(pl.col("last_update_id").max().alias("last"))
    above = second.group_by("symbol").agg(pl.col("first_update_id").min().alias("first"))
    both = below.join(above, on="symbol")
    assert both.height and (both["first"] > both["last"]).all(), both
    res = CliRunner().invoke(cli_app, ["verify", str(out)])
    assert res.exit_code == 0, res.output
    assert "OK: no problems found" in res.output


def test_simulate_without_output_is_a_usage_error(tmp_path):
    cfg = write_config(tmp_path / "cfg", sim=None, spool=tmp_path / "spool")
    args = ["collect", "-c", str(cfg), "-e", "binance", "--simulate", "--duration", "1"]
    res = CliRunner().invoke(cli_app, [*args, "--no-status"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (
        "error: --simulate needs --output DIR: simulated books are stored only there, "
        "never in S3, storage.local_path or storage.spool.path"
    )
    assert not (tmp_path / "spool").exists() and not (tmp_path / "cfg" / "data").exists()


def test_simulate_refuses_an_output_whose_spool_cannot_be_made(tmp_path):
    cfg = write_config(tmp_path / "cfg", sim=None, spool=tmp_path / "spool")
    out = tmp_path / "out"
    (tmp_path / "out.spool").write_text("x")  # a file where the simulated spool goes
    args = ["collect", "-c", str(cfg), "-e", "binance", "--simulate", "--output", str(out)]
    res = CliRunner().invoke(cli_app, [*args, "--duration", "1", "--no-status"])
    assert res.exit_code == 2, res.output
    assert re.fullmatch(
        rf"error: --output {re.escape(repr(str(out)))}: its spool "
        rf"{re.escape(repr(str(out) + '.spool'))} \(--simulate\) cannot be used: .+",
        res.output.strip(),
    ), res.output


# --- Ctrl-C at start ---------------------------------------------------------------------


def test_ctrl_c_while_the_simulator_builds_its_books_stops_cleanly(tmp_path):
    """Found by the CLI audit: SIGINT while `--simulate` built its books (the simulator
    started inside the root nursery before the signal watcher) was a KeyboardInterrupt in
    that task: an ~80-line `BaseExceptionGroup` traceback and exit 1. Now the watcher
    runs first and the run stops as it does later: `done (SIGINT)`, exit 130.

    The ops endpoint's `metrics:` line is logged just before the simulator starts; with the
    shipped table (~120 symbols, four venues) building the books takes ~0.5 s, so the
    signal sent on that line lands in it."""
    cfg = make_config(
        tmp_path / "configs",
        overrides={
            "metrics.enabled": True,
            "metrics.port": 0,
            "storage.spool.path": str(tmp_path / "spool"),
            "logging.format": "json",
        },
    )
    args = [sys.executable, "-m", "cryptoflow", "collect", "-e", "all", "--simulate"]
    args += ["--config", str(cfg), "--output", str(tmp_path / "out"), "--no-status"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "LOG_"))}
    proc = subprocess.Popen(
        [*args, "--duration", "60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    watchdog = threading.Timer(60, proc.kill)  # bounded even if no line ever comes
    watchdog.start()
    try:
        head = []
        for line in proc.stderr:  # type: ignore[union-attr]
            head.append(line)
            if "metrics: http://" in line:
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(head) + rest
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert '"msg":"stopping (SIGINT)' in err and '"msg":"done (SIGINT): ' in err, err[-3000:]


def test_a_group_of_nothing_but_ctrl_c_unwraps_to_keyboard_interrupt():
    """What reaches the CLI from a nursery: a KeyboardInterrupt in a (nested) group is
    Ctrl-C (exit 130), not an unexpected error; mixed with an error it stays a group."""
    nested = BaseExceptionGroup("outer", [BaseExceptionGroup("inner", [KeyboardInterrupt()])])
    for group in (BaseExceptionGroup("one", [KeyboardInterrupt()]), nested):
        with pytest.raises(KeyboardInterrupt), single_error_unwrapped():
            raise group
    mixed = BaseExceptionGroup("mixed", [KeyboardInterrupt(), ValueError("x")])
    with pytest.raises(BaseExceptionGroup), single_error_unwrapped():
        raise mixed


def test_ctrl_c_while_the_cli_imports_exits_130_without_a_traceback():
    """SIGINT in the first ~0.1 s (typer, click, rich loading) printed a KeyboardInterrupt
    traceback. Made deterministic: the import of typer raises it."""
    code = (
        "import runpy, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'typer':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "runpy.run_module('cryptoflow', run_name='__main__', alter_sys=True)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 130, res.stderr
    assert res.stderr == "" and res.stdout == ""
