"""verify: clean data passes, recorded gaps are known, injected faults are problems."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from datagen import (
    bybit_restart,
    delta_rows,
    generate,
    ms,
    okx_reset_revisiting_ids,
    snapshot_rows,
    write,
)

from cryptoflow.errors import DataError
from cryptoflow.models import Dataset
from cryptoflow.tools import verify


def test_clean_data_with_recorded_gap_passes(tmp_path: Path, capsys) -> None:
    generate(tmp_path, minutes=20, gap_at_s=300)
    assert verify.run(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "known gap" in out and "OK" in out


def test_unrecorded_break_and_unsorted_snapshot(tmp_path: Path, capsys) -> None:
    generate(tmp_path, minutes=5)
    t = 1767314000000  # 2026-01-02T00:33:20Z, inside the generated range
    write(tmp_path, Dataset.DELTAS, delta_rows(t, 900_001, 900_002, 900_000, [("bid", 99.0, 1.0)]))
    bad = snapshot_rows(t, 900_002, [(99.0, 1.0), (99.5, 1.0)], [(100.5, 1.0), (100.4, 2.0)])
    write(tmp_path, Dataset.SNAPSHOTS, bad)
    assert verify.run(str(tmp_path), exchange="binance", symbol="BTCUSDT") == 1
    out = capsys.readouterr().out
    assert "continuity break" in out and "unsorted snapshot" in out


def test_crossed_and_negative(tmp_path: Path, capsys) -> None:
    rows = snapshot_rows(1767314000000, 5, [(101.0, 1.0)], [(100.0, -1.0)])
    write(tmp_path, Dataset.SNAPSHOTS, rows)
    assert verify.run(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "crossed book" in out and "negative value" in out


def test_corrupt_file_is_a_problem(tmp_path: Path, capsys) -> None:
    g = generate(tmp_path, minutes=3)
    folder = g.files[0].parent
    (folder / "BTCUSDT-1-2-3-4.parquet").write_bytes(b"not parquet at all")
    assert verify.run(str(tmp_path)) == 1
    assert "unreadable file" in capsys.readouterr().out


def test_empty_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no snapshots or deltas"):
        verify.run(str(tmp_path))
    with pytest.raises(DataError, match="no such folder"):
        verify.run(str(tmp_path / "missing"))


# --- arrival order and in-stream snapshots (ids can go backwards) ---------------------

T0 = ms("2026-11-28T04:00:00Z")


def test_bybit_id_restart_is_not_a_break(tmp_path: Path, capsys) -> None:
    """Was: sorted by id, the deltas after Bybit's `u == 1` restart (2..4) came before
    5001..5004 and verify reported a continuity break in a complete recording."""
    bybit_restart(tmp_path, T0)
    assert verify.run(str(tmp_path)) == 0, capsys.readouterr().out
    # a lost delta before the restart is still a (known) break, nothing else
    bybit_restart(tmp_path / "lost", T0, lose=5003)
    assert verify.run(str(tmp_path / "lost")) == 0
    out = capsys.readouterr().out
    assert "known gap (sequence_break)" in out and "after update 5002" in out
    assert out.count("after update") == 1


def test_mid_stream_snapshot_restarts_the_chain(tmp_path: Path, capsys) -> None:
    """Bybit/OKX resend a snapshot mid-stream; the next delta continues it (was: a false
    continuity break against the delta before the snapshot)."""
    kw: dict = dict(exchange="bybit")
    book = ([(100.0, 1.0)], [(101.0, 1.0)])
    snaps = snapshot_rows(T0, 5000, *book, source="stream", **kw)
    snaps += snapshot_rows(T0 + 400, 5004, *book, source="stream", **kw)
    write(tmp_path, Dataset.SNAPSHOTS, snaps)
    deltas = []
    for u in (5001, 5002, 5003, 5005, 5006):
        deltas += delta_rows(T0 + 100 * (u - 5000), u, u, u - 1, [("bid", 100.0, 2.0)], **kw)
    write(tmp_path, Dataset.DELTAS, deltas)
    assert verify.run(str(tmp_path)) == 0, capsys.readouterr().out
    # a delta that does not continue the snapshot is still a break
    write(tmp_path, Dataset.DELTAS, delta_rows(T0 + 450, 5008, 5008, 5007, [("bid", 99.0, 1.0)],
                                               **kw))  # fmt: skip
    assert verify.run(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "continuity break" in out and "after update 5004" in out and "prev 5007" in out


def test_okx_seq_id_going_backwards_is_checked_in_arrival_order(tmp_path: Path, capsys) -> None:
    """OKX `seqId` may go backwards after maintenance, `prevSeqId` still matching: fine
    in arrival order (was: sorted by id, 3 and 8 came first and two breaks were reported)."""
    kw: dict = dict(exchange="okx")
    snap = snapshot_rows(T0, 100, [(100.0, 1.0)], [(101.0, 1.0)], source="stream", **kw)
    write(tmp_path, Dataset.SNAPSHOTS, snap)
    deltas = delta_rows(T0 + 100, 101, 105, 100, [("bid", 100.0, 2.0)], **kw)
    # okx.rules.diff_ids: seqId <= prevSeqId gives first = last = seqId
    deltas += delta_rows(T0 + 200, 3, 3, 105, [("bid", 100.0, 3.0)], **kw)
    deltas += delta_rows(T0 + 300, 4, 8, 3, [("bid", 100.0, 4.0)], **kw)
    write(tmp_path, Dataset.DELTAS, deltas)
    assert verify.run(str(tmp_path)) == 0, capsys.readouterr().out


def test_okx_reset_to_ids_already_used_starts_a_new_chain(tmp_path: Path, capsys) -> None:
    """A reset (continues, lower id) whose new ids run through values the chain already
    used: update 110 is stored as 101..110 before it and 106..110 after. Was: two
    "conflicting message" problems on a complete stream (chains split only at in-stream
    snapshots)."""
    okx_reset_revisiting_ids(tmp_path, T0)
    assert verify.run(str(tmp_path)) == 0, capsys.readouterr().out
    # within one chain the same id with two ranges is still a problem (and a break)
    kw: dict = dict(exchange="okx")
    write(tmp_path, Dataset.DELTAS, delta_rows(T0 + 900, 108, 110, 107, [("bid", 99.0, 1.0)],
                                               **kw))  # fmt: skip
    assert verify.run(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "update 110 stored as 108..110 prev 107" in out
    assert "update 110 stored as 106..110 prev 105" in out
    assert "101..110" not in out  # the chain before the reset is not compared


@pytest.mark.parametrize("continues", [True, False], ids=["delta-continues", "delta-before"])
def test_snapshot_and_a_delta_received_in_the_same_microsecond(tmp_path: Path, continues) -> None:
    """At equal receive times the in-stream snapshot goes first only before the delta
    that continues it: the last delta before a restart and the first after it can share
    the snapshot's microsecond."""
    kw: dict = dict(exchange="bybit")
    t = T0 * 1000 + 7
    snap = snapshot_rows(T0, 1, [(100.0, 1.0)], [(101.0, 1.0)], source="stream", receive_us=t, **kw)
    write(tmp_path, Dataset.SNAPSHOTS, snap)
    deltas = delta_rows(T0 - 100, 4999, 4999, 4998, [("bid", 100.0, 2.0)], **kw)
    deltas += delta_rows(T0 - 50, 5000, 5000, 4999, [("bid", 100.0, 2.0)],
                         receive_us=t + (0 if not continues else -1), **kw)  # fmt: skip
    deltas += delta_rows(T0 + 1, 2, 2, 1, [("bid", 100.0, 3.0)],
                         receive_us=t + (0 if continues else 1), **kw)  # fmt: skip
    write(tmp_path, Dataset.DELTAS, deltas)
    assert verify.run(str(tmp_path)) == 0


