from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import trio

from cryptoflow.config_schema import BufferSection
from cryptoflow.errors import StorageUnavailable
from cryptoflow.models import Dataset
from cryptoflow.pipeline.rows import RowBatch
from cryptoflow.pipeline.writer import drain_spool, run_writer
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.spool import Spool

T0 = 1_741_082_400_000  # 2025-03-04 10:00 UTC


def delta_batch(first_id: int, n: int, ts: int, symbol: str = "BTCUSDT") -> RowBatch:
    ids = list(range(first_id, first_id + n))
    return RowBatch(
        dataset=Dataset.DELTAS,
        exchange="binance",
        market="futures",
        symbol=symbol,
        columns={
            "timestamp": [ts] * n,
            "transaction_time": [ts] * n,
            "receive_time": [ts * 1_000_000] * n,
            "first_update_id": ids,
            "last_update_id": ids,
            "prev_update_id": [i - 1 for i in ids],
            "side": ["bid"] * n,
            "price": ["100.1"] * n,
            "quantity": ["2"] * n,
            "raw_quantity": ["2"] * n,
        },
        rows=n,
    )


async def eventually(cond, real_seconds: float = 10.0) -> None:
    """Wait for cond in real time (the `clock` fixture holds virtual time meanwhile: it
    never jumps while a thread, such as this wait's, runs)."""
    for _ in range(int(real_seconds / 0.01)):
        if cond():
            return
        await trio.to_thread.run_sync(time.sleep, 0.01)
    assert cond()


def stored(root: Path) -> pl.DataFrame:
    files = sorted(root.rglob("*.parquet"))
    if not files:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(f) for f in files])


class SlowStore:
    def __init__(self, inner, delay: float) -> None:
        self.inner, self.delay, self.calls = inner, delay, 0

    def describe(self) -> str:
        return "slow"

    async def put_file(self, key, path):
        self.calls += 1
        await trio.sleep(self.delay)
        await self.inner.put_file(key, path)


class FlakyStore(SlowStore):
    def __init__(self, inner, failures: int) -> None:
        super().__init__(inner, 0)
        self.failures = failures

    async def put_file(self, key, path):
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise StorageUnavailable("S3 down (test)")
        await self.inner.put_file(key, path)


def setup(tmp_path, **buf):
    out = tmp_path / "out"
    store = LocalStore(out)
    spool = Spool(tmp_path / "spool", max_bytes=buf.pop("spool_max", 10**9))
    cfg = BufferSection(delta_flush_interval=buf.pop("interval", 1.0), **buf)
    return out, store, spool, cfg


async def test_flush_on_interval_and_final(tmp_path, clock, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=5.0)
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await nursery.start(
            lambda task_status: run_writer(
                recv,
                store,
                spool,
                cfg,
                limiter=trio.CapacityLimiter(2),
                frame_builder=frame_builder,
                task_status=task_status,
            )
        )
        await send.send(delta_batch(1, 10, T0))
        await trio.sleep(4.0)
        assert stored(out).height == 0
        await trio.sleep(2.0)
        await eventually(lambda: stored(out).height == 10)  # flushed by the interval
        await send.send(delta_batch(11, 5, T0 + 1))
        await send.aclose()  # end of stream: final flush + upload
    df = stored(out)
    assert df.height == 15 and sorted(df["last_update_id"]) == list(range(1, 16))
    assert writer.stats.rows_received["deltas"] == 15
    assert writer.stats.rows_uploaded["deltas"] == 15
    assert spool.files == 0


async def test_flush_on_max_rows(tmp_path, clock, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=1000.0, max_rows=100)
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_writer(
                recv,
                store,
                spool,
                cfg,
                limiter=trio.CapacityLimiter(2),
                frame_builder=frame_builder,
            )
        )
        for i in range(3):
            await send.send(delta_batch(1 + 40 * i, 40, T0))
        await eventually(lambda: stored(out).height == 120)  # 120 >= 100 rows
        assert trio.current_time() < 1000.0  # not the interval
        await send.aclose()


