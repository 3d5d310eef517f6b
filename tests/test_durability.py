"""Durability (issue 6) against a real S3 API (moto server mode) and real processes.

Every process test is bounded (durations, `wait(timeout)`) and kills its children in
`finally`. The collector reads a standalone simulator shared by all its runs, so update
ids keep rising across restarts and "exactly once" can be checked by row keys.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
import trio
from storage_support import (
    DELTA_KEY,
    SNAPSHOT_KEY,
    Collector,
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
    write_config,
    writer_totals,
)
from typer.testing import CliRunner

from cryptoflow.cli import app as cli_app
from cryptoflow.config_schema import BufferSection
from cryptoflow.models import Dataset
from cryptoflow.pipeline.rows import RowBatch
from cryptoflow.pipeline.writer import Writer, WriterStats
from cryptoflow.storage import layout, parquet
from cryptoflow.storage import spool as spool_mod
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.spool import Spool, check_spool_dir

SYMBOLS = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
#: documented SIGKILL loss bound for deltas = storage.spool.max_age (+ one flush's
#: encode/fsync and the in-memory channel hop); tests allow this much slack on top
LOSS_SLACK_S = 0.75


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartableMoto:
    """moto's server on a fixed port; stop() = outage (connection refused), state kept."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def moto_restartable():
    m = RestartableMoto()
    try:
        yield m
    finally:
        m.stop()


def _bucket(client) -> str:
    name = f"dur-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- outage ----------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_outage_then_recovery_every_row_exactly_once(tmp_path, moto_restartable):
    moto = moto_restartable
    client = s3_client(moto.endpoint)
    bucket = _bucket(client)
    sim = Simulator(SYMBOLS)
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "cfg", sim=sim, spool=spool, s3=True, shutdown_timeout=20)
    col = Collector(cfg, tmp_path / "c.log", env=s3_env(moto.endpoint, bucket))
    try:
        col.wait_for(r"connected", 20)
        wait_until(lambda: len(list_keys(client, bucket)) > 0, 15, "first uploads")
        moto.stop()  # outage: connection refused
        outage_start = time.time()
        rss0 = _rss_kb(col.proc.pid)
        wait_until(lambda: len(spool_files(spool)) >= 10, 20, "spool to grow")
        time.sleep(max(0.0, 6 - (time.time() - outage_start)))
        assert col.proc.poll() is None, "collector must keep running during the outage"
        grown = len(spool_files(spool))
        rss1 = _rss_kb(col.proc.pid)
        assert grown >= 10
        # data waits on disk, not in RAM (generous bound: interpreter noise, not buffers)
        assert rss1 - rss0 < 40_000, (rss0, rss1)
        moto.start()
        wait_until(lambda: not spool_files(spool), 60, "spool to drain after recovery")
        col.signal(signal.SIGTERM)
        assert col.wait(30) == 0
        text = col.text()
        assert "upload of" in text and "failed (kept in spool, will retry)" in text
        totals = writer_totals(text)
        counts = check_exactly_once(client, bucket, sim, totals["received"])
        assert counts["deltas"] > 0 and counts["snapshots"] > 0
    finally:
        col.kill()
        sim.kill()