# --- rows stored twice ----------------------------------------------------------------

MARKER = [(None, None, None)]  # the one row of a message that changed no level


def test_rows_stored_twice_inside_one_file(tmp_path: Path, capsys) -> None:
    """Was: only a message found in more than one file was flagged."""
    g = generate(tmp_path, minutes=3)
    path = next(p for p in g.files if "/deltas/" in str(p))
    df = pl.read_parquet(path)
    first = df.row(0, named=True)
    one_msg = df.filter(pl.col("last_update_id") == first["last_update_id"]).head(1)
    pl.concat([df, one_msg]).write_parquet(path)
    assert verify.run(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "duplicate rows" in out and "1 row(s) repeating a (side, price) in one file" in out
    assert f"..{first['last_update_id']} at" in out


def test_marker_rows_are_not_duplicates(tmp_path: Path, capsys) -> None:
    """A message that changes no level is stored as one row with side, price and
    quantity null; OKX heartbeats repeat the same ids (seqId == prevSeqId) at other
    times: none of that is a duplicate or a break."""
    kw: dict = dict(exchange="okx")
    snap = snapshot_rows(T0, 100, [(100.0, 1.0)], [(101.0, 1.0)], source="stream", **kw)
    write(tmp_path, Dataset.SNAPSHOTS, snap)
    write(tmp_path, Dataset.DELTAS, delta_rows(T0 + 100, 101, 105, 100, [("bid", 100.0, 2.0)],
                                               **kw))  # fmt: skip
    for i in range(1, 3):  # each heartbeat in its own file
        write(tmp_path, Dataset.DELTAS, delta_rows(T0 + 100 + 1000 * i, 105, 105, 105, MARKER,
                                                   **kw))  # fmt: skip
    write(tmp_path, Dataset.DELTAS, delta_rows(T0 + 5000, 106, 107, 105, [("ask", 101.0, 0.0)],
                                               **kw))  # fmt: skip
    assert verify.run(str(tmp_path)) == 0, capsys.readouterr().out
    # the same marker stored in two files is a duplicate, though
    write(tmp_path / "x", Dataset.DELTAS, delta_rows(T0 + 1100, 105, 105, 105, MARKER, **kw))
    copy = next((tmp_path / "x").rglob("*.parquet"))
    copy.rename(next((tmp_path / "deltas").rglob("*.parquet")).parent / ("x" + copy.name))
    assert verify.run(str(tmp_path)) == 1
    assert "stored in 2 files" in capsys.readouterr().out


def test_a_restart_start_row_is_listed_and_explains_only_its_own_break(tmp_path, capsys) -> None:
    """The live collector writes a `start` row per symbol where it began. Two runs of a
    Bybit-like stream: the second starts with an in-stream snapshot (a chain restart, no
    break), so only its start row shows the downtime; a Binance-like restart is a break
    the start row explains; an earlier run's lost message is not explained by it."""
    from datagen import gap_rows

    t0 = ms("2026-01-02T00:30:00Z")
    # Bybit-like: snapshot 100, deltas 101..103; restart: snapshot 200, deltas 201..202
    kw: dict = dict(exchange="bybit", source="stream")
    write(tmp_path, Dataset.SNAPSHOTS,
          snapshot_rows(t0, 100, [(99.0, 1.0)], [(101.0, 1.0)], **kw)
          + snapshot_rows(t0 + 60_000, 200, [(99.0, 2.0)], [(101.0, 2.0)], **kw))  # fmt: skip
    deltas: list[dict] = []
    for u in (101, 102, 103):
        deltas += delta_rows(t0 + u, u, u, u - 1, [("bid", 99.0, 3.0)], exchange="bybit")
    for u in (201, 202):
        deltas += delta_rows(t0 + 60_000 + u, u, u, u - 1, [("bid", 99.0, 4.0)], exchange="bybit")
    write(tmp_path, Dataset.DELTAS, deltas)
    write(tmp_path, Dataset.GAPS,
          gap_rows("start", None, 100, None, t0, exchange="bybit")
          + gap_rows("start", None, 200, None, t0 + 60_000, exchange="bybit"))  # fmt: skip
    assert verify.run(str(tmp_path), exchange="bybit") == 0
    out = capsys.readouterr().out
    assert out.count("recording (re)started") == 2 and "first update 200" in out

    # Binance-like: run 1 stores 1..3 and loses 5 (4 -> 6); run 2 starts at 20
    b = tmp_path / "binance"
    rows: list[dict] = []
    for u, prev in ((1, 0), (2, 1), (3, 2), (4, 3), (6, 5), (20, 19), (21, 20)):
        rows += delta_rows(t0 + u * 1000, u, u, prev, [("bid", 99.0, 1.0)])
    write(b, Dataset.DELTAS, rows)
    write(b, Dataset.GAPS, gap_rows("start", None, 1, None, t0 + 1000)
          + gap_rows("start", None, 20, None, t0 + 20_000))  # fmt: skip
    assert verify.run(str(b)) == 1
    out = capsys.readouterr().out
    assert "known gap (start)" in out  # 6 -> 20: the restart
    assert "continuity break" in out and "after update 4" in out  # the lost 5: a problem


def test_a_gap_row_explains_only_the_break_it_contains(tmp_path: Path, capsys) -> None:
    """A `sequence_break` row 3 -> 5 (update 4 lost upstream) explains the stored break
    3 -> 5; when the files from 5 on are lost too, the stored break 3 -> 10 reaches past
    the row's first id after (5): updates 5..9 are missing and no row says so. An
    overlapping row explained it (found by an audit deleting files after a gap)."""
    from datagen import gap_rows

    t0 = ms("2026-01-02T00:30:00Z")

    def stored(ids: list[tuple[int, int]]) -> list[dict]:
        rows: list[dict] = []
        for u, prev in ids:
            rows += delta_rows(t0 + u * 1000, u, u, prev, [("bid", 99.0, float(u))])
        return rows

    gap = gap_rows("sequence_break", 3, 5, t0 + 3000, t0 + 5000)
    ok = tmp_path / "ok"
    write(ok, Dataset.DELTAS, stored([(1, 0), (2, 1), (3, 2), (5, 4), (6, 5)]))
    write(ok, Dataset.GAPS, gap)
    assert verify.run(str(ok)) == 0
    assert "known gap (sequence_break)" in capsys.readouterr().out

    lost = tmp_path / "lost"
    write(lost, Dataset.DELTAS, stored([(1, 0), (2, 1), (3, 2), (10, 9), (11, 10)]))
    write(lost, Dataset.GAPS, gap)
    assert verify.run(str(lost)) == 1
    out = capsys.readouterr().out
    assert "continuity break" in out and "after update 3" in out and "prev 9" in out
    assert "known gap" not in out


def test_an_out_of_order_gap_row_explains_both_breaks(tmp_path: Path, capsys) -> None:
    """book/sync.py records a late diff as one row spanning it up to the newest id seen
    (last_good_id = its prev, first_id_after = the newest id): stored 1, 2, 4, late 3,
    then 5 gives three breaks (2 -> 4, 4 -> 3 and 3 -> 5), all inside that row (the first
    one's own row, 2 -> 4, is the same)."""
    from datagen import gap_rows

    t0 = ms("2026-01-02T00:30:00Z")
    rows: list[dict] = []
    for i, (u, prev) in enumerate(((1, 0), (2, 1), (4, 3), (3, 2), (5, 4))):
        rows += delta_rows(t0 + i * 1000, u, u, prev, [("bid", 99.0, float(u))])
    write(tmp_path, Dataset.DELTAS, rows)
    write(tmp_path, Dataset.GAPS, gap_rows("sequence_break", 2, 4, t0 + 2000, t0 + 3000))
    assert verify.run(str(tmp_path)) == 0
    assert capsys.readouterr().out.count("known gap (sequence_break)") == 3


def test_an_unreadable_gaps_file_is_a_problem(tmp_path: Path, capsys) -> None:
    """A gaps file that cannot be read was dropped without a word: verify then judged the
    stream without its gap rows (here the break one of them explains becomes a
    problem, but a lost row can as well hide why a break is known)."""
    generate(tmp_path, minutes=10, gap_at_s=125)
    gaps_file = next((tmp_path / "gaps").rglob("*.parquet"))
    gaps_file.write_bytes(gaps_file.read_bytes()[:100])
    assert verify.run(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "unreadable file" in out and gaps_file.name[:20] in out