async def test_backpressure_slow_store_bounded_memory(tmp_path, clock, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=0.5, max_rows=200, spool_max=20_000)
    slow = SlowStore(store, delay=2.0)
    send, recv = trio.open_memory_channel(4)
    cap = 400
    depth: list[int] = []
    refusing: list[bool] = []
    async with trio.open_nursery() as nursery:
        writer = await nursery.start(
            lambda task_status: run_writer(
                recv,
                slow,
                spool,
                cfg,
                limiter=trio.CapacityLimiter(2),
                frame_builder=frame_builder,
                max_buffered_rows=cap,
                upload_concurrency=1,
                retry_initial=0.5,
                retry_max=2.0,
                # this test is about memory and exactly-once, not the shutdown deadline
                # (test_shutdown_deadline_keeps_spool is): a deadline it never reaches
                shutdown_timeout=3600.0,
                task_status=task_status,
            )
        )
        sent = 0
        for i in range(60):
            with trio.move_on_after(30):
                await send.send(delta_batch(1 + 50 * i, 50, T0 + i))
                sent += 50
            depth.append(send.statistics().current_buffer_used)
            refusing.append(writer.stats.spool_refusing)
        await send.aclose()
    assert max(depth) <= 4
    assert writer.stats.max_buffered_rows_seen <= cap + 50
    assert writer.stats.spool_full_events > 0  # the small spool did refuse data
    # /healthz's `spool_full` state: on while refused, off once flushes go through again
    assert any(refusing) and not writer.stats.spool_refusing
    df = stored(out)
    assert df.height == sent == 3000
    assert df["last_update_id"].n_unique() == 3000


async def test_failing_then_recovering_store_exactly_once(tmp_path, clock, frame_builder):
    out, store, spool, cfg = setup(tmp_path, interval=1.0)
    flaky = FlakyStore(store, failures=7)
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await nursery.start(
            lambda task_status: run_writer(
                recv,
                flaky,
                spool,
                cfg,
                limiter=trio.CapacityLimiter(2),
                frame_builder=frame_builder,
                task_status=task_status,
            )
        )
        for i in range(20):
            await send.send(delta_batch(1 + 10 * i, 10, T0 + 1000 * i))
            await trio.sleep(0.5)
        await send.aclose()
    df = stored(out)
    assert df.height == 200
    assert sorted(df["last_update_id"]) == list(range(1, 201))
    assert writer.stats.upload_failures == 7
    assert spool.files == 0


async def test_shutdown_deadline_keeps_spool(tmp_path, clock, frame_builder):
    out, store, spool, cfg = setup(tmp_path)
    down = FlakyStore(store, failures=10**9)
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_writer(
                recv,
                down,
                spool,
                cfg,
                limiter=trio.CapacityLimiter(2),
                frame_builder=frame_builder,
                shutdown_timeout=5.0,
            )
        )
        await send.send(delta_batch(1, 10, T0))
        await send.aclose()
    assert spool.files == 1 and stored(out).height == 0
    res = await drain_spool(spool, store)  # next start / `cryptoflow spool flush`
    assert (res.uploaded, res.remaining) == (1, 0)
    assert stored(out).height == 10


async def start_writer(nursery, recv, store, spool, cfg, frame_builder, **kw):
    """A writer on `recv` with two encode threads, started in `nursery`."""
    return await nursery.start(
        lambda task_status: run_writer(
            recv,
            store,
            spool,
            cfg,
            limiter=trio.CapacityLimiter(2),
            frame_builder=frame_builder,
            task_status=task_status,
            **kw,
        )
    )


async def test_memory_cap_counts_frame_bytes_so_a_minute_of_rows_is_no_forced_flush(
    tmp_path, clock, frame_builder
):
    """Rows compacted into frames are counted at their Arrow size: 12,000 rows (past the
    old row cap of 2 x max_rows, each buffer under max_rows) stay buffered until their
    interval, the input never pauses, and the gauge returns to zero once spooled."""
    _out, store, spool, cfg = setup(tmp_path, interval=100.0, max_rows=5000)
    send, recv = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder)
        for i in range(20):
            for sym in ("AUSDT", "BUSDT", "CUSDT"):
                await send.send(delta_batch(1 + 200 * i, 200, T0, symbol=sym))
        await trio.sleep(50.0)
        assert writer.stats.flushes == 0 and not writer.stats.backpressure
        assert writer.stats.buffered_rows == 12_000
        assert 0 < writer.stats.buffered_bytes < 12_000 * 10 * 40  # frames, not lists
        await send.aclose()
    assert writer.stats.rows_spooled["deltas"] == 12_000
    assert writer.stats.buffered_rows == 0 and writer.stats.buffered_bytes == 0


