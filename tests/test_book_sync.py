"""The shared book-sync machine, rule by rule (table-driven), plus the in-memory book."""

from __future__ import annotations

import attrs
import pytest

from cryptoflow.book.orderbook import OrderBook, is_zero
from cryptoflow.book.sync import BookState, BookSync, SyncRules
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import DepthDiff, DepthSnapshot, GapKind, SnapshotSource, StreamEvent

SEQ = GapKind.SEQUENCE_BREAK
RESYNC = GapKind.RESYNC


def d(first: int, last: int, prev: int | None, *, bids=(), asks=(), snap=False) -> DepthDiff:
    return DepthDiff(
        exchange="binance",
        market="futures",
        symbol="BTCUSDT",
        event_time=last * 10,
        transaction_time=None,
        first_update_id=first,
        last_update_id=last,
        prev_update_id=prev,
        bids=[list(x) for x in bids],
        asks=[list(x) for x in asks],
        receive_time=last * 10_000_000,
        is_snapshot=snap,
    )


def s(last: int, *, bids=(), asks=(), source=SnapshotSource.RESYNC) -> DepthSnapshot:
    return DepthSnapshot(
        exchange="binance",
        market="futures",
        symbol="BTCUSDT",
        event_time=last * 10 + 1,
        transaction_time=None,
        last_update_id=last,
        bids=[list(x) for x in bids],
        asks=[list(x) for x in asks],
        receive_time=last * 10_000_000,
        source=source,
    )


def ev(kind: GapKind, dropped: int = 0, **kw) -> StreamEvent:
    return StreamEvent("binance", "futures", "BTCUSDT", kind, time=0, dropped=dropped, **kw)


def overload(dropped: int, *, final: bool = False) -> StreamEvent:
    """A drop marker as the stream reader sends it (the cause; the count in `dropped`)."""
    return ev(GapKind.CONSUMER_OVERLOAD, dropped, reason="normalizer channel full", final=final)


@attrs.define
class Run:
    sync: BookSync
    gaps: list = attrs.field(factory=list)
    requests: int = 0
    recorded: int = 0
    not_recorded: int = 0


def run(steps, rules: SyncRules = RULES, track_book: bool = False) -> Run:
    r = Run(BookSync("binance", "futures", "BTCUSDT", rules, track_book=track_book))
    for step in steps:
        if isinstance(step, DepthDiff):
            dec = r.sync.on_diff(step)
            r.recorded += dec.record
            r.not_recorded += not dec.record
        elif isinstance(step, DepthSnapshot):
            dec = r.sync.on_snapshot(step)
        else:
            dec = r.sync.on_event(step)
        r.gaps.extend((g.kind, g.last_good_id, g.first_id_after) for g in dec.gaps)
        r.requests += dec.need_snapshot
    return r


