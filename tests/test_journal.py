"""Journals: one spool file per flush round for the deltas of every symbol, split into
per-partition files before upload, and a split a crash interrupted completed on start."""

from __future__ import annotations

import errno
import functools
import json
import os
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
import trio
from test_writer import T0, delta_batch, eventually

from cryptoflow.config_schema import BufferSection
from cryptoflow.models import Dataset
from cryptoflow.pipeline.normalize import frame_from_columns
from cryptoflow.pipeline.writer import (
    DELAY_EDGES_S,
    Writer,
    delay_histogram,
    delay_quantile,
    drain_spool,
)
from cryptoflow.storage import layout, parquet
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.spool import Spool, is_journal, merged_sources

HOUR = 3_600_000


def journal_frame(first_id: int, ts: int, symbols: tuple[str, ...]) -> pl.DataFrame:
    """10 delta rows per symbol at `ts`, as the writer's typed frames."""
    frames = [
        frame_from_columns(
            Dataset.DELTAS, "binance", "futures", sym, delta_batch(first_id, 10, ts, sym).columns
        )
        for sym in symbols
    ]
    return pl.concat(frames)


def three_journals(spool: Spool) -> list:
    syms = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
    # the third round crosses into the next hour: BTC/ETH/SOL x (10:59:58, 10:59:59, 11:00:00)
    return [
        spool.write_journal(
            Dataset.DELTAS, journal_frame(1 + 10 * i, T0 + HOUR - 2000 + 1000 * i, syms)
        )
        for i in range(3)
    ]


def rows_of(spool: Spool) -> pl.DataFrame:
    return pl.concat([parquet.decode(e.path.read_bytes()) for e in spool.pending()])


def test_split_gives_one_file_per_partition_hour_and_deletes_the_journals(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    journals = three_journals(spool)
    assert all(is_journal(j.key) for j in journals) and spool.files == 3
    before = rows_of(spool)
    outputs = spool.split(journals)
    assert spool.files == len(outputs) == 6  # 3 symbols x 2 hours
    parts = {(layout.parse_key(o.key).symbol, layout.parse_key(o.key).hour.hour) for o in outputs}
    assert parts == {(s, h) for s in ("BTCUSDT", "ETHUSDT", "SOLUSDT") for h in (10, 11)}
    assert not any(j.path.exists() for j in journals)
    after = rows_of(spool)
    key = ["symbol", "last_update_id"]
    assert after.sort(key).equals(before.sort(key))  # every row exactly once
    for o in outputs:
        rows = parquet.decode(o.path.read_bytes())
        kp = layout.parse_key(o.key)
        assert rows["symbol"].unique().to_list() == [kp.symbol]
        assert rows["last_update_id"].is_sorted()
        assert merged_sources(o.path) == sorted(j.key for j in journals)
        assert kp.content_hash == layout.content_hash(o.path.read_bytes())
    assert spool.by_dataset() == {"deltas": (6, spool.bytes)}


@pytest.mark.parametrize("written", [1, 3, 6])
def test_interrupted_split_is_redone_identically_on_start(tmp_path, written):
    """A crash after `written` of the 6 outputs were durable (journals all still there):
    the start-up scan redoes the split with the same group: same keys, rows once."""
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10**9)
    journals = three_journals(spool)
    before = rows_of(spool)
    reference = Spool(tmp_path / "ref", max_bytes=10**9)
    for j in journals:  # the same journals in a second spool: what a clean split gives
        reference.write(j.key, j.path.read_bytes())
    expected = sorted(o.key for o in reference.split(reference.pending()))
    outputs: list = []
    spool._split_files(sorted(j.key for j in journals), outputs, hold=False)
    for o in outputs[written:]:  # never written: the crash came first
        o.path.unlink()

    restarted = Spool(root, max_bytes=10**9)
    restarted.scan()
    assert sorted(e.key for e in restarted.pending()) == expected
    assert not any(j.path.exists() for j in journals)
    key = ["symbol", "last_update_id"]
    assert rows_of(restarted).sort(key).equals(before.sort(key))