async def test_memory_cap_in_bytes_flushes_everything_early(tmp_path, clock, frame_builder):
    _out, store, spool, cfg = setup(tmp_path, interval=100.0, max_total_bytes=50_000)
    send, recv = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder)
        for i in range(10):
            await send.send(delta_batch(1 + 200 * i, 200, T0))
        await eventually(lambda: writer.stats.flushes > 0)
        assert trio.current_time() < 100.0  # the cap, not the interval
        assert writer.stats.max_buffered_bytes_seen < 2 * 50_000
        await send.aclose()
    assert writer.stats.rows_spooled["deltas"] == 2000


def snapshot_batch(symbol: str, ts: int, n: int = 4) -> RowBatch:
    return RowBatch(
        dataset=Dataset.SNAPSHOTS,
        exchange="binance",
        market="futures",
        symbol=symbol,
        columns={
            "timestamp": [ts] * n,
            "transaction_time": [ts] * n,
            "receive_time": [ts * 1_000_000] * n,
            "last_update_id": [7] * n,
            "side": ["bid"] * n,
            "level": list(range(n)),
            "price": ["100.1"] * n,
            "raw_quantity": ["2"] * n,
            "source": ["poll"] * n,
        },
        rows=n,
    )


async def test_snapshot_flushes_are_spread_over_the_interval(tmp_path, mock_clock, frame_builder):
    """Each symbol's first snapshot buffer comes due at its own phase of the interval
    (`stagger_fraction`), never later than the interval: all symbols flushing in the
    same round made the collector's memory a sawtooth from zero to a whole minute."""
    from cryptoflow.pipeline.writer import stagger_fraction

    # mock_clock moves only by hand: flush threads run while it stands still
    symbols = [f"S{i}USDT" for i in range(12)]
    due_at = {
        s: 60.0 * (1 - stagger_fraction((Dataset.SNAPSHOTS, "binance", "futures", s)))
        for s in symbols
    }
    assert len({round(t) for t in due_at.values()}) > 6  # the phases differ
    out, store, spool, cfg = setup(tmp_path, snapshot_flush_interval=60.0)
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder)
        try:
            for s in symbols:
                await send.send(snapshot_batch(s, T0))
            # every buffer opened at t=0 (a jump before the writer took them would move
            # their start, and so their due time)
            await eventually(lambda: writer.stats.rows_received["snapshots"] == 4 * len(symbols))
            for t in (15.0, 30.0, 45.0, 60.5):
                mock_clock.jump(t - trio.current_time())
                want = {s for s, d in due_at.items() if d <= t}
                await eventually(lambda want=want: symbols_stored(out) == want)
            assert symbols_stored(out) == set(symbols)
        finally:
            mock_clock.autojump_threshold = 0.02  # the final drain polls with trio.sleep
            await send.aclose()


def symbols_stored(out: Path) -> set[str]:
    df = stored(out)
    return set(df["symbol"]) if df.height else set()


FAR = 300_000_000_000_000  # year 11476: a valid Int64 ms the layout has no partition for


def stored_all(root: Path) -> pl.DataFrame:
    """Every dataset's rows (their columns differ)."""
    return pl.concat([pl.read_parquet(f) for f in root.rglob("*.parquet")], how="diagonal")


def set_aside(spool: Spool, pattern: str) -> list[Path]:
    return sorted((spool.quarantine_root / "unplaced").rglob(pattern))


