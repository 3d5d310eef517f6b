"""Upload batching (`storage.upload_interval`): a symbol-hour's one-second spool files go
up as ONE merged object, exactly once, also across a crash between upload and cleanup."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import threadclock
import trio
from test_writer import T0, FlakyStore, delta_batch, setup, stored

from cryptoflow.errors import StorageUnavailable
from cryptoflow.models import Dataset
from cryptoflow.pipeline.writer import Writer, drain_spool
from cryptoflow.storage import layout, parquet
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.spool import Spool

HOUR_MS = 3_600_000


def objects(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


class CountingStore:
    def __init__(self, inner) -> None:
        self.inner, self.keys = inner, []

    def describe(self) -> str:
        return "counting"

    async def put_file(self, key, path):
        self.keys.append(key)
        await self.inner.put_file(key, path)


async def _feed(writer: Writer, batches, gap: float = 1.0, **run) -> None:
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: writer.run(recv, **run))
        for b in batches:
            await send.send(b)
            await trio.sleep(gap)
        await send.aclose()


def _writer(store, spool, cfg, frame_builder, interval: float, **kw) -> Writer:
    return Writer(
        store,
        spool,
        cfg,
        limiter=trio.CapacityLimiter(2),
        frame_builder=frame_builder,
        upload_interval=interval,
        **kw,
    )


# These run on the real clock: a MockClock jumps to the next deadline (an upload due
# time, the shutdown deadline) whenever a flush thread keeps the loop idle for 20 ms.
FLUSH = 0.05  # spool flush interval of these tests (s)


async def test_one_symbol_hour_becomes_one_object(tmp_path, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=FLUSH)
    counting = CountingStore(store)
    w = _writer(counting, spool, cfg, frame_builder, interval=2.0)
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.run, recv)
        for i in range(10):  # 10 spool files of one symbol-hour
            await send.send(delta_batch(1 + 10 * i, 10, T0 + 1000 * i))
            await trio.sleep(FLUSH * 1.5)
        with trio.fail_after(10):
            while w.stats.rows_spooled["deltas"] < 100:
                await trio.sleep(0.01)
        assert counting.keys == []  # younger than upload_interval: nothing uploaded yet
        with trio.fail_after(10):  # the partition comes due: merged + uploaded
            while w.stats.files_uploaded < 1:
                await trio.sleep(0.01)
        assert len(counting.keys) == 1
        await send.aclose()
    df = stored(out)
    assert df.height == 100
    assert df["last_update_id"].to_list() == list(range(1, 101))  # sorted, exactly once
    assert w.stats.rows_uploaded["deltas"] == 100
    # deltas are journaled: the journals of that hour are split into one file
    assert w.stats.files_spooled >= 5 and w.stats.splits == 1
    assert w.stats.files_merged == w.stats.files_spooled
    assert len(objects(out)) == 1 and len(counting.keys) == 1
    assert spool.files == 0
    for f in objects(out):  # names follow layout rules, and reflect the content
        kp = layout.parse_key(f.relative_to(out).as_posix())
        data = f.read_bytes()
        assert kp.content_hash == layout.content_hash(data)
        part = pl.read_parquet(f)
        assert kp.first_id == part["last_update_id"].min()
        assert kp.last_id == part["last_update_id"].max()


async def test_final_drain_merges_everything_regardless_of_age(tmp_path, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=FLUSH)
    counting = CountingStore(store)
    w = _writer(counting, spool, cfg, frame_builder, interval=3600.0)
    await _feed(w, [delta_batch(1 + 10 * i, 10, T0 + 1000 * i) for i in range(8)], gap=0.08)
    assert len(counting.keys) == 1
    assert w.stats.splits == 1 and w.stats.files_merged >= 2
    df = stored(out)
    assert df["last_update_id"].to_list() == list(range(1, 81))
    assert spool.files == 0


async def test_two_hours_two_objects(tmp_path, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=FLUSH)
    counting = CountingStore(store)
    w = _writer(counting, spool, cfg, frame_builder, interval=3600.0)
    t_end = T0 + HOUR_MS - 3000  # 10:59:57 .. 11:00:02: the hour boundary in the middle
    batches = [delta_batch(1 + 10 * i, 10, t_end + 1000 * i) for i in range(6)]
    await _feed(w, batches, gap=0.08)
    assert len(counting.keys) == 2, counting.keys
    hours = sorted(layout.parse_key(k).hour.hour for k in counting.keys)
    assert hours == [10, 11]
    df = stored(out)
    assert df.height == 60 and df["last_update_id"].n_unique() == 60
    assert spool.files == 0


async def test_interval_zero_is_one_object_per_spool_file(tmp_path, clock, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=1.0)
    counting = CountingStore(store)
    w = _writer(counting, spool, cfg, frame_builder, interval=0.0)
    await _feed(w, [delta_batch(1 + 10 * i, 10, T0 + 1000 * i) for i in range(5)], gap=1.5)
    assert w.stats.files_spooled == 5
    assert len(counting.keys) == 5 and w.stats.merges == 0
    assert stored(out).height == 50


async def test_symbols_not_merged_together(tmp_path, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=FLUSH)
    counting = CountingStore(store)
    w = _writer(counting, spool, cfg, frame_builder, interval=3600.0)
    batches = []
    for i in range(4):
        batches.append(delta_batch(1 + 10 * i, 10, T0 + 1000 * i, "BTCUSDT"))
        batches.append(delta_batch(1 + 10 * i, 10, T0 + 1000 * i, "ETHUSDT"))
    await _feed(w, batches, gap=0.04)
    assert len(counting.keys) == 2, counting.keys  # one per symbol
    assert {layout.parse_key(k).symbol for k in counting.keys} == {"BTCUSDT", "ETHUSDT"}
    assert stored(out).height == 80


async def test_failed_merged_upload_retried_under_same_key(tmp_path, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=FLUSH)
    flaky = FlakyStore(store, failures=3)
    counting = CountingStore(flaky)
    w = _writer(
        counting, spool, cfg, frame_builder, interval=3600.0, retry_initial=0.05, retry_max=0.1
    )
    await _feed(w, [delta_batch(1 + 10 * i, 10, T0 + 1000 * i) for i in range(4)], gap=0.08)
    assert len(set(counting.keys)) == 1 and len(counting.keys) == 4  # 3 failures + 1 ok
    assert stored(out)["last_update_id"].to_list() == list(range(1, 41))
    assert spool.files == 0


# --- crash between "merged object uploaded" and "spool cleaned up" ---------------------------


class CrashAfterPut:
    """The first put succeeds in the inner store, then fails as if the process died
    before the spool cleanup; the store is then unreachable, so the merged spool file
    stays, exactly as after a SIGKILL between upload and cleanup."""

    def __init__(self, inner) -> None:
        self.inner, self.keys = inner, []

    def describe(self) -> str:
        return "crash-after-put"

    async def put_file(self, key, path):
        if not self.keys:
            await self.inner.put_file(key, path)
        self.keys.append(key)
        raise StorageUnavailable("died after the upload (test)")


class CopyStore:
    """An S3-like store: keeps the spool file in place (LocalStore moves it)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.puts: list[str] = []

    def describe(self) -> str:
        return "copy"

    async def put_file(self, key, path):
        dest = self.root / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(path).read_bytes())
        self.puts.append(key)