def test_split_interrupted_while_deleting_journals_finishes_the_deletion(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10**9)
    journals = three_journals(spool)
    before = rows_of(spool)
    spool._split_files(sorted(j.key for j in journals), [], hold=False)
    journals[0].path.unlink()  # the crash came after the first journal was deleted
    restarted = Spool(root, max_bytes=10**9)
    restarted.scan()
    assert not any(is_journal(e.key) for e in restarted.pending())
    key = ["symbol", "last_update_id"]
    assert rows_of(restarted).sort(key).equals(before.sort(key))


def test_interrupted_split_with_a_corrupt_journal_keeps_the_others(tmp_path, caplog):
    """Nothing lost: when a journal of an interrupted split is unreadable, the others
    are neither deleted nor trusted to be done; they stay for a split of their own."""
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10**9)
    journals = three_journals(spool)
    outputs: list = []
    spool._split_files(sorted(j.key for j in journals), outputs, hold=False)
    for o in outputs[2:]:
        o.path.unlink()  # crash after 2 of 6 outputs
    journals[1].path.write_bytes(journals[1].path.read_bytes()[:100])  # and a torn journal
    restarted = Spool(root, max_bytes=10**9)
    restarted.scan()
    kept = {e.key for e in restarted.pending() if is_journal(e.key)}
    assert kept == {journals[0].key, journals[2].key}
    assert restarted.quarantined() == 1
    assert "lost a quarantined journal" in caplog.text


def test_split_outputs_are_held_until_released_and_a_failed_split_leaves_none(
    tmp_path, monkeypatch
):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    journals = three_journals(spool)
    real_encode, calls = parquet.encode, []

    def failing_encode(frame, metadata=None):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk on fire")
        return real_encode(frame, metadata)

    monkeypatch.setattr(parquet, "encode", failing_encode)
    with pytest.raises(OSError):
        spool.split(journals, hold=True)
    # the 3 outputs written before the failure are gone; the journals stay
    assert sorted(e.key for e in spool.pending()) == sorted(j.key for j in journals)
    monkeypatch.undo()
    outputs = spool.split(journals, hold=True)
    assert spool.pending() == [] and spool.files == 6  # written, but held
    spool.release(o.key for o in outputs)
    assert sorted(e.key for e in spool.pending()) == sorted(o.key for o in outputs)


def test_outputs_a_failed_split_cannot_delete_are_not_doomed(tmp_path, monkeypatch):
    """Was (review of bd364cf): the cleanup of a failed split removed its outputs with
    `Spool.remove`, which lists an undeletable file in `.doomed` as "stored". The same
    group split again writes the same content-named keys and deletes the journals; a
    stop before their upload, and the next start deleted them: 50 of 90 rows lost."""
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10**9)
    journals = three_journals(spool)
    real_encode, real_unlink, calls = parquet.encode, Path.unlink, []

    def failing_encode(frame, metadata=None):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(5, "Input/output error")
        return real_encode(frame, metadata)

    def failing_unlink(self, missing_ok=False):
        if ".tmp-" not in self.name and not is_journal(self.relative_to(root).as_posix()):
            raise OSError(5, "Input/output error")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(parquet, "encode", failing_encode)
    monkeypatch.setattr(Path, "unlink", failing_unlink)
    with pytest.raises(OSError):
        spool.split(journals, hold=True)
    monkeypatch.undo()
    assert not (root / ".doomed").exists() or not (root / ".doomed").read_text().split()
    spool.split(journals, hold=False)  # the disk is back: same group, same keys
    assert not any(j.path.exists() for j in journals)
    again = Spool(root, max_bytes=10**9)  # a stop before the upload, then a start
    again.scan()
    rows = sum(parquet.decode(e.path.read_bytes()).height for e in again.pending())
    assert rows == 90