async def test_one_snapshot_buffer_the_layout_cannot_place_never_stops_the_writer(
    tmp_path, clock, frame_builder, caplog
):
    """A snapshot buffer with an event time past 9999 raised ValueError out of the flush:
    the writer task died (the whole collector with it), the final drain hit it again and
    the other buffers' rows were never spooled. Now its rows are set aside, named in an
    ERROR, and every other row is stored."""
    out, store, spool, cfg = setup(tmp_path, interval=5.0, snapshot_flush_interval=0.5)
    far = snapshot_batch("ETHUSDT", FAR)
    far.columns["receive_time"] = [T0 * 1_000_000] * far.rows
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder)
        await send.send(delta_batch(1, 5, T0, "BTCUSDT"))  # due in 5 s
        await send.send(far)  # due in <= 0.5 s
        await send.send(snapshot_batch("BTCUSDT", T0))
        await trio.sleep(2.0)
        await eventually(lambda: writer.stats.rows_set_aside["snapshots"] == 4)
        await send.aclose()
    df = stored_all(out)
    assert sorted(df["symbol"].unique()) == ["BTCUSDT"] and df.height == 5 + 4
    assert writer.stats.rows_uploaded == {"deltas": 5, "snapshots": 4}
    [kept] = set_aside(spool, "*.parquet")
    assert "snapshots/exchange=binance/market=futures/symbol=ETHUSDT" in kept.as_posix()
    assert pl.read_parquet(kept).height == 4
    assert "SET ASIDE 4 snapshots rows of binance/futures/ETHUSDT" in caplog.text
    assert "4 rows were set aside" in caplog.text


async def test_a_buffer_whose_flush_fails_is_set_aside_and_the_others_are_stored(
    tmp_path, clock, frame_builder, caplog
):
    """Any failure that is not the spool's (here a frame builder that cannot build one
    symbol's rows) stays with that buffer: its rows are set aside as JSON lines, the
    writer goes on, and the journal round still holds every other symbol."""
    import zstandard

    def builder(dataset, exchange, market, symbol, columns, mult="1"):
        if "boom" in columns.get("price", []):
            raise RuntimeError("cannot build this frame (test)")
        return frame_builder(dataset, exchange, market, symbol, columns, mult)

    out, store, spool, cfg = setup(tmp_path, interval=0.5, snapshot_flush_interval=0.5)
    bad_delta = delta_batch(1, 3, T0, "BADUSDT")
    bad_delta.columns["price"] = ["boom"] * 3
    bad_snap = snapshot_batch("BADUSDT", T0)
    bad_snap.columns["price"] = ["boom"] * 4
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, builder)
        for batch in (
            delta_batch(1, 5, T0, "BTCUSDT"),
            bad_delta,
            delta_batch(1, 5, T0, "ETHUSDT"),
        ):
            await send.send(batch)
        await send.send(bad_snap)
        await send.send(snapshot_batch("BTCUSDT", T0))
        await trio.sleep(2.0)
        await send.send(delta_batch(6, 5, T0 + 1000, "BTCUSDT"))  # the writer goes on
        await send.aclose()
    df = stored_all(out)
    assert df.filter(pl.col("symbol") == "BTCUSDT").height == 10 + 4
    assert df.filter(pl.col("symbol") == "ETHUSDT").height == 5
    assert "BADUSDT" not in set(df["symbol"])
    assert writer.stats.rows_set_aside == {"deltas": 3, "snapshots": 4}
    assert writer.stats.buffered_rows == 0 and spool.files == 0
    for dataset, n in (("deltas", 3), ("snapshots", 4)):
        [kept] = set_aside(spool, f"{dataset}/*/*/symbol=BADUSDT/*.jsonl.zst")
        lines = zstandard.ZstdDecompressor().decompress(kept.read_bytes()).splitlines()
        assert len(lines) == n and b'"price": "boom"' in lines[0]
        assert "RuntimeError" in kept.with_name(kept.name + ".reason").read_text()
        assert f"cannot flush {n} {dataset} rows of binance/futures/BADUSDT" in caplog.text


