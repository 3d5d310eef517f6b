"""Poll snapshots parsed at the writer's flush (`pipeline/bodies.py`) store the same rows
as the simple path (parse on arrival, `Normalizer.feed`, `frame_from_columns`); bad
bodies are left out one by one, named, and counted as failed polls.

Inputs: the recorded BTCUSDT REST body (2 x 1000 levels) and damaged copies of it.
"""

from __future__ import annotations

import logging
import re

import attrs
import bodies_support
import orjson
import polars as pl
import pytest
import trio
from paths import RECORDED

from cryptoflow.book.sync import BookState
from cryptoflow.config_schema import BufferSection
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.binance.parse import count_snapshot_levels, parse_rest_snapshot
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import Dataset, DepthDiff, SnapshotBody, SnapshotSource
from cryptoflow.pipeline.bodies import BodyBatch, frame_from_bodies
from cryptoflow.pipeline.normalize import Normalizer, frame_from_columns
from cryptoflow.pipeline.writer import run_writer
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.spool import Spool
from cryptoflow.tools.recording import iter_records

BTC = RECORDED / "binance" / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz"
CODEC = registry.get_venue("binance").snapshot_codec
EX, MKT, SYM = "binance", "futures", "BTCUSDT"

pytestmark = pytest.mark.skipif(not BTC.exists(), reason=f"shared recordings absent ({BTC})")


def recorded_body() -> tuple[bytes, int]:
    for rec in iter_records(BTC):
        if rec.kind == "rest_snapshot":
            return orjson.dumps(rec.msg), rec.recv_ns
    raise AssertionError("no rest_snapshot in the recording")


def bodies(n: int = 3, **edits: object) -> list[SnapshotBody]:
    """n poll bodies 10 s apart; `edits` replace top-level fields of the recorded body."""
    body, recv = recorded_body()
    if edits:
        obj = orjson.loads(body)
        obj.update(edits)
        body = orjson.dumps(obj)
    return [SnapshotBody(EX, MKT, SYM, body, recv + i * 10**10) for i in range(n)]


def simple_frame(items: list[SnapshotBody]) -> pl.DataFrame:
    return bodies_support.simple_frame(RULES, parse_rest_snapshot, items)


def test_batch_read_equals_the_simple_path_on_the_recorded_body():
    items = bodies(3)
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", CODEC, items)
    assert rejected == []
    assert frame.height == 3 * 2000 == sum(count_snapshot_levels(b.body) for b in items)
    assert frame.equals(simple_frame(items))


def test_a_body_outside_the_exact_wire_shape_is_read_one_by_one_with_the_same_rows(monkeypatch):
    items = bodies(2)
    pretty = orjson.dumps(orjson.loads(items[1].body), option=orjson.OPT_INDENT_2)
    items[1] = SnapshotBody(EX, MKT, SYM, pretty, items[1].receive_time)
    assert CODEC.read([b.body for b in items], [0, 0], "poll") is None  # not the fast shape
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", CODEC, items)
    assert rejected == [] and frame.equals(simple_frame(items))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda b: b[:-40], "invalid JSON"),  # truncated
        (lambda b: b.replace(b'"lastUpdateId"', b'"lastUpdateID"', 1), "lastUpdateId"),
        (lambda b: b.replace(b'["', b'[1,"', 1), "string pair"),  # a level of three
        (lambda b: b.replace(b'["', b'["x', 1), "does not fit"),  # price "x6..."
        # a JSON integer Int64 cannot hold: the parser refuses it (tests/test_id_range.py)
        (
            lambda b: re.sub(rb'"lastUpdateId":\d+', b'"lastUpdateId":%d' % 2**63, b),
            "'lastUpdateId' is out of the 64-bit range",
        ),
    ],
)
def test_a_bad_body_is_left_out_named_and_the_others_kept(damage, why):
    good = bodies(3)
    bad = SnapshotBody(EX, MKT, SYM, damage(good[1].body), good[1].receive_time)
    items = [good[0], bad, good[2]]
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", CODEC, items)
    assert len(rejected) == 1 and "BTCUSDT" in rejected[0] and why in rejected[0], rejected
    assert frame.equals(simple_frame([good[0], good[2]]))


