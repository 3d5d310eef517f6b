"""CloudWatch publishing against moto's server (a real AWS API on 127.0.0.1), and the
dashboard generator."""

from __future__ import annotations

import datetime as dt
import functools
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import trio
from conftest import TEST_KEY_ID, TEST_REGION, TEST_SECRET
from test_metrics import diff, make_result

from cryptoflow.ops.cloudwatch import CloudWatchPublisher, make_client, publish_cloudwatch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cloudwatch_dashboard.py"


def client_for(endpoint: str):
    return make_client(
        region=TEST_REGION,
        endpoint_url=endpoint,
        aws_access_key_id=TEST_KEY_ID,
        aws_secret_access_key=TEST_SECRET,
    )


def sums(client, namespace: str, name: str, dims: dict[str, str]) -> float:
    now = dt.datetime.now(dt.UTC)
    resp = client.get_metric_data(
        MetricDataQueries=[
            {
                "Id": "q",
                "MetricStat": {
                    "Metric": {
                        "Namespace": namespace,
                        "MetricName": name,
                        "Dimensions": [{"Name": k, "Value": v} for k, v in dims.items()],
                    },
                    "Period": 60,
                    "Stat": "Sum",
                },
            }
        ],
        StartTime=now - dt.timedelta(minutes=10),
        EndTime=now + dt.timedelta(minutes=10),
    )
    (res,) = resp["MetricDataResults"]
    return sum(res["Values"])


async def test_publish_to_moto(s3_server: str):
    namespace = f"Test{uuid.uuid4().hex[:8]}"
    result, _send = make_result()
    client = await trio.to_thread.run_sync(client_for, s3_server)
    async with trio.open_nursery() as nursery:
        publisher = await nursery.start(
            functools.partial(
                publish_cloudwatch,
                lambda: result,
                interval=3600,
                namespace=namespace,
                service="svc",
                client=client,
            )
        )
        assert isinstance(publisher, CloudWatchPublisher)
        # new data after the start; the final publish on cancel sends it
        result.shards["binance/main"].normalizer.feed(diff(41, 45, 40))
        result.writer.upload_failures += 1
        nursery.cancel_scope.cancel()

    metrics = await trio.to_thread.run_sync(
        lambda: client.list_metrics(Namespace=namespace)["Metrics"]
    )
    names = {m["MetricName"] for m in metrics}
    assert {"Messages", "Gaps", "Resyncs", "Rows", "MaxEventAge"} <= names
    assert {"SpoolBytes", "SpoolFiles", "UploadFailures", "RowsReceived"} <= names
    dims = {frozenset((d["Name"], d["Value"]) for d in m["Dimensions"]) for m in metrics}
    assert frozenset({("Service", "svc"), ("Exchange", "binance")}) in dims
    assert frozenset({("Service", "svc"), ("Exchange", "binance"), ("Shard", "main")}) in dims

    ex = {"Service": "svc", "Exchange": "binance"}
    get = functools.partial(sums, client, namespace)
    # BTC 3 diffs + 2 snapshots + 1 new diff, ETH 1 diff
    assert await trio.to_thread.run_sync(get, "Messages", ex) == 7
    assert await trio.to_thread.run_sync(get, "Gaps", ex) == 1
    assert await trio.to_thread.run_sync(get, "Rows", ex) == 12
    svc = {"Service": "svc"}
    assert await trio.to_thread.run_sync(get, "UploadFailures", svc) == 3
    assert await trio.to_thread.run_sync(get, "SpoolBytes", svc) == 12345


async def test_deltas_and_failed_publish_carried_over(s3_server: str):
    result, _send = make_result()
    bad = await trio.to_thread.run_sync(client_for, "http://127.0.0.1:9")  # nothing listens
    publisher = CloudWatchPublisher(bad, namespace="x", service="svc")
    limiter = trio.CapacityLimiter(1)
    assert not await publisher.publish(result, limiter=limiter)
    data, _ = publisher.metric_data(result)
    up = [d for d in data if d["MetricName"] == "UploadFailures"]
    assert up[0]["Value"] == 2  # nothing committed: the whole count is still pending

    publisher.client = await trio.to_thread.run_sync(client_for, s3_server)
    assert await publisher.publish(result, limiter=limiter)
    result.writer.upload_failures += 5
    data, _ = publisher.metric_data(result)
    by_name = {(d["MetricName"], len(d["Dimensions"])): d["Value"] for d in data}
    assert by_name[("UploadFailures", 1)] == 5  # delta since the successful publish
    assert by_name[("Messages", 2)] == 0
    assert by_name[("SpoolBytes", 1)] == 12345  # gauges: current value


def _run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_dashboard_has_a_widget_row_per_exchange_and_shard(tmp_path: Path):
    for name in ("config.yml", "symbols.yml"):
        shutil.copy(ROOT / "configs" / name, tmp_path / name)
    (tmp_path / "ip_shards.yml").write_text(
        "shards:\n"
        "  - name: a\n    source_ip: null\n"
        "    symbols:\n      binance: [BTCUSDT]\n      bybit: [BTCUSDT]\n"
        "  - name: b\n    source_ip: 10.0.0.2\n"
        "    symbols:\n      binance: [ETHUSDT]\n"
    )
    proc = _run_script("--config", str(tmp_path / "config.yml"), "--region", "eu-west-1",
                       cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    titles = [w["properties"].get("title", "") for w in body["widgets"]]
    for label in ("binance/a", "binance/b", "bybit/a"):
        assert f"{label}: messages" in titles
    assert "okx/a: messages" not in titles
    assert "binance: rows" in titles and "bybit: gaps / resyncs" in titles
    assert "spool backlog" in titles
    metric_widgets = [w for w in body["widgets"] if w["type"] == "metric"]
    assert all(w["properties"]["region"] == "eu-west-1" for w in metric_widgets)
    (shard_b,) = [w for w in metric_widgets if w["properties"]["title"] == "binance/b: messages"]
    assert shard_b["properties"]["metrics"] == [
        ["Cryptoflow", "Messages", "Service", "cryptoflow", "Exchange", "binance", "Shard", "b"]
    ]
    for w in body["widgets"]:
        assert w["x"] + w["width"] <= 24


def test_dashboard_for_shipped_config_and_bad_config(tmp_path: Path):
    proc = _run_script("--config", "configs/config.yml", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["widgets"]
    proc = _run_script("--config", str(tmp_path / "missing.yml"), cwd=tmp_path)
    assert proc.returncode == 2 and "error" in proc.stderr