async def test_rows_of_an_unsafe_symbol_are_refused_and_the_others_stored(
    tmp_path, clock, frame_builder, caplog
):
    """The audit's Bybit frame named `data.s` "../../../../../../ESCAPED" and its rows
    were spooled outside the spool (/tmp/audit8a/symbol_escape.py). Such rows are now
    refused at the writer's intake (named in an ERROR, counted): nothing is written
    outside the spool or the output tree, and they never reach a delta journal, whose
    split would fail for every symbol in it."""
    work = tmp_path / "work"
    out, store, spool, cfg = setup(work, interval=1.0)
    bad = "../../../../../../ESCAPED"
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder)
        await send.send(snapshot_batch(bad, T0))
        await send.send(delta_batch(1, 5, T0, symbol=bad))
        await send.send(delta_batch(1, 10, T0))
        await send.send(snapshot_batch("BTCUSDT", T0))
        await send.aclose()
    for dataset, rows in (("deltas", 10), ("snapshots", 4)):
        df = stored(out / dataset)
        assert df.height == rows and set(df["symbol"]) == {"BTCUSDT"}
    assert writer.stats.rows_refused_unsafe == 4 + 5
    assert writer.stats.rows_received == {"deltas": 10, "snapshots": 4}
    assert spool.files == 0
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and work not in p.parents]
    assert outside == []
    assert f"writer: 5 deltas rows refused: unsafe symbol {bad!r}" in caplog.text


async def test_a_flush_out_of_memory_keeps_the_rows_for_a_retry(
    tmp_path, clock, frame_builder, monkeypatch, caplog
):
    """Found by review: a MemoryError in a flush was taken for rows that can never be
    written: the buffer was set aside (or, when that ran out of memory too, its rows
    reported LOST), and one in a raw-capture flush ended the writer, and the collector.
    Memory short for a moment is the machine's trouble, not the rows': they are kept in
    memory and retried, like on a disk error."""
    from cryptoflow.pipeline.raw import RawCapture
    from cryptoflow.storage import rawfile

    short = {"deltas": 1, "snapshots": 1, "raw": 1}  # the first build/encode of each

    def once(name: str) -> None:
        if short[name]:
            short[name] -= 1
            raise MemoryError

    def builder(dataset, exchange, market, symbol, columns, mult="1"):
        once(dataset.value)
        return frame_builder(dataset, exchange, market, symbol, columns, mult)

    real_encode = rawfile.encode

    def encode(lines):
        once("raw")
        return real_encode(lines)

    monkeypatch.setattr(rawfile, "encode", encode)
    out, store, spool, cfg = setup(tmp_path, interval=0.5, snapshot_flush_interval=0.5)
    raw = RawCapture()
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(
            nursery, recv, store, spool, cfg, builder, raw=raw, retry_initial=0.5
        )
        raw.add("binance", "BTCUSDT", "ws", "btcusdt@depth", '{"u":1}', T0 * 1_000_000)
        for sym in ("BTCUSDT", "ETHUSDT"):
            await send.send(delta_batch(1, 5, T0, sym))
        await send.send(snapshot_batch("BTCUSDT", T0))
        await trio.sleep(3.0)
        assert writer.stats.flush_failures == 4 and not any(short.values())
        await send.aclose()
    df = stored_all(out)
    assert df.filter(pl.col("symbol") == "BTCUSDT").height == 5 + 4
    assert df.filter(pl.col("symbol") == "ETHUSDT").height == 5
    assert writer.stats.raw_lines_uploaded == 1
    assert writer.stats.rows_set_aside == {} and set_aside(spool, "*") == []
    assert "(MemoryError); kept in memory" in caplog.text
    assert "LOST" not in caplog.text


def test_a_column_a_batch_brings_new_is_padded_for_the_rows_still_in_lists():
    """Found by review: `_Buffer.append` padded a column a batch brings new with one null
    per row the buffer held, compacted frames and unread bodies included, not per row
    still in its lists, so the lists came out of step and the flush could not build its
    frame. Not reachable from the normalizer today (its batches of one dataset always
    carry the same columns); kept correct for any other producer."""
    from cryptoflow.pipeline.writer import _Buffer, default_frame_builder

    buf = _Buffer((Dataset.DELTAS, "binance", "futures", "BTCUSDT"), "1", 0.0)
    buf.append(delta_batch(1, 5, T0))
    buf.compact(default_frame_builder)  # 5 rows in a frame, none in lists
    older = delta_batch(6, 3, T0)
    del older.columns["transaction_time"]
    buf.append(older)
    buf.append(delta_batch(9, 2, T0))  # brings transaction_time back
    assert {len(values) for values in buf.columns.values()} == {5}
    frame = buf.frame(default_frame_builder)
    assert frame["last_update_id"].to_list() == list(range(1, 11))
    assert frame["transaction_time"].null_count() == 3