def diff(first: int, last: int, recv: int) -> DepthDiff:
    return DepthDiff(EX, MKT, SYM, 1, 1, first, last, first - 1, [("1", "1")], [], recv)


def test_normalizer_parses_a_body_the_book_needs_and_defers_the_others():
    (item,) = bodies(1)
    lid = orjson.loads(item.body)["lastUpdateId"]
    norm = Normalizer({EX: RULES}, codecs={EX: CODEC})
    # waiting for a snapshot: parsed now (rows as lists) and the book anchors on it
    out = norm.feed_many([diff(lid - 5, lid + 3, 1), item])
    assert [b.dataset for b in out.batches] == [Dataset.DELTAS, Dataset.SNAPSHOTS]
    assert out.batches[1].rows == 2000 and out.bodies == []
    assert norm.sync(EX, MKT, SYM).state is BookState.SYNCED
    # in sync: left unparsed for the writer, counted by its levels
    out = norm.feed_many([diff(lid + 4, lid + 9, 2), item])
    assert [b.dataset for b in out.batches] == [Dataset.DELTAS]
    (batch,) = out.bodies
    assert batch.bodies == [item] and batch.rows == 2000 and batch.codec is CODEC
    assert out.counters["snapshot_rows"] == 2000
    assert norm.sync(EX, MKT, SYM).counters.snapshots == 2


def test_normalizer_reports_a_malformed_body_it_must_parse():
    (item,) = bodies(1)
    bad = SnapshotBody(EX, MKT, SYM, item.body[:100], item.receive_time)
    out = Normalizer({EX: RULES}, codecs={EX: CODEC}).feed_many([bad])
    assert out.batches == [] and out.bodies == []
    ((symbol, message),) = out.errors
    assert symbol == SYM and "binance/BTCUSDT" in message and "invalid JSON" in message


def test_a_body_without_levels_is_parsed_at_once_even_in_sync():
    """Nothing to gain from deferring it, and an error page is reported when it comes."""
    (item,) = bodies(1)
    lid = orjson.loads(item.body)["lastUpdateId"]
    norm = Normalizer({EX: RULES}, codecs={EX: CODEC})
    norm.feed_many([diff(lid - 5, lid + 3, 1), item])
    assert norm.sync(EX, MKT, SYM).state is BookState.SYNCED
    page = SnapshotBody(EX, MKT, SYM, b"<html>502 Bad Gateway</html>", item.receive_time)
    out = norm.feed_many([page])
    assert out.bodies == [] and out.batches == []
    ((_, message),) = out.errors
    assert "binance/BTCUSDT" in message and "invalid JSON" in message
    empty = bodies(1, bids=[], asks=[])[0]
    out = norm.feed_many([empty])
    assert out.bodies == [] and out.errors == [] and out.batches == []
    assert norm.sync(EX, MKT, SYM).counters.snapshots == 2  # the error page was none