# --- SIGKILL ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_restart_no_duplicates_and_bounded_loss(tmp_path, s3_bucket):
    client = s3_bucket.client()
    sim = Simulator(SYMBOLS)
    spool = tmp_path / "spool"
    max_age = 1.0
    cfg = write_config(tmp_path / "cfg", sim=sim, spool=spool, s3=True, max_age=max_age)
    env = s3_env(s3_bucket.endpoint_url, s3_bucket.name)
    first = Collector(cfg, tmp_path / "c1.log", env=env)
    second = None
    try:
        first.wait_for(r"connected", 20)
        time.sleep(5)
        kill_ns = time.time_ns()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        leftover = spool_files(spool)
        second = Collector(cfg, tmp_path / "c2.log", env=env, duration=4)
        assert second.wait(40) == 0, second.text()
        if leftover:
            assert "left by an earlier run" in second.text()
        assert not spool_files(spool)
        keys = list_keys(client, s3_bucket.name, "cf/")
        for k in keys:
            layout.parse_key(k)
        deltas = read_s3_dataset(client, s3_bucket.name, "cf/deltas/")  # all complete
        snaps = read_s3_dataset(client, s3_bucket.name, "cf/snapshots/")
        assert duplicates(deltas, DELTA_KEY) == 0
        assert duplicates(snaps, SNAPSHOT_KEY) == 0
        losses = {sym: chain_loss(deltas, sym, kill_ns) for sym in SYMBOLS}
        # rows accepted more than max_age (+ slack) before the kill are all present
        assert max(losses.values()) <= max_age + LOSS_SLACK_S, losses
        print(f"measured SIGKILL loss window per symbol (s): {losses}")
    finally:
        first.kill()
        if second is not None:
            second.kill()
        sim.kill()


# --- SIGTERM with S3 down ----------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_with_s3_down_exits_in_time_keeps_spool_next_start_uploads(
    tmp_path, moto_restartable
):
    moto = moto_restartable
    client = s3_client(moto.endpoint)
    bucket = _bucket(client)
    sim = Simulator(SYMBOLS)
    spool = tmp_path / "spool"
    shutdown_timeout = 4.0
    cfg = write_config(
        tmp_path / "cfg", sim=sim, spool=spool, s3=True, shutdown_timeout=shutdown_timeout
    )
    env = s3_env(moto.endpoint, bucket)
    first = Collector(cfg, tmp_path / "c1.log", env=env)
    second = None
    try:
        first.wait_for(r"connected", 20)
        time.sleep(2)
        moto.stop()
        time.sleep(3)
        t0 = time.time()
        first.signal(signal.SIGTERM)
        assert first.wait(shutdown_timeout + 6) == 0
        took = time.time() - t0
        assert took <= shutdown_timeout + 3, took
        text1 = first.text()
        last_line = text1.strip().splitlines()[-1]
        assert "left in spool=" in last_line and "left in spool=0" not in last_line, last_line
        assert "LOST" not in text1
        kept = spool_files(spool)
        assert kept
        totals1 = writer_totals(text1)
        assert totals1["spooled"] == totals1["received"]

        moto.start()
        second = Collector(cfg, tmp_path / "c2.log", env=env, duration=3)
        assert second.wait(40) == 0, second.text()
        text2 = second.text()
        assert f"uploading {len(kept)} spool files" in text2
        assert not spool_files(spool)
        totals2 = writer_totals(text2)
        check_exactly_once(client, bucket, sim, totals1["received"] + totals2["received"])
    finally:
        first.kill()
        if second is not None:
            second.kill()
        sim.kill()


# --- unwritable / full spool ------------------------------------------------------------


def test_unwritable_spool_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cfg = write_config(tmp_path / "cfg", sim=None, spool=blocker / "spool")
    res = CliRunner().invoke(cli_app, ["validate-config", "--config", str(cfg)])
    assert res.exit_code == 2  # a configured path that cannot be used: file:line: key
    assert f"{cfg}:" in res.output and ": storage.spool.path: " in res.output
    assert "not a directory" in res.output and "disk full" not in res.output
    # no --simulate: it uses a spool of its own; refused before any venue is reached
    res = CliRunner().invoke(cli_app, ["collect", "--config", str(cfg), "--exchange", "binance"])
    assert res.exit_code == 2
    assert "storage.spool.path" in res.output and "cannot create" in res.output
    assert "Traceback" not in res.output