async def test_raw_buffers_a_round_took_are_written_when_the_stop_comes_mid_round(
    tmp_path, clock, frame_builder, monkeypatch, caplog
):
    """Found by review (/tmp/review-merged/raw_stop_loss.py): a raw flush round takes
    every due buffer, then writes them one thread hop each; the stop (input closed)
    cancelled the round between two hops and the buffers not yet written were gone, no
    ERROR, `raw_dropped_lines` 0 (2 of 40 symbols stored). They now go back for the final
    drain, like the row flush's."""
    from cryptoflow.pipeline import writer as writer_mod
    from cryptoflow.pipeline.raw import RawCapture
    from cryptoflow.storage import rawfile

    out, store, spool, cfg = setup(tmp_path, interval=0.5)
    raw = RawCapture()
    send, recv = trio.open_memory_channel(10)
    real = writer_mod._flush_raw_blocking

    def stop_after_first(spool, buf):  # the stop comes while the round writes its first
        trio.from_thread.run_sync(send.close)
        return real(spool, buf)

    monkeypatch.setattr(writer_mod, "_flush_raw_blocking", stop_after_first)
    for i in range(10):  # before the writer starts: its first deadline is theirs
        raw.add("bybit", f"SYM{i}USDT", "ws", "orderbook.50.X", f'{{"u":{i}}}', T0 * 10**6)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder, raw=raw)
    payloads = [
        line
        for path in out.rglob("*.jsonl.zst")
        for line in rawfile.decode(path.read_bytes()).splitlines()
        if b'"kind":"ws"' in line
    ]
    assert len(payloads) == 10 and writer.stats.raw_lines_uploaded == 10
    assert not raw.pending and writer.stats.raw_dropped_lines == 0
    assert "LOST" not in caplog.text


async def test_raw_lines_still_buffered_at_the_shutdown_deadline_are_reported_lost(
    tmp_path, clock, frame_builder, monkeypatch, caplog
):
    """Found by review: raw lines the spool never took before the shutdown deadline
    ended with the process without a word. They are now said LOST at ERROR and counted
    in `raw_dropped_lines`, as rows are."""
    import errno

    from cryptoflow.pipeline import writer as writer_mod
    from cryptoflow.pipeline.raw import RawCapture

    def disk_fails(spool, buf):
        raise OSError(errno.EIO, "Input/output error (test)")

    monkeypatch.setattr(writer_mod, "_flush_raw_blocking", disk_fails)
    _, store, spool, cfg = setup(tmp_path, interval=0.5)
    raw = RawCapture()
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(
            nursery, recv, store, spool, cfg, frame_builder, raw=raw, shutdown_timeout=2.0
        )
        for i in range(3):
            raw.add("bybit", "BTCUSDT", "ws", "orderbook.50.X", f'{{"u":{i}}}', T0 * 10**6)
        raw.add("bybit", "ETHUSDT", "ws", "orderbook.50.X", '{"u":9}', T0 * 10**6)
        await send.aclose()
    assert writer.stats.raw_dropped_lines == 4 and not raw.pending
    assert (
        "writer: 4 raw lines of 2 symbols could not be spooled before the shutdown "
        "deadline and are LOST" in caplog.text
    )