async def test_writer_stores_bodies_with_parsed_rows_in_arrival_order(tmp_path, caplog):
    """A buffer holding a parsed (resync) snapshot between two bodies, and a bad body:
    the file has the good rows in receive order; the bad one is logged and reported."""
    items = bodies(4)
    bad = SnapshotBody(EX, MKT, SYM, items[3].body[:-40], items[3].receive_time)
    resync = parse_rest_snapshot(items[1].body, SYM, items[1].receive_time, SnapshotSource.RESYNC)
    (resync_rows,) = Normalizer({EX: RULES}).feed_many([resync]).batches
    rejected: list[str] = []

    def body_batch(b: SnapshotBody) -> BodyBatch:
        n = count_snapshot_levels(b.body)
        return BodyBatch(EX, MKT, SYM, [b], n, CODEC, on_rejected=rejected.append)

    out = tmp_path / "out"
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await nursery.start(
            lambda task_status: run_writer(
                recv,
                LocalStore(out),
                spool,
                BufferSection(),
                limiter=trio.CapacityLimiter(2),
                task_status=task_status,
            )
        )
        for batch in (body_batch(items[0]), resync_rows, body_batch(items[2]), body_batch(bad)):
            await send.send(batch)
        await send.aclose()  # end of input: final flush and upload
    (path,) = out.rglob("*.parquet")
    stored = pl.read_parquet(path)
    expected = pl.concat(
        [
            simple_frame([items[0]]),
            frame_from_columns(Dataset.SNAPSHOTS, EX, MKT, SYM, resync_rows.columns),
            simple_frame([items[2]]),
        ]
    )
    assert stored.equals(expected)
    assert stored["source"].to_list() == ["poll"] * 2000 + ["resync"] * 2000 + ["poll"] * 2000
    assert writer.stats.rows_spooled["snapshots"] == 6000
    assert writer.stats.snapshot_bodies_rejected == 1
    assert len(rejected) == 1 and "invalid JSON" in rejected[0]
    assert any(
        r.levelno == logging.WARNING and "snapshot failed: binance/BTCUSDT" in r.getMessage()
        for r in caplog.records
    )


async def test_bodies_left_out_at_the_flush_are_not_counted_as_received(
    tmp_path, caplog, monkeypatch
):
    """Found by an audit (a Binance collect with a truncated poll body and one without
    `bids`: `done ...: rows received=22570 spooled=20591 uploaded=20591`): a body was
    counted received by its estimated levels on arrival and never taken back when its
    parser rejected it at the flush, so the no-loss check (received = spooled =
    uploaded) showed rows lost that never existed. Bodies count when read, exactly,
    also through a flush the spool refuses first; the final line names the bodies."""
    good = bodies(3)
    truncated = SnapshotBody(EX, MKT, SYM, good[1].body[:-40], good[1].receive_time)
    no_bids = bodies(1)[0]
    obj = orjson.loads(no_bids.body)
    del obj["bids"]
    no_bids = SnapshotBody(EX, MKT, SYM, orjson.dumps(obj), good[2].receive_time + 1)
    rejected: list[str] = []
    refused = [1]  # the first spool write fails: the rows are kept and retried
    real_write = Spool.write

    def write(self, *args, **kwargs):
        if refused[0]:
            refused[0] -= 1
            raise OSError(5, "Input/output error (test)")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Spool, "write", write)
    out = tmp_path / "out"
    send, recv = trio.open_memory_channel(10)
    with caplog.at_level(logging.INFO, logger="cryptoflow.pipeline.writer"):
        async with trio.open_nursery() as nursery:
            writer = await nursery.start(
                lambda task_status: run_writer(
                    recv,
                    LocalStore(out),
                    Spool(tmp_path / "spool", max_bytes=10**9),
                    BufferSection(),
                    limiter=trio.CapacityLimiter(2),
                    retry_initial=0.05,
                    task_status=task_status,
                )
            )
            for b in (good[0], truncated, good[2], no_bids):
                n = count_snapshot_levels(b.body)
                await send.send(BodyBatch(EX, MKT, SYM, [b], n, CODEC, on_rejected=rejected.append))
            await send.aclose()  # end of input: final flush (refused once) and upload
    (path,) = out.rglob("*.parquet")
    assert pl.read_parquet(path).equals(simple_frame([good[0], good[2]]))
    s = writer.stats
    assert refused == [0] and s.flush_failures == 1
    assert s.rows_received == s.rows_spooled == s.rows_uploaded == {"snapshots": 4000}
    assert s.rows_by_symbol == {("snapshots", EX, SYM): 4000}
    assert s.buffered_rows == 0 and s.snapshot_bodies_rejected == 2
    assert len(rejected) == 2 and "invalid JSON" in rejected[0] and "bids" in rejected[1]
    (final,) = [r.getMessage() for r in caplog.records if "writer stopped" in r.getMessage()]
    assert "rows received=4000 spooled=4000 uploaded=4000;" in final
    assert final.endswith("; 2 poll snapshot bodies left out (malformed, no rows)")
    assert "LOST" not in caplog.text