def _spool_with_files(tmp_path: Path, n: int, frame_builder) -> tuple[Spool, list[str]]:
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    keys = []
    for i in range(n):
        b = delta_batch(1 + 10 * i, 10, T0 + 1000 * i)
        frame = frame_builder(Dataset.DELTAS, "binance", "futures", "BTCUSDT", b.columns, "1")
        [(key, part, data)] = layout.files_for_frame(
            Dataset.DELTAS, "binance", "futures", "BTCUSDT", frame
        )
        spool.write(key, data, rows=part.height)
        keys.append(key)
    return spool, keys


def test_crash_after_merged_upload_no_duplicates_same_key(tmp_path, frame_builder, monkeypatch):
    """Crash after the merged object is stored but before the spool is cleaned up (S3:
    the merged spool file stays): the next start re-uploads the SAME key, no duplicates."""
    out = tmp_path / "out"
    spool, _ = _spool_with_files(tmp_path, 6, frame_builder)
    store = CopyStore(out)

    async def first():
        w = _writer(CrashAfterPut(store), spool, setup(tmp_path)[3], frame_builder, 60.0)
        send, recv = trio.open_memory_channel(1)
        async with trio.open_nursery() as n:
            n.start_soon(lambda: w.run(recv, shutdown_timeout=2.0))
            await trio.sleep(5)
            await send.aclose()

    trio.run(first, clock=threadclock.install(monkeypatch))
    assert len(store.puts) == 1
    first_key = store.puts[0]
    # the merged file is still in the spool (sources already gone)
    restarted = Spool(tmp_path / "spool", max_bytes=10**9)
    restarted.scan()
    assert [e.key for e in restarted.pending()] == [first_key]

    async def second():
        w = _writer(store, restarted, setup(tmp_path)[3], frame_builder, 60.0)
        send, recv = trio.open_memory_channel(1)
        await send.aclose()
        await w.run(recv)

    trio.run(second)
    assert store.puts == [first_key, first_key]  # same object key, overwritten
    assert restarted.files == 0 and not list((tmp_path / "spool").rglob("*.parquet"))
    df = stored(out)
    assert df.height == 60 and df["last_update_id"].n_unique() == 60
    assert len(objects(out)) == 1