def test_rows_set_aside_under_an_unsafe_name_stay_in_the_quarantine(tmp_path):
    """Was (review of 74d477a): `Spool.set_aside` joined the rows' symbol into its path
    unchecked. A journal left by an older version whose unsafe-symbol rows are also
    unplaceable (the only way both checks are skipped) put its file outside the spool."""
    far = 300_000_000_000_000  # year 11476
    root = tmp_path / "a" / "b" / "spool"
    spool = Spool(root, max_bytes=10**9)
    x = pl.col("symbol") == "X"
    frame = journal_frame(1, T0, ("BTCUSDT", "X")).with_columns(
        symbol=pl.when(x).then(pl.lit("../../../../ESCAPED")).otherwise(pl.col("symbol")),
        timestamp=pl.when(x)
        .then(pl.lit(far, pl.Int64).cast(pl.Datetime("ms", "UTC")))
        .otherwise(pl.col("timestamp")),
    )
    spool.write_journal(Dataset.DELTAS, frame)  # as an older run left it
    again = Spool(root, max_bytes=10**9)
    again.scan()
    again.split(again.pending())
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and all(root in p.parents for p in files)
    (kept,) = (p for p in files if "unsafe" in p.name and p.suffix == ".parquet")
    assert parquet.decode(kept.read_bytes()).height == 10  # the 10 rows of "X"


def test_delay_histogram_counts_rows_per_bucket():
    frame = journal_frame(1, T0, ("BTCUSDT",)).with_columns(
        timestamp=pl.Series([T0 - 50, T0 - 950, T0 - 1100, T0 - 60_000] + [T0] * 6).cast(
            pl.Datetime("ms", "UTC")
        )
    )
    counts = delay_histogram(frame, T0 / 1000)
    assert len(counts) == len(DELAY_EDGES_S) + 1 and sum(counts) == 10
    assert counts[0] == 7  # 0 and 0.05 s: <= 0.1
    assert counts[DELAY_EDGES_S.index(1.0)] == 1  # 0.95 s
    assert counts[DELAY_EDGES_S.index(1.25)] == 1  # 1.1 s
    assert counts[-1] == 1  # 60 s: above the last edge
    assert delay_quantile(counts, 0.5) == 0.1 and delay_quantile(counts, 0.8) == 1.0
    assert delay_quantile(counts, 0.99) == float("inf")


async def test_writer_spools_one_journal_per_round_and_uploads_per_symbol(tmp_path):
    out = tmp_path / "out"
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    w = Writer(
        LocalStore(out),
        spool,
        BufferSection(delta_flush_interval=0.2),
        limiter=trio.CapacityLimiter(2),
        upload_interval=3600.0,
    )
    send, recv = trio.open_memory_channel(100)
    syms = [f"S{i}USDT" for i in range(20)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.run, recv)
        for sym in syms:  # one round: 20 symbols due together
            await send.send(delta_batch(1, 5, T0, sym))
        with trio.fail_after(10):
            while w.stats.rows_spooled["deltas"] < 100:
                await trio.sleep(0.01)
        assert w.stats.files_spooled == 1 and spool.files == 1
        assert is_journal(spool.pending()[0].key)
        assert sum(w.stats.spool_delay) == sum(w.stats.spool_delay_from_receive) == 100
        await send.aclose()
    objects = sorted(out.rglob("*.parquet"))
    assert len(objects) == 20 and w.stats.splits == 1
    assert {layout.parse_key(p.relative_to(out).as_posix()).symbol for p in objects} == set(syms)
    assert spool.files == 0 and w.stats.rows_uploaded["deltas"] == 100