async def test_a_memory_error_merging_read_bodies_keeps_them_for_the_retry(
    tmp_path, caplog, monkeypatch
):
    """Found by review (/tmp/review-merged/bodies_memerr.py): `_Buffer._read_bodies`
    emptied the buffer's bodies and counted their rows before it merged them with the
    buffer's parsed rows; a MemoryError in that merge lost the poll rows while the log
    said "kept in memory" (the retry spooled 2000 of 4000 rows). The buffer now changes
    only once the merged frame is built."""
    import sys

    (poll,) = bodies(1)
    resync = parse_rest_snapshot(poll.body, SYM, poll.receive_time - 1, SnapshotSource.RESYNC)
    (resync_rows,) = Normalizer({EX: RULES}).feed_many([resync]).batches
    short = [1]
    real_concat = pl.concat

    def concat(*args, **kwargs):
        if short[0] and sys._getframe(1).f_code.co_name == "_read_bodies":
            short[0] -= 1
            raise MemoryError
        return real_concat(*args, **kwargs)

    monkeypatch.setattr(pl, "concat", concat)
    out = tmp_path / "out"
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        writer = await nursery.start(
            lambda task_status: run_writer(
                recv,
                LocalStore(out),
                Spool(tmp_path / "spool", max_bytes=10**9),
                BufferSection(),
                limiter=trio.CapacityLimiter(2),
                retry_initial=0.05,
                task_status=task_status,
            )
        )
        await send.send(resync_rows)
        await send.send(BodyBatch(EX, MKT, SYM, [poll], count_snapshot_levels(poll.body), CODEC))
        await send.aclose()  # end of input: final flush (out of memory once) and upload
    (path,) = out.rglob("*.parquet")
    stored = pl.read_parquet(path)
    assert stored["source"].to_list() == ["resync"] * 2000 + ["poll"] * 2000
    s = writer.stats
    assert short == [0] and s.flush_failures == 1
    assert s.rows_received == s.rows_spooled == s.rows_uploaded == {"snapshots": 4000}
    assert s.buffered_rows == 0
    assert "(MemoryError); kept in memory" in caplog.text and "LOST" not in caplog.text


def test_a_reader_that_fails_inside_polars_falls_back_to_the_checked_parser():
    """Whatever the batch reader meets, the flush must not fail: body by body instead."""

    def broken(*_args):
        raise pl.exceptions.ComputeError("the reader broke (test)")

    items = bodies(2)
    codec = attrs.evolve(CODEC, read=broken)
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", codec, items)
    assert rejected == [] and frame.equals(simple_frame(items))


@pytest.mark.parametrize("name", registry.available())
def test_every_venue_rest_client_has_the_protocol_methods(name):
    """`runtime.fetch` calls `fetch_snapshot_body` for polls of a venue with a
    `snapshot_codec` (`registry.VenueRestClient`): each venue's client must have every
    method of the protocol, with the same keyword arguments."""
    import inspect

    import httpx

    from cryptoflow.net.ratelimit import RateBudget

    venue = registry.get_venue(name)
    assert venue.snapshot_codec is not None
    client = venue.make_rest(httpx.AsyncClient(), RateBudget(1000))
    for method in ("fetch_snapshot", "fetch_snapshot_body", "fetch_instruments"):
        want = inspect.signature(getattr(registry.VenueRestClient, method)).parameters
        got = inspect.signature(getattr(client, method)).parameters
        assert list(got) == [p for p in want if p != "self"], (name, method)