def test_crash_between_merge_and_source_removal_completes_merge(tmp_path, frame_builder):
    """Crash after the merged spool file is durable but before all its sources are
    deleted: the scan removes the leftovers; exactly one object, same key, no dups."""
    spool, keys = _spool_with_files(tmp_path, 5, frame_builder)
    saved = {k: (tmp_path / "spool" / k).read_bytes() for k in keys}
    merged = spool.merge(spool.pending())
    meta = parquet.read_metadata(merged.path)
    assert json.loads(meta[parquet.MERGED_FROM]) == sorted(keys)
    for k in keys[:3]:  # "crash": three sources were not deleted yet
        (tmp_path / "spool" / k).write_bytes(saved[k])
    restarted = Spool(tmp_path / "spool", max_bytes=10**9)
    report = restarted.scan()
    assert report.files == 1 and [e.key for e in restarted.pending()] == [merged.key]
    assert restarted.pending()[0].merged and restarted.pending()[0].rows == 50

    async def up():
        store = CountingStore(LocalStore(tmp_path / "out"))
        res = await drain_spool(restarted, store, merge=True)
        return store, res

    store, res = trio.run(up)
    assert store.keys == [merged.key] and res.remaining == 0
    df = stored(tmp_path / "out")
    assert df.height == 50 and df["last_update_id"].to_list() == list(range(1, 51))


def test_a_merged_footer_unreadable_for_the_machine_fails_the_scan_not_the_merge(
    tmp_path, frame_builder, monkeypatch
):
    """Found by review: the scan reads a merged file's footer (`merged_from`) a second
    time, and any error there, even "too many open files", read as "not a merged file":
    the interrupted merge's sources stayed indexed beside it and went up too (rows
    stored twice), and the merged file could be merged again with them. Now the scan
    fails (the start with it) and removes nothing; the next scan completes the merge."""
    root = tmp_path / "spool"
    spool, keys = _spool_with_files(tmp_path, 3, frame_builder)
    saved = (root / keys[0]).read_bytes()
    merged = spool.merge(spool.pending())
    (root / keys[0]).write_bytes(saved)  # "crash" before this source was deleted
    real = pl.read_parquet_metadata

    def metadata(source, *args, **kwargs):
        if Path(source) == merged.path:
            raise OSError(f"Too many open files (os error 24): {source}")
        return real(source, *args, **kwargs)

    monkeypatch.setattr(pl, "read_parquet_metadata", metadata)
    with pytest.raises(OSError, match="Too many open files"):
        Spool(root, max_bytes=10**9).scan()
    monkeypatch.undo()
    assert (root / keys[0]).exists() and merged.path.exists()
    again = Spool(root, max_bytes=10**9)
    again.scan()
    assert [e.key for e in again.pending()] == [merged.key] and again.pending()[0].merged
    assert not (root / keys[0]).exists()


def test_a_start_goes_on_past_files_it_cannot_delete(tmp_path, frame_builder, monkeypatch, caplog):
    """Found by review: the start-up scan deleted a leftover temp file and an interrupted
    merge's sources without a guard, so one undeletable file (EACCES, EROFS, EIO) failed
    every start. The temp file is left with a WARNING naming it (never uploaded); the
    source is doomed like one a run could not delete (never uploaded: its rows are in
    the merged file); the next start that can delete them does."""
    root = tmp_path / "spool"
    spool, keys = _spool_with_files(tmp_path, 3, frame_builder)
    saved = (root / keys[0]).read_bytes()
    merged = spool.merge(spool.pending())
    (root / keys[0]).write_bytes(saved)  # "crash" before this source was deleted
    temp = root / keys[1].rsplit("/", 1)[0] / ".x.parquet.tmp-abcd"
    temp.write_bytes(b"partial")
    stuck = {root / keys[0], temp}
    real_unlink = Path.unlink

    def unlink(self, missing_ok=False):
        if self in stuck:
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    restarted = Spool(root, max_bytes=10**9)
    report = restarted.scan()
    assert [e.key for e in restarted.pending()] == [merged.key] and report.temp_removed == 0
    assert f"cannot remove leftover temp file {temp}" in caplog.text
    assert f"cannot delete merged source {keys[0]}" in caplog.text
    assert (root / ".doomed").read_text() == keys[0] + "\n"
    assert all(p.exists() for p in stuck)
    monkeypatch.undo()
    again = Spool(root, max_bytes=10**9)
    assert again.scan().temp_removed == 1
    assert [e.key for e in again.pending()] == [merged.key]
    assert not any(p.exists() for p in stuck) and not (root / ".doomed").exists()