async def test_no_split_output_is_uploaded_twice(tmp_path):
    """Uploaders run while a split writes its outputs: each output is uploaded once,
    by the worker that split (rows uploaded == rows spooled, one object per upload)."""
    out = tmp_path / "out"
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    w = Writer(
        LocalStore(out),
        spool,
        BufferSection(delta_flush_interval=0.05),
        limiter=trio.CapacityLimiter(2),
        upload_concurrency=4,
        upload_interval=0.0,
    )
    send, recv = trio.open_memory_channel(1000)
    syms = [f"S{i}USDT" for i in range(60)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(w.run, recv)
        for r in range(8):
            for sym in syms:
                await send.send(delta_batch(1 + 5 * r, 5, T0 + 1000 * r, sym))
            await trio.sleep(0.06)
        await send.aclose()
    objects = list(out.rglob("*.parquet"))
    assert w.stats.rows_uploaded["deltas"] == w.stats.rows_spooled["deltas"] == 60 * 8 * 5
    assert w.stats.files_uploaded == len(objects)
    assert sum(pl.read_parquet(p).height for p in objects) == 60 * 8 * 5


async def test_spool_flush_splits_journals_left_by_a_run(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    three_journals(spool)
    result = await drain_spool(spool, LocalStore(tmp_path / "out"))
    assert result.uploaded == 6 and result.remaining == 0
    got = pl.concat([pl.read_parquet(p) for p in (tmp_path / "out").rglob("*.parquet")])
    assert got.height == 90
    meta = parquet.read_metadata(next((tmp_path / "out").rglob("*.parquet")))
    assert len(json.loads(meta[parquet.MERGED_FROM])) == 3


def test_round_frame_equals_one_frame_per_buffer():
    """The writer builds a round's journal with one frame per (exchange, market,
    multiplier) instead of one per symbol buffer: every row must come out exactly as the
    per-buffer build makes it, each buffer's rows together (the split relies on it)."""
    from cryptoflow.pipeline.writer import COMPACT_ROWS, _Buffer, journal_frame

    def buffer(
        sym: str, exchange: str, mult: str, first_id: int, n: int, qty: list[str] | None = None
    ) -> _Buffer:
        b = delta_batch(first_id, n, T0 + first_id, sym)
        b.exchange, b.multiplier = exchange, mult
        b.columns["raw_quantity"] = qty or [f"{i % 7}.{i % 3}5" for i in range(n)]
        buf = _Buffer((Dataset.DELTAS, exchange, "futures", sym), mult, 0.0)
        buf.append(b)
        return buf

    def make() -> list[_Buffer]:
        bufs = [
            buffer("BTCUSDT", "binance", "1", 1, 7),
            buffer("XBTUSDTM", "kucoin", "0.001", 100, 5),
            buffer("ETHUSDT", "binance", "1", 200, 3),
            buffer("ETHUSDTM", "kucoin", "0.01", 300, 4),
            buffer("SOLUSDTM", "kucoin", "0.001", 400, 6),
            buffer("DOGEUSDT", "binance", "1", 500, COMPACT_ROWS),
            # OKX contract values: one scale per symbol, long sizes next to short ones
            buffer("BTCUSDT", "okx", "0.01", 600, 4, ["1", "123456789.123456", "0", "45.02"]),
            buffer("PEPEUSDT", "okx", "10000000", 700, 3, ["3", "0.5", "987654.3"]),
            buffer("DOGEUSDT", "okx", "1000", 800, 2, ["12.5", "7"]),
        ]
        bufs[-1].compact(frame_from_columns)  # a buffer that holds a frame already
        return bufs

    expected = pl.concat([b.frame(frame_from_columns) for b in make()])
    got = journal_frame(make(), frame_from_columns)
    assert got.schema == expected.schema
    assert got.height == expected.height
    key = ["exchange", "symbol", "last_update_id"]
    assert got.sort(key).equals(expected.sort(key))
    runs = got.select(pl.col("exchange"), pl.col("symbol")).select(pl.struct("*").rle_id())
    assert runs.to_series().n_unique() == 9  # one contiguous run per buffer
    # each row exactly raw × its own symbol's multiplier, correctly rounded (Decimal)
    exact = {
        (b.key[1], b.key[3], uid): float(Decimal(raw) * Decimal(b.multiplier))
        for b in make()
        if b.columns
        for uid, raw in zip(b.columns["last_update_id"], b.columns["raw_quantity"], strict=True)
    }
    checked = 0
    for row in got.iter_rows(named=True):
        key = (row["exchange"], row["symbol"], row["last_update_id"])
        if key in exact:
            assert row["quantity"] == exact[key], row
            checked += 1
    assert checked == len(exact)
    assert {k[1] for k in exact} >= {"XBTUSDTM", "ETHUSDTM", "SOLUSDTM", "PEPEUSDT"}


def test_round_frame_with_multipliers_too_wide_for_one_product_builds_per_buffer():
    """Raw sizes with many decimals and multipliers with many more leave no room for one
    exact decimal product over every row: the round falls back to one build per buffer,
    with the same rows."""
    from cryptoflow.pipeline.normalize import scaled_per_row
    from cryptoflow.pipeline.writer import _Buffer, journal_frame

    def make() -> list[_Buffer]:
        out = []
        for i, (sym, mult, qty) in enumerate(
            [("AUSDT", "0.000000000001", "1.123456789"), ("BUSDT", "0.5", "2.25")]
        ):
            b = delta_batch(1 + 10 * i, 2, T0, sym)
            b.exchange, b.multiplier = "okx", mult
            b.columns["raw_quantity"] = [qty, "3"]
            buf = _Buffer((Dataset.DELTAS, "okx", "futures", sym), mult, 0.0)
            buf.append(b)
            out.append(buf)
        return out

    wide = pl.DataFrame({"raw_quantity": ["1.123456789", "2.25"]})
    assert scaled_per_row(wide, pl.Series(["0.000000000001", "0.5"])) is None
    expected = pl.concat([b.frame(frame_from_columns) for b in make()])
    got = journal_frame(make(), frame_from_columns)
    assert got.equals(expected)
    assert got["quantity"].to_list() == [
        float(Decimal("1.123456789") * Decimal("0.000000000001")),
        float(Decimal("3") * Decimal("0.000000000001")),
        1.125,
        1.5,
    ]


def test_split_of_a_journal_with_interleaved_partitions(tmp_path):
    """A journal the writer did not make (a partition in several runs) still splits into
    one file per partition with every row and the partition columns put back."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    a = journal_frame(1, T0, ("BTCUSDT", "ETHUSDT"))
    b = journal_frame(11, T0 + 1000, ("BTCUSDT",))
    journal = spool.write_journal(Dataset.DELTAS, pl.concat([a, b]))  # BTC, ETH, BTC
    before = rows_of(spool)
    outputs = spool.split([journal])
    assert sorted(layout.parse_key(o.key).symbol for o in outputs) == ["BTCUSDT", "ETHUSDT"]
    after = rows_of(spool)
    assert after.columns == before.columns
    key = ["symbol", "last_update_id"]
    assert after.sort(key).equals(before.sort(key))


def test_raw_sizes_that_are_not_plain_decimals_are_scaled_exactly():
    """polars reads "1e-5" at the scale found from the digits after a '.' (none): 0. Such
    a size is multiplied in Python's Decimal instead, in a symbol's own frame, and makes
    a journal round fall back to one build per buffer (same rows either way)."""
    from cryptoflow.pipeline.normalize import scaled_per_row
    from cryptoflow.pipeline.writer import _Buffer, journal_frame

    sizes = ["1e-5", "3", "0.25", "2E+2"]
    wire = pl.DataFrame({"raw_quantity": sizes})
    assert scaled_per_row(wire, pl.Series(["1", "0.1", "0.1", "0.1"])) is None

    def make() -> list[_Buffer]:
        out = []
        for i, (sym, mult) in enumerate([("AUSDT", "0.1"), ("BUSDT", "1")]):
            b = delta_batch(1 + 10 * i, 4, T0, sym)
            b.exchange, b.multiplier = "okx", mult
            b.columns["raw_quantity"] = list(sizes)
            buf = _Buffer((Dataset.DELTAS, "okx", "futures", sym), mult, 0.0)
            buf.append(b)
            out.append(buf)
        return out

    got = journal_frame(make(), frame_from_columns)
    assert got.equals(pl.concat([b.frame(frame_from_columns) for b in make()]))
    assert got["quantity"].to_list() == [
        *(float(Decimal(s) * Decimal("0.1")) for s in sizes),
        *(float(s) for s in sizes),
    ]


FAR = 300_000_000_000_000  # year 11476: a valid Int64 ms the layout has no partition for


def far_batch(first_id: int, n: int, symbol: str):
    """Delta rows whose event time is FAR (received now-ish)."""
    batch = delta_batch(first_id, n, FAR, symbol)
    batch.columns["receive_time"] = [T0 * 1_000_000] * n
    return batch


def set_aside_files(spool: Spool) -> list:
    return sorted((spool.quarantine_root / "unplaced").rglob("*.parquet"))


def test_split_sets_aside_rows_it_cannot_place_and_the_rest_goes_on(tmp_path, caplog):
    """A journal (written before the writer checked placement) holding one symbol's rows
    with an event time past 9999: every split of the oldest journals failed on it, for
    ever. Now those rows are set aside in the quarantine and the others are split."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    bad = journal_frame(1, T0, ("BTCUSDT", "ETHUSDT")).with_columns(
        timestamp=pl.when(pl.col("symbol") == "ETHUSDT")
        .then(pl.lit(FAR, pl.Int64).cast(pl.Datetime("ms", "UTC")))
        .otherwise(pl.col("timestamp"))
    )
    journals = [
        spool.write_journal(Dataset.DELTAS, bad),
        spool.write_journal(Dataset.DELTAS, journal_frame(11, T0 + 1000, ("BTCUSDT", "ETHUSDT"))),
    ]
    outputs = spool.split(journals)
    assert {layout.parse_key(o.key).symbol for o in outputs} == {"BTCUSDT", "ETHUSDT"}
    stored = rows_of(spool)
    assert stored.filter(pl.col("symbol") == "BTCUSDT").height == 20
    assert stored.filter(pl.col("symbol") == "ETHUSDT")["last_update_id"].to_list() == list(
        range(11, 21)
    )
    assert not any(j.path.exists() for j in journals)
    [aside] = set_aside_files(spool)
    assert "exchange=binance/market=futures/symbol=ETHUSDT" in aside.as_posix()
    kept = pl.read_parquet(aside)
    assert kept["last_update_id"].to_list() == list(range(1, 11))
    assert "0001-9999" in aside.with_name(aside.name + ".reason").read_text()
    assert "SET ASIDE 10 deltas rows of binance/futures/ETHUSDT" in caplog.text
    assert spool.set_aside_counts() == {"deltas": 10} and spool.quarantined() == 1


def test_a_journal_that_cannot_be_split_is_quarantined_and_the_others_are_split(tmp_path, caplog):
    """A split failing for a reason that is not the disk's fails again on every try; a
    group is always the oldest journals, so one such journal stopped every later one."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    first = spool.write_journal(Dataset.DELTAS, journal_frame(1, T0, ("BTCUSDT",)))
    broken = spool.write_journal(  # no symbol column: its rows have no partition
        Dataset.DELTAS, journal_frame(11, T0 + 1000, ("BTCUSDT",)).drop("symbol")
    )
    last = spool.write_journal(Dataset.DELTAS, journal_frame(21, T0 + 2000, ("BTCUSDT",)))
    outputs = spool.split([first, broken, last])
    assert rows_of(spool)["last_update_id"].to_list() == list(range(1, 11)) + list(range(21, 31))
    assert merged_sources(outputs[0].path) == sorted([first.key, last.key])
    assert spool.files == len(outputs) == 1
    assert (spool.quarantine_root / broken.key).exists() and not broken.path.exists()
    assert f"QUARANTINED {broken.key}" in caplog.text and "cannot be split" in caplog.text


@pytest.mark.parametrize(("err", "quarantined"), [(errno.EIO, True), (errno.EMFILE, False)])
def test_a_journal_the_disk_cannot_read_is_quarantined_alone(
    tmp_path, monkeypatch, caplog, err, quarantined
):
    """Found by review (/tmp/review-merged/split_eio.py): the split took any OSError for
    the machine's and retried the same oldest group for ever, so one journal the disk
    could not read (EIO) stopped every delta/gap upload until a restart, whose scan then
    quarantined it as the file's trouble. The split now sorts read errors as the scan
    does (`MACHINE_ERRNOS`): EIO quarantines that journal and the others are split; out
    of file descriptors (EMFILE) says nothing of the journal: all stay for a retry."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    first, bad, last = (
        spool.write_journal(Dataset.DELTAS, journal_frame(1 + 10 * i, T0 + 1000 * i, ("BTCUSDT",)))
        for i in range(3)
    )
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == bad.path:
            raise OSError(err, os.strerror(err), str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    if not quarantined:
        with pytest.raises(OSError, match="Too many open files"):
            spool.split([first, bad, last])
        assert spool.quarantined() == 0 and all(j.path.exists() for j in (first, bad, last))
        return
    outputs = spool.split([first, bad, last])
    monkeypatch.undo()
    assert rows_of(spool)["last_update_id"].to_list() == list(range(1, 11)) + list(range(21, 31))
    assert merged_sources(outputs[0].path) == sorted([first.key, last.key])
    assert spool.quarantined() == 1 and (spool.quarantine_root / bad.key).exists()
    assert f"QUARANTINED {bad.key}" in caplog.text and "Input/output error" in caplog.text


def out_of_memory(*args, **kwargs):
    raise MemoryError


def test_a_split_out_of_memory_quarantines_no_journal(tmp_path, monkeypatch):
    """Found by review: a MemoryError in a split was taken for a journal that cannot be
    split (only an OSError counted as the machine's, and a MemoryError while polars read
    a journal even became CorruptSpoolFile): the dry run per journal, out of memory too,
    quarantined every journal of the group, none of them corrupt. Now it fails like a
    disk error: the journals stay for the next split."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    journals = three_journals(spool)
    before = rows_of(spool)
    monkeypatch.setattr(pl, "read_parquet", out_of_memory)
    with pytest.raises(MemoryError):
        spool.split(journals)
    monkeypatch.undo()
    assert spool.quarantined() == 0 and all(j.path.exists() for j in journals)
    assert sorted(e.key for e in spool.pending()) == sorted(j.key for j in journals)
    spool.split(journals)
    key = ["symbol", "last_update_id"]
    assert rows_of(spool).sort(key).equals(before.sort(key))


def test_a_start_out_of_memory_quarantines_nothing_and_leaves_the_split_whole(
    tmp_path, monkeypatch
):
    """At the start-up scan a MemoryError reading a file made it "corrupt" (quarantined),
    and one completing an interrupted split kept the journals beside its partial outputs
    for a split of another group (rows stored twice). Now the start fails, as on a disk
    error, and the next start finds everything as it was and completes the split."""
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10**9)
    journals = three_journals(spool)
    before = rows_of(spool)
    outputs: list = []
    spool._split_files(sorted(j.key for j in journals), outputs, hold=False)
    for o in outputs[2:]:
        o.path.unlink()  # a crash after 2 of the 6 outputs
    restarted = Spool(root, max_bytes=10**9)
    monkeypatch.setattr(pl, "read_parquet", out_of_memory)
    with pytest.raises(MemoryError):
        restarted.scan()  # validating the files
    monkeypatch.undo()
    monkeypatch.setattr(restarted, "_split_files", out_of_memory)
    with pytest.raises(MemoryError):
        restarted.scan()  # completing the split
    monkeypatch.undo()
    assert restarted.quarantined() == 0 and all(j.path.exists() for j in journals)
    again = Spool(root, max_bytes=10**9)
    again.scan()
    assert not any(is_journal(e.key) for e in again.pending())
    key = ["symbol", "last_update_id"]
    assert rows_of(again).sort(key).equals(before.sort(key))


async def test_spool_flush_is_not_stuck_behind_an_unplaceable_journal(tmp_path):
    """`cryptoflow spool flush` on a spool whose oldest journal holds a row past 9999."""
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    bad = frame_from_columns(
        Dataset.DELTAS, "binance", "futures", "ETHUSDT", far_batch(1, 10, "ETHUSDT").columns
    )
    spool.write_journal(Dataset.DELTAS, bad)
    three_journals(spool)
    result = await drain_spool(spool, LocalStore(tmp_path / "out"))
    assert result.remaining == 0 and result.uploaded == 6
    got = pl.concat([pl.read_parquet(p) for p in (tmp_path / "out").rglob("*.parquet")])
    assert got.height == 90 and len(set_aside_files(spool)) == 1


async def test_writer_never_journals_a_row_it_cannot_place(tmp_path, caplog):
    """The writer sets unplaceable rows aside before the journal is written (ERROR naming
    exchange, symbol, count); the round's other rows are spooled and uploaded."""
    out = tmp_path / "out"
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    w = Writer(
        LocalStore(out),
        spool,
        BufferSection(delta_flush_interval=0.1),
        limiter=trio.CapacityLimiter(2),
    )
    send, recv = trio.open_memory_channel(100)
    written = []
    real = spool.write_journal

    def spy(dataset, frame):
        written.append(frame)
        return real(dataset, frame)

    spool.write_journal = spy
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(w.run, recv, shutdown_timeout=5.0))
        await send.send(delta_batch(1, 5, T0, "BTCUSDT"))
        await send.send(far_batch(1, 3, "ETHUSDT"))
        await send.send(delta_batch(4, 2, T0, "ETHUSDT"))
        await trio.sleep(0.3)
        await send.send(delta_batch(6, 5, T0 + 1000, "BTCUSDT"))
        await send.aclose()
    assert written and all(layout.split_placeable(f)[1].height == 0 for f in written)
    got = pl.concat([pl.read_parquet(p) for p in out.rglob("*.parquet")])
    assert got.filter(pl.col("symbol") == "BTCUSDT").height == 10
    assert got.filter(pl.col("symbol") == "ETHUSDT")["last_update_id"].to_list() == [4, 5]
    assert w.stats.rows_spooled["deltas"] == w.stats.rows_uploaded["deltas"] == 12
    assert w.stats.rows_set_aside["deltas"] == 3 and w.stats.split_failures == 0
    assert "SET ASIDE 3 deltas rows of binance/futures/ETHUSDT" in caplog.text
    assert spool.files == 0 and len(set_aside_files(spool)) == 1