async def test_raw_frames_with_no_row_buffer_open_are_spooled_within_the_interval(
    tmp_path, clock, frame_builder
):
    """Found by review: `RawCapture.add` opened a raw buffer without a word to the flush
    loop, which sleeps until the earliest buffer's deadline and is woken only by a new
    row buffer. With no row buffer open (only raw frames so far, or every row flushed) a
    raw buffer waited for the next row batch, past `max_age`: the raw lines of a lane
    with no rows were not on disk within the loss bound. A new raw buffer now wakes the
    loop, once, when its deadline is earlier than the one the loop sleeps until."""
    from cryptoflow.pipeline.raw import RawCapture

    out, store, spool, cfg = setup(tmp_path, interval=0.5)
    raw = RawCapture()
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder, raw=raw)
        for n in (1, 2):  # a buffer opened with no other open, twice (the second: reopened)
            await trio.sleep(1.0)  # the loop asleep with nothing to wait for
            raw.add("bybit", "BTCUSDT", "ws", "orderbook.50.X", f'{{"u":{n}}}', T0 * 10**6)
            raw.add("bybit", "BTCUSDT", "ws", "orderbook.50.X", f'{{"u":{n}}}', T0 * 10**6)
            await trio.sleep(0.4)
            assert writer.stats.raw_files == n - 1  # not early: at its interval
            await trio.sleep(0.2)
            await eventually(lambda n=n: writer.stats.raw_lines_uploaded == 2 * n)
            assert writer.stats.raw_files == n and not raw.pending
        # a row buffer open with an earlier deadline: no wake needed, still in time
        await send.send(delta_batch(1, 5, T0))
        await trio.sleep(0.2)
        raw.add("bybit", "ETHUSDT", "ws", "orderbook.50.X", '{"u":3}', T0 * 10**6)
        await trio.sleep(0.6)
        await eventually(lambda: writer.stats.raw_lines_uploaded == 5)
        assert stored(out).height == 5
        await send.aclose()
    assert len(list(out.rglob("*.jsonl.zst"))) == 3 and writer.stats.raw_dropped_lines == 0


async def test_a_new_buffer_wakes_the_flush_loop_only_when_it_is_due_earlier(
    tmp_path, clock, frame_builder
):
    """Each flush round empties the buffers, and at the full table ~250 new ones open
    before the next round: each used to wake the flush loop (a round with nothing due
    and a scan of every deadline). Now a new buffer wakes it only if the loop sleeps past
    the buffer's deadline: a delta buffer opened behind a later snapshot deadline is
    still flushed at its own interval, and the buffers opened behind it cost no round."""
    out, store, spool, cfg = setup(tmp_path, interval=0.5, snapshot_flush_interval=30.0)
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        writer = await start_writer(nursery, recv, store, spool, cfg, frame_builder)
        rounds = 0
        flush_due = writer._flush_due

        async def counted(**kw):
            nonlocal rounds
            rounds += 1
            await flush_due(**kw)

        writer._flush_due = counted
        await send.send(snapshot_batch("ETHUSDT", T0))  # the loop sleeps until ~30 s
        await trio.sleep(1.0)
        await send.send(delta_batch(1, 5, T0))  # due in 0.5 s: must wake the loop
        await trio.sleep(0.1)
        rounds = 0
        for i in range(50):  # due later than that one: no wake, no round
            await send.send(delta_batch(1, 1, T0, symbol=f"S{i}USDT"))
        await trio.sleep(0.3)
        assert rounds == 0 and writer.stats.rows_spooled["deltas"] == 0
        await trio.sleep(0.2)  # 0.5 s after the first delta row: its round
        # the round at the first one's deadline takes the others along (one journal)
        await eventually(lambda: writer.stats.rows_spooled["deltas"] == 55)
        assert writer.stats.rows_spooled["snapshots"] == 0  # not due yet
        await send.aclose()
    assert stored_all(out).height == 55 + 4


class GatedStore(SlowStore):
    """Uploads wait until `open` is set (S3 down, then back)."""

    def __init__(self, inner) -> None:
        super().__init__(inner, 0)
        self.open = trio.Event()

    async def put_file(self, key, path):
        self.calls += 1
        await self.open.wait()
        await self.inner.put_file(key, path)


async def refused_as_full(nursery, tmp_path, frame_builder, **kw):
    """A writer whose first 50 delta rows are spooled (their upload held at the gate) and
    whose next 50 the spool then refuses as full, with a back-off far past the test."""
    out, store, spool, cfg = setup(tmp_path, interval=1.0)
    gated = GatedStore(store)
    send, recv = trio.open_memory_channel(10)
    writer = await start_writer(
        nursery, recv, gated, spool, cfg, frame_builder, retry_initial=30.0, **kw
    )
    await send.send(delta_batch(1, 50, T0))
    await trio.sleep(1.5)
    await eventually(lambda: gated.calls == 1)  # split, and its upload waits at the gate
    spool.max_bytes = spool.bytes + 10  # full: nothing more fits
    await send.send(delta_batch(51, 50, T0 + 1))
    await trio.sleep(1.5)
    await eventually(lambda: writer.stats.spool_full_events == 1)
    assert writer.stats.spool_refusing and writer.stats.buffered_rows == 50
    return out, spool, gated, send, writer