def test_merge_is_deterministic(tmp_path, frame_builder):
    """The same sources give the same bytes and so the same key (idempotent redo)."""
    a, _ = _spool_with_files(tmp_path / "a", 4, frame_builder)
    b, _ = _spool_with_files(tmp_path / "b", 4, frame_builder)
    ma = a.merge(list(reversed(a.pending())))
    mb = b.merge(b.pending())
    assert ma.key == mb.key and ma.path.read_bytes() == mb.path.read_bytes()


def test_rewrite_of_a_merged_source_is_not_spooled_again(tmp_path, frame_builder):
    """A retried flush rewriting a file already merged (same key = same rows) must not
    bring its rows back as a second copy."""
    spool, keys = _spool_with_files(tmp_path, 3, frame_builder)
    data = (tmp_path / "spool" / keys[0]).read_bytes()
    merged = spool.merge(spool.pending())
    spool.write(keys[0], data, rows=10)
    assert [e.key for e in spool.pending()] == [merged.key]
    assert not (tmp_path / "spool" / keys[0]).exists()


def test_spool_flush_merges_when_batching(tmp_path, frame_builder):
    spool, _ = _spool_with_files(tmp_path, 7, frame_builder)
    store = CountingStore(LocalStore(tmp_path / "out"))
    res = trio.run(lambda: drain_spool(spool, store, merge=True))
    assert (res.uploaded, res.remaining) == (1, 0) and len(store.keys) == 1
    assert stored(tmp_path / "out").height == 70


def test_upload_failure_keeps_merged_file(tmp_path, frame_builder):
    spool, _ = _spool_with_files(tmp_path, 3, frame_builder)

    class Down:
        def describe(self):
            return "down"

        async def put_file(self, key, path):
            raise StorageUnavailable("down (test)")

    res = trio.run(lambda: drain_spool(spool, Down(), merge=True))
    assert (res.uploaded, res.failed, res.remaining) == (0, 1, 1)
    assert spool.pending()[0].merged


# --- end to end: SIGKILL with batching on ---------------------------------------------------


@pytest.mark.slow
def test_sigkill_with_batching_then_restart_exactly_once(tmp_path, s3_bucket):
    """upload_interval 60: a SIGKILLed collector leaves ~5 s of one-second journals
    (nothing was due); the next start splits and uploads them, no duplicates, bounded
    loss, few objects, empty spool."""
    import signal
    import time

    from storage_support import (
        DELTA_KEY,
        SNAPSHOT_KEY,
        Collector,
        Simulator,
        chain_loss,
        duplicates,
        read_s3_dataset,
        s3_env,
        spool_files,
        write_config,
    )

    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    client = s3_bucket.client()
    sim = Simulator(symbols)
    spool_dir = tmp_path / "spool"
    cfg = write_config(
        tmp_path / "cfg", sim=sim, spool=spool_dir, s3=True, max_age=1.0, upload_interval=60.0
    )
    env = s3_env(s3_bucket.endpoint_url, s3_bucket.name)
    first = Collector(cfg, tmp_path / "c1.log", env=env)
    second = None
    try:
        first.wait_for(r"connected", 20)
        time.sleep(5)
        kill_ns = time.time_ns()
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        leftover = spool_files(spool_dir)
        assert len(leftover) >= 3  # one-second journals waiting for their split + upload
        assert not s3_bucket.keys("cf/deltas/")  # nothing was due yet
        second = Collector(cfg, tmp_path / "c2.log", env=env, duration=4)
        assert second.wait(40) == 0, second.text()
        assert not spool_files(spool_dir)
        keys = s3_bucket.keys("cf/")
        for k in keys:
            layout.parse_key(k)
        delta_keys = [k for k in keys if "/deltas/" in k]
        # per symbol: the first run's files (merged at start) + the second run's (drain)
        assert len(delta_keys) <= 2 * len(symbols) + len(symbols), delta_keys
        deltas = read_s3_dataset(client, s3_bucket.name, "cf/deltas/")
        snaps = read_s3_dataset(client, s3_bucket.name, "cf/snapshots/")
        assert duplicates(deltas, DELTA_KEY) == 0
        assert duplicates(snaps, SNAPSHOT_KEY) == 0
        losses = {sym: chain_loss(deltas, sym, kill_ns) for sym in symbols}
        assert max(losses.values()) <= 1.0 + 0.75, losses
    finally:
        first.kill()
        if second is not None:
            second.kill()
        sim.kill()