# Each case: steps, expected gaps [(kind, last_good_id, first_id_after)], expected final
# state, book id, and counters that must match.
CASES = {
    "stale diffs dropped, straddling diff applied": (
        [d(1, 10, 0), d(11, 20, 10), d(21, 30, 20), s(25), d(31, 40, 30)],
        [],
        BookState.SYNCED,
        40,
        {"stale_dropped": 2, "applied": 2, "snapshot_requests": 1},
    ),
    "first diff may start at L + 1": (
        [d(11, 20, 10), d(21, 30, 20), s(10)],
        [],
        BookState.SYNCED,
        30,
        {"stale_dropped": 0, "applied": 2},
    ),
    "diff ending exactly at L is applied (straddles)": (
        [d(1, 10, 0), d(11, 20, 10), s(20)],
        [],
        BookState.SYNCED,
        20,
        {"stale_dropped": 1, "applied": 1},
    ),
    "snapshot before any diff, then stale, then straddling": (
        [s(15), d(1, 10, 0), d(11, 20, 10), d(21, 30, 20)],
        [],
        BookState.SYNCED,
        30,
        {"stale_dropped": 1, "applied": 2, "snapshot_requests": 0},
    ),
    "snapshot older than all buffered diffs: ask again, then anchor": (
        [d(21, 30, 20), d(31, 40, 30), s(10), d(41, 50, 40), s(35)],
        [],
        BookState.SYNCED,
        50,
        {"snapshots_too_old": 1, "snapshot_requests": 2, "applied": 2, "stale_dropped": 1},
    ),
    "anchored snapshot then a too-new first diff": (
        [s(10), d(21, 30, 20), s(25)],
        [],
        BookState.SYNCED,
        30,
        {"snapshots_too_old": 1, "snapshot_requests": 1},
    ),
    "gap detected while synced, then resync": (
        [s(5), d(1, 10, 0), d(11, 20, 10), d(31, 40, 30), d(41, 50, 40), s(45), d(51, 60, 50)],
        [(SEQ, 20, 31), (RESYNC, 20, 45)],
        BookState.SYNCED,
        60,
        {"breaks": 1, "resyncs": 1, "snapshot_requests": 1, "stale_dropped": 1},
    ),
    "gap before the first snapshot: recorded, no resync gap": (
        [d(1, 10, 0), d(21, 30, 20), s(25), d(31, 40, 30)],
        [(SEQ, 10, 21)],
        BookState.SYNCED,
        40,
        {"breaks": 1, "resyncs": 0, "snapshot_requests": 1},
    ),
    "break while aligning for the first time: no resync gap": (
        [d(1, 10, 0), s(15), d(31, 40, 30), s(35), d(41, 50, 40)],
        [(SEQ, 10, 31)],
        BookState.SYNCED,
        50,
        {"breaks": 1, "resyncs": 0},
    ),
    "exact duplicate dropped and counted, not a break": (
        [s(5), d(1, 10, 0), d(1, 10, 0), d(11, 20, 10)],
        [],
        BookState.SYNCED,
        20,
        {"duplicates": 1, "breaks": 0, "applied": 2},
    ),
    "out of order: two breaks, chain keeps the newest id": (
        [s(5), d(1, 10, 0), d(21, 30, 20), d(11, 20, 10), d(31, 40, 30)],
        # the late diff's row spans it up to the newest id, ascending (10 -> 30)
        [(SEQ, 10, 21), (SEQ, 10, 30)],
        BookState.WAITING,
        None,
        {"breaks": 2, "snapshot_requests": 1},
    ),
    "consumer overload: gap even though the next diff continues": (
        [s(5), d(1, 10, 0), ev(GapKind.CONSUMER_OVERLOAD, 3), d(11, 20, 10), s(15)],
        [(GapKind.CONSUMER_OVERLOAD, 10, 11), (RESYNC, 10, 15)],
        BookState.SYNCED,
        20,
        {"breaks": 1, "resyncs": 1, "snapshot_requests": 1},
    ),
    "reconnect, stream continues: no gap": (
        [s(5), d(1, 10, 0), ev(GapKind.RECONNECT), d(11, 20, 10)],
        [],
        BookState.SYNCED,
        20,
        {"breaks": 0},
    ),
    "reconnect, stream does not continue: reconnect gap and resync": (
        [s(5), d(1, 10, 0), ev(GapKind.RECONNECT), d(31, 40, 30), s(35), d(41, 50, 40)],
        [(GapKind.RECONNECT, 10, 31), (RESYNC, 10, 35)],
        BookState.SYNCED,
        50,
        {"breaks": 1, "resyncs": 1},
    ),
    "reconnect, the venue restarted its ids lower: the new chain is followed and healed": (
        # OKX restarts seqId after maintenance; no in-stream snapshot: a REST one anchors
        [
            *(s(105), d(101, 110, 100), ev(GapKind.RECONNECT)),
            *(d(11, 20, 10), d(21, 30, 20), s(25), d(31, 40, 30)),
        ],
        [(GapKind.RECONNECT, 110, 11), (RESYNC, 110, 25)],
        BookState.SYNCED,
        40,
        {"breaks": 1, "resyncs": 1, "snapshot_requests": 1, "stale_dropped": 1},
    ),
    "ids restart lower after overload and reconnect markers: followed too": (
        [
            *(s(105), d(101, 110, 100), ev(GapKind.CONSUMER_OVERLOAD), ev(GapKind.RECONNECT)),
            *(d(11, 20, 10), d(21, 30, 20), s(25), d(31, 40, 30)),
        ],
        [(GapKind.CONSUMER_OVERLOAD, 110, 11), (RESYNC, 110, 25)],
        BookState.SYNCED,
        40,
        {"breaks": 1, "resyncs": 1},
    ),
    "an older diff later on the same connection is out of order, not a restart": (
        [
            *(s(105), d(101, 110, 100), ev(GapKind.RECONNECT)),
            *(d(111, 120, 110), d(11, 20, 10), d(121, 130, 120)),
        ],
        [(SEQ, 10, 120)],
        BookState.WAITING,
        None,
        {"breaks": 1},
    ),
    "overload marker wins over a later reconnect marker": (
        [s(5), d(1, 10, 0), ev(GapKind.CONSUMER_OVERLOAD), ev(GapKind.RECONNECT), d(11, 20, 10)],
        [(GapKind.CONSUMER_OVERLOAD, 10, 11)],
        BookState.WAITING,
        None,
        {"breaks": 1},
    ),
    "in-stream snapshot anchors at once and heals a break": (
        [d(1, 10, None, snap=True), d(11, 20, 10), d(31, 40, 30), d(41, 41, None, snap=True)],
        [(SEQ, 20, 31), (RESYNC, 20, 41)],
        BookState.SYNCED,
        41,
        {"breaks": 1, "resyncs": 1, "snapshot_requests": 1},
    ),
    "one snapshot request per waiting period": (
        [d(1, 10, 0), d(11, 20, 10), d(21, 30, 20)],
        [],
        BookState.WAITING,
        None,
        {"snapshot_requests": 1, "applied": 0},
    ),
    "poll snapshot while synced does not re-anchor": (
        [s(5), d(1, 10, 0), s(100, source=SnapshotSource.POLL), d(11, 20, 10)],
        [],
        BookState.SYNCED,
        20,
        {"breaks": 0, "snapshots": 2},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sync_rules(name):
    steps, gaps, state, book_id, counters = CASES[name]
    r = run(steps)
    assert r.gaps == gaps
    assert r.sync.state is state
    assert r.sync.book_id == book_id
    for key, value in counters.items():
        assert getattr(r.sync.counters, key) == value, key
    assert r.requests == r.sync.counters.snapshot_requests


def test_every_diff_recorded_except_duplicates():
    steps = CASES["exact duplicate dropped and counted, not a break"][0]
    r = run(steps)
    assert (r.recorded, r.not_recorded) == (2, 1)
    r = run(CASES["out of order: two breaks, chain keeps the newest id"][0])
    assert (r.recorded, r.not_recorded) == (4, 0)


def test_gap_times_are_event_times():
    sync = BookSync("binance", "futures", "BTCUSDT", RULES)
    sync.on_diff(d(1, 10, 0))
    (gap,) = sync.on_diff(d(31, 40, 30)).gaps
    assert (gap.start_time, gap.end_time, gap.detected_at) == (100, 400, 400_000_000)
    assert "30" in gap.reason and "10" in gap.reason


def test_out_of_order_gap_row_is_ascending():
    """A late diff's row must read forwards (ids and times), or a reader's interval test
    is empty and the tools print inverted ranges."""
    sync = BookSync("binance", "futures", "BTCUSDT", RULES)
    for diff in (d(1, 10, 0), d(21, 30, 20)):
        sync.on_diff(diff)
    (gap,) = sync.on_diff(d(11, 20, 10)).gaps
    assert (gap.last_good_id, gap.first_id_after) == (10, 30)
    assert (gap.start_time, gap.end_time) == (200, 300)
    assert gap.reason == "out of order: updates 11..20 came after 30"


def test_resync_is_detected_when_the_snapshot_came():
    """The resync row's `detected_at` is when the book lined up: the snapshot's receive
    time if it came after the buffered diffs (it used to be the last diff's)."""
    sync = BookSync("binance", "futures", "BTCUSDT", RULES)
    sync.on_snapshot(s(5))
    sync.on_diff(d(1, 10, 0))
    sync.on_diff(d(31, 40, 30))  # break: waits for a snapshot, diff buffered
    late = attrs.evolve(s(35), receive_time=999_000_000_000)
    (resync,) = sync.on_snapshot(late).gaps
    assert resync.kind is RESYNC and resync.detected_at == late.receive_time


def test_a_resync_row_says_what_healed_and_on_which_snapshot():
    """The RESYNC row (and so its log line) had an empty reason: now it names the
    snapshot that re-anchored the book (its `source` and id) and the break it heals."""
    sync = BookSync("binance", "futures", "BTCUSDT", RULES)
    sync.on_snapshot(s(5))
    sync.on_diff(d(1, 10, 0))
    sync.on_diff(d(31, 40, 30))  # break after 10
    (resync,) = sync.on_snapshot(s(35)).gaps
    assert resync.reason == "healed: book re-anchored on resync snapshot 35 after the break at 10"
    r = run([d(1, 10, None, snap=True), d(11, 20, 10), d(31, 40, 30)])
    (resync,) = r.sync.on_diff(d(41, 41, None, snap=True)).gaps
    assert resync.reason == "healed: book re-anchored on stream snapshot 41 after the break at 20"


def test_overload_markers_before_one_diff_add_up_their_drops():
    """A drop marker can go out while the diff after it is dropped again, so the next
    marker counts only that one. The gap kept the first marker's count (audit: the gap
    rows of a run summed to fewer drops than the diffs lost); now they add up."""
    sync = BookSync("binance", "futures", "BTCUSDT", RULES)
    sync.on_snapshot(s(5))
    sync.on_diff(d(1, 10, 0))
    for marker in (overload(3), ev(GapKind.RECONNECT), overload(1), overload(2)):
        assert sync.on_event(marker).gaps == ()
    (gap,) = sync.on_diff(d(31, 40, 30)).gaps
    assert (gap.kind, gap.last_good_id, gap.first_id_after) == (GapKind.CONSUMER_OVERLOAD, 10, 31)
    assert gap.reason == "normalizer channel full; dropped 6 messages"


def test_a_final_overload_marker_takes_the_pending_drops_along():
    """At the stop a `final` marker is a gap at once; drops of a marker still waiting
    for a diff (which will not come now) were left out of it."""
    sync = BookSync("binance", "futures", "BTCUSDT", RULES)
    sync.on_snapshot(s(5))
    sync.on_diff(d(1, 10, 0))
    assert sync.on_event(overload(4)).gaps == ()
    (gap,) = sync.on_event(overload(2, final=True)).gaps
    assert (gap.kind, gap.last_good_id, gap.first_id_after) == (GapKind.CONSUMER_OVERLOAD, 10, None)
    assert gap.reason == "normalizer channel full; dropped 6 messages before the stop"
    assert sync.counters.breaks == 1


def test_buffer_is_bounded():
    rules = SyncRules(venue="binance", max_buffer=3)
    r = run([d(i * 10 + 1, i * 10 + 10, i * 10) for i in range(10)] + [s(5)], rules=rules)
    assert r.sync.counters.buffer_overflow == 7
    assert r.sync.counters.snapshots_too_old == 1 and r.sync.state is BookState.WAITING


def test_book_follows_diffs_and_drift_check():
    steps = [
        d(1, 10, 0, bids=[("100.0", "1")], asks=[("101.0", "2")]),
        s(12, bids=[("100.0", "1"), ("99.5", "3")], asks=[("101.0", "2")]),
        # unsorted levels, zero written as "0.000", a new level
        d(11, 20, 10, bids=[("99.5", "0.000"), ("100.5", "4"), ("98", "1")], asks=[]),
    ]
    r = run(steps, track_book=True)
    book = r.sync.book
    assert book.bids == {"100.0": "1", "100.5": "4", "98": "1"}
    assert book.top(2) == ([("100.5", "4"), ("100.0", "1")], [("101.0", "2")])
    good = s(20, bids=[("98", "1.0"), ("100.5", "4"), ("100.0", "1")], asks=[("101.0", "2")])
    assert r.sync.on_snapshot(attrs.evolve(good, source=SnapshotSource.POLL)).gaps == ()
    bad = s(20, bids=[("100.5", "5")], asks=[("101.0", "2")], source=SnapshotSource.POLL)
    r.sync.on_snapshot(bad)
    other_id = s(21, bids=[("1", "1")], source=SnapshotSource.POLL)
    r.sync.on_snapshot(other_id)
    assert (r.sync.counters.drift_checks, r.sync.counters.drift) == (2, 1)


@pytest.mark.parametrize(
    ("qty", "zero"), [("0", True), ("0.000", True), ("0.", True), ("10", False), ("0.010", False)]
)
def test_zero_quantity(qty, zero):
    assert is_zero(qty) is zero


def test_orderbook_reset_skips_zero_and_detects_cross():
    book = OrderBook()
    book.reset([["10", "1"], ["9", "0"]], [["11", "1"]], 5)
    assert book.bids == {"10": "1"} and not book.crossed()
    book.apply([["12", "1"]], [], 6)
    assert book.crossed() and book.last_update_id == 6


def test_the_live_collector_marks_where_each_symbol_starts():
    """`mark_start` (the live collector): the first diff of a symbol also gives one START
    row, first_id_after = its first id; it is no break and asks for nothing, and later
    diffs give none (the hook replaces itself). A restart's downtime shows there."""
    sync = BookSync("binance", "futures", "BTCUSDT", RULES, mark_start=True)
    first = sync.on_diff(d(11, 20, 10))
    (start,) = (g for g in first.gaps if g.kind is GapKind.START)
    assert (start.last_good_id, start.first_id_after) == (None, 11)
    assert (start.start_time, start.end_time) == (None, 200)
    assert first.record and sync.counters.breaks == 0
    assert all(GapKind.START not in {g.kind for g in sync.on_diff(x).gaps}
               for x in (d(21, 30, 20), d(41, 50, 40)))  # fmt: skip
    assert sync.counters.breaks == 1  # the 30 -> 41 break, as without the mark
    plain = BookSync("binance", "futures", "BTCUSDT", RULES)
    assert plain.on_diff(d(11, 20, 10)).gaps == ()


def test_start_mark_keeps_the_okx_checksum_check():
    """OKX's checksum check is an instance hook too; the start hook runs it, once."""
    from cryptoflow.exchanges.okx.rules import RULES as OKX

    sync = BookSync("okx", "futures", "BTCUSDT", OKX, mark_start=True)
    snap = d(5, 5, None, bids=[("1", "1")], asks=[("2", "1")], snap=True)
    first = sync.on_diff(attrs.evolve(snap, exchange="okx", checksum=123))  # a wrong one
    assert sorted(g.kind for g in first.gaps) == [GapKind.CHECKSUM, GapKind.START]