async def test_rows_refused_as_full_are_spooled_as_soon_as_uploads_free_room(
    tmp_path, clock, frame_builder
):
    """Found by an audit: a buffer the spool refused as full waited out its back-off
    (up to `retry_max`, 60 s) however soon uploads freed room: rows stayed in memory past
    the `max_age` loss bound and /healthz said `spool_full` with the spool empty. Now an
    upload that frees room makes them due at once."""
    async with trio.open_nursery() as nursery:
        out, spool, gated, send, writer = await refused_as_full(nursery, tmp_path, frame_builder)
        gated.open.set()  # S3 back: the first upload frees the spool
        await trio.sleep(1.0)  # far less than the back-off (15..30 s)
        await eventually(lambda: writer.stats.rows_spooled["deltas"] == 100)
        assert not writer.stats.spool_refusing and writer.stats.buffered_rows == 0
        await eventually(lambda: stored(out).height == 100)
        assert trio.current_time() < 10.0
        await send.aclose()
    assert sorted(stored(out)["last_update_id"]) == list(range(1, 101))
    assert spool.files == 0


async def test_a_stop_after_room_returns_loses_no_row_refused_as_full(
    tmp_path, clock, frame_builder, caplog
):
    """The audit's stop: uploads come back just before the stop, the spool has room,
    yet the final drain slept until the refused buffer's back-off (past the shutdown
    deadline) and reported its rows LOST."""
    async with trio.open_nursery() as nursery:
        out, spool, gated, send, writer = await refused_as_full(
            nursery, tmp_path, frame_builder, shutdown_timeout=5.0
        )
        gated.open.set()
        await send.aclose()
    assert "LOST" not in caplog.text
    assert writer.stats.rows_spooled["deltas"] == 100 and not writer.stats.spool_refusing
    assert sorted(stored(out)["last_update_id"]) == list(range(1, 101))
    assert spool.files == 0


async def test_the_final_drain_spools_rows_refused_as_full_once_they_fit(
    tmp_path, clock, frame_builder, caplog
):
    """The drain's own check, with no upload to say so (S3 still down, the spool's limit
    raised): rows refused as full are spooled as soon as they fit, not after a back-off
    past the deadline; they stay in the spool for the next start."""
    async with trio.open_nursery() as nursery:
        out, spool, _gated, send, writer = await refused_as_full(
            nursery, tmp_path, frame_builder, shutdown_timeout=5.0
        )
        spool.max_bytes = 10**9
        await send.aclose()
    assert "LOST" not in caplog.text
    assert writer.stats.rows_spooled["deltas"] == 100 and writer.stats.buffered_rows == 0
    assert stored(out).height == 0 and spool.files >= 2  # left for the next start


async def test_rows_refused_for_a_disk_error_keep_their_back_off_when_uploads_free_room(
    tmp_path, clock, frame_builder, monkeypatch
):
    """Room in the spool is no cure for a failing disk: only rows refused as full are
    retried at once when an upload frees room; a disk error keeps its back-off."""
    async with trio.open_nursery() as nursery:
        out, spool, gated, send, writer = await refused_as_full(
            nursery, tmp_path, frame_builder, shutdown_timeout=3600.0
        )
        real = spool.write_journal
        failing = [True]

        def write_journal(dataset, frame):
            if failing.pop() if failing else False:
                raise OSError(5, "Input/output error")
            return real(dataset, frame)

        spool.max_bytes = 10**9
        monkeypatch.setattr(spool, "write_journal", write_journal)
        # the refused buffer's retry (at the end of its back-off) meets a disk error; an
        # upload then frees room but must not retry it at once
        await trio.sleep(31.0)
        await eventually(lambda: writer.stats.flush_failures == 2)
        gated.open.set()
        await eventually(lambda: stored(out).height == 50)
        await trio.sleep(2.0)
        assert writer.stats.rows_spooled["deltas"] == 50  # still waiting its back-off
        assert not writer.stats.spool_refusing  # not full: a disk error
        await send.aclose()  # the drain waits out the back-off (a deadline far away)
    assert sorted(stored(out)["last_update_id"]) == list(range(1, 101))