def test_full_disk_is_a_clear_error(tmp_path, monkeypatch):
    real = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_frsize = st.f_frsize
            self.f_bavail = 10

    monkeypatch.setattr(spool_mod.os, "statvfs", lambda p: Tiny(real(p)))
    errors, _ = check_spool_dir(tmp_path / "spool", 10**9)
    assert errors and "disk full?" in errors[0]
    monkeypatch.setattr(spool_mod.os, "statvfs", real)
    errors, warnings = check_spool_dir(tmp_path / "spool", 10**18)
    assert not errors and "less than storage.spool.max_bytes" in warnings[0]


def test_spool_disk_error_at_runtime_is_an_alarm_and_keeps_rows(tmp_path, monkeypatch, caplog):
    """A disk that fails while running: ERROR log, rows stay buffered, nothing
    half-written reaches the store, and once the disk recovers everything goes up."""

    async def main():
        spool = Spool(tmp_path / "spool", max_bytes=10**9)
        store = LocalStore(tmp_path / "out")
        from conftest import tiny_frame_from_columns

        w = Writer(
            store,
            spool,
            BufferSection(delta_flush_interval=0.2),
            limiter=trio.CapacityLimiter(1),
            frame_builder=tiny_frame_from_columns,
            retry_initial=0.05,
            retry_max=0.1,
        )
        calls = {"n": 0}
        real_write = spool_mod.write_atomic

        def failing(path, data):
            calls["n"] += 1
            if calls["n"] <= 3:
                raise OSError(28, "No space left on device")
            real_write(path, data)

        monkeypatch.setattr(spool_mod, "write_atomic", failing)
        send, recv = trio.open_memory_channel(10)
        async with trio.open_nursery() as n:
            n.start_soon(w.run, recv)
            await send.send(_delta_batch(0, 50))
            await trio.sleep(1.0)
            await send.aclose()
        return w.stats

    stats = trio.run(main)
    assert stats.flush_failures >= 1
    assert "No space left on device" in caplog.text
    assert sum(stats.rows_uploaded.values()) == 50
    assert not list((tmp_path / "spool").rglob("*.tmp-*"))


def _delta_batch(start: int, n: int, symbol: str = "BTCUSDT") -> RowBatch:
    ids = list(range(start, start + n))
    ts = [1_741_082_400_000 + i for i in ids]
    return RowBatch(
        Dataset.DELTAS,
        "binance",
        "futures",
        symbol,
        {
            "timestamp": ts,
            "receive_time": [t * 1_000_000 for t in ts],
            "first_update_id": ids,
            "last_update_id": ids,
            "prev_update_id": [i - 1 for i in ids],
            "side": ["bid"] * n,
            "price": [str(100 + i) for i in ids],
            "quantity": ["1"] * n,
            "raw_quantity": ["1"] * n,
        },
        n,
        "1",
    )


# --- spool full policy ----------------------------------------------------------------


async def test_spool_full_warns_counts_backpressures_never_drops(tmp_path, clock):
    from conftest import tiny_frame_from_columns

    one = parquet.encode(
        tiny_frame_from_columns(
            Dataset.DELTAS, "binance", "futures", "BTCUSDT", _delta_batch(0, 10).columns
        )
    )
    spool = Spool(tmp_path / "spool", max_bytes=int(len(one) * 2.2))

    class DownStore:
        def __init__(self):
            self.up = False
            self.inner = LocalStore(tmp_path / "out")

        def describe(self):
            return "down"

        async def put_file(self, key, path):
            from cryptoflow.errors import StorageUnavailable

            if not self.up:
                raise StorageUnavailable("connection refused")
            await self.inner.put_file(key, path)

    store = DownStore()
    w = Writer(
        store,
        spool,
        BufferSection(delta_flush_interval=1.0, max_rows=10),
        limiter=trio.CapacityLimiter(1),
        frame_builder=tiny_frame_from_columns,
        max_buffered_rows=30,
        retry_initial=0.5,
        retry_max=2.0,
    )
    send, recv = trio.open_memory_channel(1)
    sent = 0
    async with trio.open_nursery() as n:
        n.start_soon(w.run, recv)
        for i in range(12):
            with trio.move_on_after(5) as cs:
                await send.send(_delta_batch(i * 10, 10))
            if cs.cancelled_caught:
                break  # back-pressure: the writer stopped reading
            sent += 10
            await trio.sleep(0.5)
        # wait in real time (virtual time holds while a thread runs: tests/threadclock.py)
        for _ in range(1000):
            if w.stats.spool_full_events > 0 and w.stats.spool_warnings >= 1:
                break
            await trio.to_thread.run_sync(time.sleep, 0.01)
        assert w.stats.spool_full_events > 0 and w.stats.spool_warnings >= 1
        assert w.stats.backpressure
        assert spool.bytes <= spool.max_bytes
        store.up = True  # S3 back: the spool drains, writes are accepted again
        for i in range(12, 14):
            await send.send(_delta_batch(i * 10, 10))
            sent += 10
        await send.aclose()
    assert sum(w.stats.rows_uploaded.values()) == sent
    assert spool.files == 0