def test_journals_that_only_fail_together_are_split_one_at_a_time(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    journals = three_journals(spool)
    real = spool._split_files

    def fails_together(keys, outputs, *, hold, dry_run=False):
        if len(keys) > 1:
            raise ValueError("cannot be concatenated (test)")
        return real(keys, outputs, hold=hold, dry_run=dry_run)

    monkeypatch.setattr(spool, "_split_files", fails_together)
    outputs = spool.split(journals)
    assert merged_sources(outputs[0].path) == [journals[0].key]
    assert not journals[0].path.exists() and spool.quarantined() == 0
    assert sorted(e.key for e in spool.pending() if is_journal(e.key)) == sorted(
        j.key for j in journals[1:]
    )


async def test_rows_set_aside_before_a_refused_journal_are_not_set_aside_again(
    tmp_path, clock, frame_builder, caplog
):
    """Found by review: a round set a symbol's unplaceable rows aside, then the spool
    refused its journal (full); the buffer kept them, and its retry shared a round with
    a younger buffer of the same symbol: their unplaceable rows went into one file of
    another content name, so the first rows were stored twice and counted twice. Set
    aside once, they now leave the buffer."""
    out = tmp_path / "out"
    spool = Spool(tmp_path / "spool", max_bytes=100)  # refuses every journal
    w = Writer(
        LocalStore(out),
        spool,
        BufferSection(delta_flush_interval=1.0),
        limiter=trio.CapacityLimiter(2),
        frame_builder=frame_builder,
        retry_initial=2.0,  # the retry comes due within 1-2 s
        retry_max=2.0,
    )
    send, recv = trio.open_memory_channel(100)
    clock.autojump_threshold = float("inf")  # time moves by hand until the final drain
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(w.run, recv, shutdown_timeout=5.0))
        await send.send(far_batch(1, 3, "ETHUSDT"))
        await send.send(delta_batch(4, 2, T0, "ETHUSDT"))
        await eventually(lambda: w.stats.rows_received["deltas"] == 5)
        clock.jump(1.0)
        await eventually(lambda: w.stats.spool_full_events == 1)
        assert w.stats.rows_set_aside["deltas"] == 3
        await send.send(far_batch(10, 2, "ETHUSDT"))  # a younger buffer, due at 2.0
        await send.send(delta_batch(12, 1, T0 + 1000, "ETHUSDT"))
        await eventually(lambda: w.stats.rows_received["deltas"] == 8)
        spool.max_bytes = 10**9
        clock.jump(2.5)  # both due: one round
        await eventually(lambda: w.stats.flushes == 2)
        clock.autojump_threshold = 0.02  # the final drain polls with trio.sleep
        await send.aclose()
    got = pl.concat([pl.read_parquet(p) for p in out.rglob("*.parquet")])
    assert sorted(got["last_update_id"]) == [4, 5, 12]
    aside = pl.concat([pl.read_parquet(p) for p in set_aside_files(spool)])
    assert sorted(aside["last_update_id"]) == [1, 2, 3, 10, 11]  # each once
    assert w.stats.rows_set_aside["deltas"] == spool.set_aside_counts()["deltas"] == 5
    assert w.stats.rows_spooled["deltas"] == w.stats.rows_uploaded["deltas"] == 3
    assert w.stats.buffered_rows == 0
    assert "5 rows were set aside" in caplog.text