def test_after_a_body_rejected_at_the_flush_bodies_are_parsed_on_arrival_until_one_parses():
    """Only usable poll snapshots count on the snapshots lane once the flush has found a
    malformed one: the next bodies are parsed on arrival (a bad one is an error, not a
    snapshot), and a good one lets bodies be read at the flush again."""
    (item,) = bodies(1)
    bad = SnapshotBody(EX, MKT, SYM, item.body[:-40], item.receive_time)
    lid = orjson.loads(item.body)["lastUpdateId"]
    norm = Normalizer({EX: RULES}, codecs={EX: CODEC})
    norm.feed_many([diff(lid - 5, lid + 3, 1), item])
    sync = norm.sync(EX, MKT, SYM)
    (batch,) = norm.feed_many([bad]).bodies  # in sync: left for the flush, counted
    assert sync.counters.snapshots == 2
    batch.on_rejected("binance/BTCUSDT: invalid JSON (at the flush)")
    out = norm.feed_many([bad])
    assert out.bodies == [] and len(out.errors) == 1 and sync.counters.snapshots == 2
    out = norm.feed_many([item])  # parsed: usable, counted
    assert out.errors == [] and out.bodies == [] and sync.counters.snapshots == 3
    assert len(norm.feed_many([item]).bodies) == 1  # unread again
    assert sync.counters.snapshots == 4


async def test_a_lane_whose_every_body_is_rejected_at_the_flush_turns_stale(tmp_path):
    """Found by an audit (`rest_malformed` x1000 on bybit ETHUSDT, book synced: 0 poll
    snapshots stored, /healthz 200): a body left unread for the writer counted as a
    snapshot on arrival, so the snapshots lane looked fresh though every poll was
    malformed. Through the normalizer and writer as the run wires them, the lane now
    turns `stale` after `stale_after` while the deltas lane stays fresh."""
    from cryptoflow.ops.health import check_health
    from cryptoflow.ops.metrics import Freshness
    from cryptoflow.pipeline.poller import PollStats
    from cryptoflow.runtime import RunResult, ShardStats, _run_normalizer

    class Resync:
        def request(self, symbol: str) -> None:
            pass

    (item,) = bodies(1)
    bad = SnapshotBody(EX, MKT, SYM, item.body[:-40], item.receive_time)
    lid = orjson.loads(item.body)["lastUpdateId"]
    norm = Normalizer({EX: RULES}, codecs={EX: CODEC})
    polls = {SYM: PollStats()}
    result = RunResult(shards={"binance/main": ShardStats(polls=polls, normalizer=norm)})
    fresh = Freshness(clock=trio.current_time)
    stale_after = 0.6
    raw_send, raw_recv = trio.open_memory_channel(100)
    rows_send, rows_recv = trio.open_memory_channel(100)
    buffers = BufferSection(snapshot_flush_interval=0.05, delta_flush_interval=0.05)
    reasons: list[dict] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_run_normalizer, raw_recv, rows_send, norm, Resync(), polls)
        await nursery.start(
            lambda task_status: run_writer(
                rows_recv,
                LocalStore(tmp_path / "out"),
                Spool(tmp_path / "spool", max_bytes=10**9),
                buffers,
                limiter=trio.CapacityLimiter(2),
                task_status=task_status,
            )
        )
        async with raw_send:
            await raw_send.send(diff(lid - 5, lid + 3, 1))
            await raw_send.send(item)  # anchors the book: synced
            deadline = trio.current_time() + 4 * stale_after
            k = lid + 4
            while trio.current_time() < deadline:
                await raw_send.send(diff(k, k, 2))  # the stream stays alive
                await raw_send.send(bad)
                k += 1
                await trio.sleep(0.03)
                reasons = check_health(result, stale_after=stale_after, freshness=fresh)
                if reasons:
                    break
    assert [(r["reason"], r["lane"]) for r in reasons] == [("stale", "snapshots")]
    assert polls[SYM].malformed >= 1
    assert norm.sync(EX, MKT, SYM).state is BookState.SYNCED