async def test_max_age_caps_delta_buffer_age(tmp_path, clock):
    from conftest import tiny_frame_from_columns

    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    w = Writer(
        LocalStore(tmp_path / "out"),
        spool,
        BufferSection(delta_flush_interval=30.0),
        limiter=trio.CapacityLimiter(1),
        frame_builder=tiny_frame_from_columns,
        max_age=1.0,
    )
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as n:
        n.start_soon(w.run, recv)
        t0 = trio.current_time()
        await send.send(_delta_batch(0, 5))
        while w.stats.rows_spooled["deltas"] == 0:
            await trio.sleep(0.05)
        assert trio.current_time() - t0 <= 1.3  # max_age 1 s (+ polling), not 30 s
        await send.aclose()


# --- corrupt spool file at start (through collect) ----------------------------------------


@pytest.mark.slow
def test_corrupt_spool_file_quarantined_at_collect_start(tmp_path, s3_bucket):
    from conftest import tiny_frame_from_columns

    spool = tmp_path / "spool"
    good = tiny_frame_from_columns(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", _delta_batch(0, 7, "XRPUSDT").columns
    )
    [(good_key, _, good_bytes)] = layout.files_for_frame(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", good
    )
    bad = tiny_frame_from_columns(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", _delta_batch(100, 7, "XRPUSDT").columns
    )
    [(bad_key, _, bad_bytes)] = layout.files_for_frame(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", bad
    )
    s = Spool(spool, max_bytes=10**9)
    s.write(good_key, good_bytes)
    (spool / bad_key).write_bytes(bad_bytes[: len(bad_bytes) // 2])  # truncated
    # a standalone simulator: `--simulate` never uploads, nor reads the configured spool
    sim = Simulator(["BTCUSDT"])
    cfg = write_config(tmp_path / "cfg", sim=sim, spool=spool, s3=True)
    col = Collector(
        cfg, tmp_path / "c.log", env=s3_env(s3_bucket.endpoint_url, s3_bucket.name), duration=3
    )
    try:
        assert col.wait(40) == 0, col.text()
    finally:
        col.kill()
        sim.kill()
    text = col.text()
    assert "QUARANTINED" in text and bad_key in text
    keys = s3_bucket.keys("cf/")
    assert f"cf/{good_key}" in keys
    assert f"cf/{bad_key}" not in keys
    assert (spool / "quarantine" / bad_key).exists()
    assert (spool / "quarantine" / (bad_key + ".reason")).read_text().strip()
    assert any("/snapshots/" in k for k in keys)  # and the service kept collecting


@pytest.mark.parametrize("failure", ["EMFILE", "MemoryError"])
def test_a_scan_failing_for_the_machine_fails_the_start_with_one_line(
    tmp_path, monkeypatch, failure
):
    """Found by review: at collect start, a spool file the scan could not read because
    the process was out of file descriptors was quarantined as corrupt (never uploaded);
    and a MemoryError there (already no reason to quarantine) ended the start with
    `error: unexpected ExceptionGroup: Exceptions from Trio nursery`. Now both fail the
    start with one line naming the spool and the error, and move nothing."""
    from conftest import tiny_frame_from_columns

    spool = tmp_path / "spool"
    frame = tiny_frame_from_columns(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", _delta_batch(0, 7, "XRPUSDT").columns
    )
    [(key, _, data)] = layout.files_for_frame(
        Dataset.DELTAS, "binance", "futures", "XRPUSDT", frame
    )
    healthy = Spool(spool, max_bytes=10**9).write(key, data).path
    cfg = write_config(tmp_path / "cfg", sim=None, spool=spool)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == healthy:
            if failure == "MemoryError":
                raise MemoryError
            raise OSError(24, "Too many open files", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    # no --simulate (it has a spool of its own): the scan fails before any venue is reached
    args = ["collect", "--config", str(cfg), "--exchange", "binance"]
    res = CliRunner().invoke(cli_app, [*args, "--duration", "5", "--no-status"])
    assert res.exit_code == 1, res.output
    (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: spool {spool}: the start-up scan failed (")
    want = f"[Errno 24] Too many open files: '{healthy}'" if failure == "EMFILE" else "MemoryError"
    assert want in line and "ExceptionGroup" not in res.output
    assert healthy.exists() and not (spool / "quarantine").exists()
    assert "collecting" not in res.output


# --- operator commands ------------------------------------------------------------------


def test_spool_status_and_flush_commands(tmp_path, s3_bucket, monkeypatch):
    from conftest import tiny_frame_from_columns

    spool = tmp_path / "spool"
    s = Spool(spool, max_bytes=10**9)
    written = []
    for i in range(3):
        frame = tiny_frame_from_columns(
            Dataset.DELTAS, "binance", "futures", "BTCUSDT", _delta_batch(i * 10, 10).columns
        )
        [(key, _, data)] = layout.files_for_frame(
            Dataset.DELTAS, "binance", "futures", "BTCUSDT", frame
        )
        s.write(key, data)
        written.append(key)
    cfg = write_config(tmp_path / "cfg", sim=None, spool=spool, s3=True)
    for k, v in s3_env(s3_bucket.endpoint_url, s3_bucket.name).items():
        if k.startswith(("AWS_", "S3_")):
            monkeypatch.setenv(k, v)
    runner = CliRunner()
    res = runner.invoke(cli_app, ["spool", "status", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "deltas" in res.output and "3 files" in res.output
    res = runner.invoke(cli_app, ["spool", "flush", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "uploaded 3 files" in res.output
    assert sorted(s3_bucket.keys("cf/")) == sorted(f"cf/{k}" for k in written)
    res = runner.invoke(cli_app, ["spool", "status", "--config", str(cfg)])
    assert "0 files" in res.output


async def _three_rounds(out: Path, sp: Path, *, upload_interval: float, store=None) -> WriterStats:
    """A writer on a fresh spool: 3 flush rounds x 2 symbols x 5 delta rows (30), then
    its drain (the start scan and the stop, as `collect` does)."""
    from test_writer import T0, delta_batch

    spool = Spool(sp, max_bytes=10**9)
    spool.scan()
    w = Writer(
        store or LocalStore(out),
        spool,
        BufferSection(delta_flush_interval=0.2),
        limiter=trio.CapacityLimiter(2),
        upload_interval=upload_interval,
        retry_initial=0.3,
    )
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as n:
        n.start_soon(w.run, recv)
        for r in range(3):
            for sym in ("BTCUSDT", "ETHUSDT"):
                await send.send(delta_batch(1 + 5 * r, 5, T0 + 1000 * r, sym))
            await trio.sleep(0.5)
        await send.aclose()
    return w.stats


def _restart_and_read(out: Path, sp: Path):
    """What the next start does (scan, then upload what waits); all stored rows."""
    from cryptoflow.pipeline.writer import drain_spool

    restarted = Spool(sp, max_bytes=10**9)
    restarted.scan()
    trio.run(lambda: drain_spool(restarted, LocalStore(out)))
    return pl.concat([pl.read_parquet(p) for p in out.rglob("*.parquet")])


def test_spool_write_whose_dir_fsync_fails_leaves_no_file(tmp_path, monkeypatch) -> None:
    """A journal renamed into place whose directory fsync then fails is reported as not
    written, and the writer spools its rows again in a later journal. The first file
    must not stay behind: the next start's scan would upload it too (rows twice)."""
    import errno

    real_fsync_dir = spool_mod.fsync_dir
    failed = []

    def flaky_fsync_dir(path) -> None:
        p = Path(path)
        written = p.name == "deltas" and any(not f.name.startswith(".") for f in p.iterdir())
        if not failed and p.parent.name == "journal" and written:
            failed.append(p)
            raise OSError(errno.EIO, "Input/output error (injected, dir fsync)")
        real_fsync_dir(path)

    monkeypatch.setattr(spool_mod, "fsync_dir", flaky_fsync_dir)
    out, sp = tmp_path / "out", tmp_path / "spool"
    stats = trio.run(lambda: _three_rounds(out, sp, upload_interval=0.0))
    assert failed and stats.flush_failures >= 1
    monkeypatch.setattr(spool_mod, "fsync_dir", real_fsync_dir)
    assert not list(sp.rglob("*.parquet"))  # nothing left behind by the failed write
    rows = _restart_and_read(out, sp)
    assert rows.height == 30
    assert rows.unique(subset=["symbol", "last_update_id"]).height == 30


def test_merged_source_that_cannot_be_deleted_is_deleted_by_the_next_scan(
    tmp_path, monkeypatch
) -> None:
    """A journal whose split outputs were written (and then uploaded) but which could not
    be deleted: nothing in the spool names it any more, so the next start would split
    and upload its rows again. Its key is recorded and the next scan deletes it."""
    import errno
    import pathlib

    real_unlink = pathlib.Path.unlink
    failed = []

    def flaky_unlink(self, missing_ok=False):
        if not failed and "/journal/" in str(self) and spool_mod.TMP_MARK not in self.name:
            failed.append(self)
            raise OSError(errno.EIO, "injected unlink EIO")
        return real_unlink(self, missing_ok=missing_ok)

    out, sp = tmp_path / "out", tmp_path / "spool"
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "unlink", flaky_unlink)
        # upload_interval 60: one split of several journals at the drain
        trio.run(lambda: _three_rounds(out, sp, upload_interval=60.0))
    assert failed and failed[0].exists()  # the undeleted journal is still there
    rows = _restart_and_read(out, sp)
    assert not failed[0].exists()
    assert rows.height == 30
    assert rows.unique(subset=["symbol", "last_update_id"]).height == 30


class CopyStore:
    """Stores a copy, like S3: the spool file is still there after the upload."""

    def __init__(self, root: Path) -> None:
        self.root, self.puts = root, []

    def describe(self) -> str:
        return f"copy:{self.root}"

    async def put_file(self, key: str, path: Path) -> None:
        self.puts.append(key)
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(path).read_bytes())


def test_spool_file_that_cannot_be_deleted_after_its_upload_is_doomed_not_fatal(
    tmp_path, monkeypatch, caplog
) -> None:
    """After a verified upload to S3 the spool copy is deleted. An unlink that fails
    there (EIO, a read-only remount) ended the writer, and the collector, at every
    start. The object is stored: the key is listed in .doomed, the writer goes on, the
    next start neither fails nor uploads it again, and deletes it once it can."""
    import errno
    import pathlib

    from cryptoflow.pipeline.writer import drain_spool

    out, sp = tmp_path / "out", tmp_path / "spool"
    real_unlink = pathlib.Path.unlink
    stuck: list[Path] = []

    def flaky_unlink(self, missing_ok=False):
        data = self.name.endswith(".parquet") and "/journal/" not in str(self)
        if self in stuck or (not stuck and data and spool_mod.TMP_MARK not in self.name):
            stuck[:] = [self]
            raise OSError(errno.EIO, "injected unlink EIO")
        return real_unlink(self, missing_ok=missing_ok)

    store = CopyStore(out)
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "unlink", flaky_unlink)
        stats = trio.run(lambda: _three_rounds(out, sp, upload_interval=0.0, store=store))
        assert stats.rows_uploaded["deltas"] == 30 and stats.spool_files == 0
        [kept] = stuck
        key = kept.relative_to(sp).as_posix()
        assert kept.exists() and (sp / ".doomed").read_text() == key + "\n"
        assert f"cannot delete {key} after it was stored" in caplog.text
        # the next start, the file still undeletable: no failure, not uploaded again
        restarted = Spool(sp, max_bytes=10**9)
        restarted.scan()
        assert restarted.pending() == [] and Spool(sp, max_bytes=10**9).load().files == 0
        puts = len(store.puts)
        trio.run(lambda: drain_spool(restarted, store))
        assert len(store.puts) == puts
    rows = pl.concat([pl.read_parquet(p) for p in out.rglob("*.parquet")])
    assert rows.height == rows.unique(subset=["symbol", "last_update_id"]).height == 30
    Spool(sp, max_bytes=10**9).scan()  # deletable again: deleted
    assert not kept.exists() and not (sp / ".doomed").exists()


async def test_backpressure_error_is_logged_once_per_episode(tmp_path, clock, caplog):
    """Found by an audit (repro.sh lingering: the ERROR `writer: N rows ... input paused
    (back-pressure)` 48 times in 1.5 s): each refused flush turned the buffered list rows
    into smaller frames, the writer was under its memory cap again, read a batch, was
    over it again and logged again, while the spool refused throughout. One ERROR per
    episode: until the refused rows are spooled."""
    from conftest import tiny_frame_from_columns

    one = parquet.encode(
        tiny_frame_from_columns(
            Dataset.DELTAS, "binance", "futures", "BTCUSDT", _delta_batch(0, 10).columns
        )
    )
    spool = Spool(tmp_path / "spool", max_bytes=int(len(one) * 2.2))

    class DownStore:
        up = False
        inner = LocalStore(tmp_path / "out")

        def describe(self):
            return "down"

        async def put_file(self, key, path):
            from cryptoflow.errors import StorageUnavailable

            if not self.up:
                raise StorageUnavailable("connection refused")
            await self.inner.put_file(key, path)

    store = DownStore()
    w = Writer(
        store,
        spool,
        # about three batches of list rows (40 bytes a cell), fewer as frames
        BufferSection(delta_flush_interval=0.2, max_rows=10, max_total_bytes=10_000),
        limiter=trio.CapacityLimiter(1),
        frame_builder=tiny_frame_from_columns,
        retry_initial=0.2,
        retry_max=0.5,
    )
    send, recv = trio.open_memory_channel(1)
    sent = 0
    paused = 0
    with caplog.at_level(logging.ERROR, logger="cryptoflow.pipeline.writer"):
        async with trio.open_nursery() as n:
            n.start_soon(w.run, recv)
            for i in range(60):
                with trio.move_on_after(0.5):
                    await send.send(_delta_batch(i * 10, 10, symbol=f"S{i % 7}USDT"))
                    sent += 10
                paused += w.stats.backpressure
                await trio.sleep(0.02)
            store.up = True  # S3 back: the spool drains, writes are accepted again
            await send.aclose()
    assert paused and sum(w.stats.rows_uploaded.values()) == sent
    errors = [r.getMessage() for r in caplog.records if "(back-pressure)" in r.getMessage()]
    assert len(errors) == 1, errors
