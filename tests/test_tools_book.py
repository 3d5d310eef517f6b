"""book: hand-computed book, refusal on gaps and breaks, --at before any snapshot, outputs."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from datagen import (
    bybit_restart,
    delta_rows,
    gap_rows,
    generate,
    ms,
    okx_reset_revisiting_ids,
    snapshot_rows,
    write,
)
from paths import RECORDED
from rich.console import Console
from typer.testing import CliRunner

from cryptoflow.cli import app as cli_app
from cryptoflow.errors import DataError, UsageError
from cryptoflow.models import Dataset
from cryptoflow.tools import book, replay

T = ms("2026-01-02T03:04:00Z")
SUSHI_AKRO = RECORDED / "binance" / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"
BYBIT1 = RECORDED / "bybit" / "linear_orderbook1_BAND_RAD_SNT_AIOZ_2025-06-13.jsonl"
BYBIT500 = RECORDED / "bybit" / "linear_orderbook500_XRPUSDT_2024-12-01.jsonl"
OKX_XMR = RECORDED / "okx" / "swap_books-l2-tbt_XMR-USDT-SWAP_2021-07-22.jsonl"


def _hand_data(root: Path) -> None:
    write(root, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0), (9.0, 2.0)],
                                                 [(11.0, 3.0), (12.0, 4.0)]))  # fmt: skip
    write(root, Dataset.DELTAS, delta_rows(T - 50, 95, 99, 94, [("bid", 10.0, 7.0)]))  # old
    write(root, Dataset.DELTAS, delta_rows(T + 100, 99, 101, 98, [("bid", 10.5, 5.0)]))
    write(root, Dataset.DELTAS, delta_rows(T + 200, 102, 102, 101, [("ask", 11.0, 0.0),
                                                                   ("bid", 9.0, 2.5)]))  # fmt: skip
    write(root, Dataset.DELTAS, delta_rows(T + 300, 103, 104, 102, [("ask", 10.8, 1.0)]))


def test_book_equals_hand_computed(tmp_path: Path) -> None:
    _hand_data(tmp_path)
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", T + 250)
    assert facts["snapshot_id"] == 100 and facts["last_update_id"] == 102
    bids = df.filter(pl.col("side") == "bid").select("price", "quantity").rows()
    asks = df.filter(pl.col("side") == "ask").select("price", "quantity").rows()
    assert bids == [(10.5, 5.0), (10.0, 1.0), (9.0, 2.5)]
    assert asks == [(12.0, 4.0)]


def test_book_outputs(tmp_path: Path, capsys) -> None:
    _hand_data(tmp_path / "d")
    at = "2026-01-02T03:04:00.400Z"
    assert book.run(str(tmp_path / "d"), "binance", "btcusdt", at, depth=2) == 0
    assert "10.8" in capsys.readouterr().out
    out = tmp_path / "b.parquet"
    assert book.run(str(tmp_path / "d"), "binance", "BTCUSDT", str(T + 400), 1, out) == 0
    df = pl.read_parquet(out)
    assert df.select("side", "price").rows() == [("bid", 10.5), ("ask", 10.8)]
    csv = tmp_path / "b.csv"
    assert book.run(str(tmp_path / "d"), "binance", "BTCUSDT", at, 5, csv) == 0
    assert pl.read_csv(csv).height == 5
    with pytest.raises(UsageError):
        book.run(str(tmp_path / "d"), "binance", "BTCUSDT", at, 5, tmp_path / "b.txt")
    with pytest.raises(UsageError):
        book.run(str(tmp_path / "d"), "binance", "BTCUSDT", "yesterday")


def test_an_output_that_cannot_be_written_is_refused_before_the_rebuild(
    tmp_path: Path, monkeypatch
) -> None:
    """Found by the CLI audit: `--output afile/x.csv` (afile a file) gave `error: [Errno
    17] File exists: 'afile'`, exit 1, after the whole rebuild. Now one line, exit 2,
    before any data is read."""
    _hand_data(tmp_path / "d")
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "folder.csv").mkdir()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt before the output was checked")

    monkeypatch.setattr(book, "rebuild", no_rebuild)
    base = ["book", str(tmp_path / "d"), "-e", "binance", "-s", "BTCUSDT", "--at", str(T + 400)]
    for out, why in (
        (afile / "x.csv", f"cannot write in {str(afile)!r}: Not a directory"),
        (tmp_path / "folder.csv", "is a directory, expected a file to write"),
    ):
        res = CliRunner().invoke(cli_app, [*base, "--output", str(out)])
        assert res.exit_code == 2, res.output
        assert res.output == f"error: --output {str(out)!r}: {why}\n"
    assert afile.read_text() == "x"
    monkeypatch.undo()
    out = tmp_path / "new" / "sub" / "b.csv"  # a folder still to make is fine
    res = CliRunner().invoke(cli_app, [*base, "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert pl.read_csv(out).height == 5


def test_at_before_any_snapshot(tmp_path: Path) -> None:
    _hand_data(tmp_path)
    with pytest.raises(DataError, match="before"):
        book.run(str(tmp_path), "binance", "BTCUSDT", str(T - 1))
    with pytest.raises(DataError, match="no snapshots"):
        book.run(str(tmp_path), "binance", "BTCUSDT", str(T - 7_200_000))


def test_at_long_after_the_data_is_refused(tmp_path: Path) -> None:
    """A moment the collector did not record: a book from the last snapshot plus the
    last deltas would be printed as if it were the book then (silently wrong)."""
    _hand_data(tmp_path)
    last = T + 300  # the last stored update
    df, _ = book.rebuild(tmp_path, "binance", "BTCUSDT", last + book.NO_DATA_AFTER_MS)
    assert df.height
    with pytest.raises(DataError, match=r"no data near .* 60 s earlier"):
        book.rebuild(tmp_path, "binance", "BTCUSDT", last + book.NO_DATA_AFTER_MS + 1)
    with pytest.raises(DataError, match="no data near"):
        book.run(str(tmp_path), "binance", "BTCUSDT", "2030-01-01T00:00:00Z")


def test_refuses_gap_between(tmp_path: Path) -> None:
    g = generate(tmp_path, minutes=10, gap_at_s=125)
    _, first_after, _start, end = g.gap
    with pytest.raises(DataError, match="gap"):
        book.run(str(tmp_path), "binance", "BTCUSDT", str(end + 100))
    # after the next snapshot the book is trusted again and matches the simulation
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", end + 10_000)
    true_bids, true_asks = g.books[facts["last_update_id"]]
    got = dict(df.filter(pl.col("side") == "bid").select("price", "quantity").rows())
    assert facts["snapshot_id"] > first_after
    assert {p: q for p, q in got.items()} == {
        p: q for p, q in sorted(true_bids.items(), reverse=True)[: len(got)]
    }
    assert len(true_asks) > 0


def test_snapshot_just_before_the_first_id_after_a_gap_heals_it(tmp_path: Path) -> None:
    """A sequence break lost 101..104 (row: good up to 100, not trustworthy until 105, as
    book/sync.py writes it). A snapshot at 104 holds all of them and the stored message
    105..106 continues it exactly. Was: refused (`first_id_after > L`, off by one)."""
    snaps = snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)])
    snaps += snapshot_rows(T + 500, 104, [(10.0, 4.0)], [(11.0, 1.0)])
    write(tmp_path, Dataset.SNAPSHOTS, snaps)
    write(tmp_path, Dataset.DELTAS, delta_rows(T + 600, 105, 106, 104, [("ask", 11.0, 6.0)]))
    write(tmp_path, Dataset.GAPS, gap_rows("sequence_break", 100, 105, T, T + 600))
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", T + 700)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (104, 1, 106)
    assert _sides(df) == ({10.0: 4.0}, {11.0: 6.0})
    # one id lower the gap's update 104 is not in the snapshot: refused
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T + 550, 103, [(10.0, 3.0)], [(11.0, 1.0)]))
    with pytest.raises(DataError, match="refusing: a sequence_break gap"):
        book.rebuild(tmp_path, "binance", "BTCUSDT", T + 700)


def test_refusal_over_a_start_row_names_its_first_update(tmp_path: Path) -> None:
    """A `start` row (where a collector run began) has no last_good_id: the refusal said
    "updates None..105"."""
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    write(tmp_path, Dataset.DELTAS, delta_rows(T + 100, 105, 106, 104, [("ask", 11.0, 6.0)]))
    start = gap_rows("start", None, 105, None, T + 100)
    write(tmp_path, Dataset.GAPS, start)
    with pytest.raises(DataError) as e:
        book.rebuild(tmp_path, "binance", "BTCUSDT", T + 200)
    assert str(e.value).startswith(
        "refusing: a start gap (before update 105, 2026-01-02T03:04:00.100Z .. "
        "2026-01-02T03:04:00.100Z) is not healed by the snapshot 100"
    )


def test_generated_book_matches_simulation(tmp_path: Path) -> None:
    g = generate(tmp_path, minutes=3, levels=30)
    ts, _ = g.snapshots[3]
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", ts + 4_700)
    assert facts["messages"] > 0
    _true_bids, true_asks = g.books[facts["last_update_id"]]
    asks = dict(df.filter(pl.col("side") == "ask").select("price", "quantity").rows())
    assert asks == true_asks


def test_refuses_unrecorded_break(tmp_path: Path) -> None:
    _hand_data(tmp_path)
    write(tmp_path, Dataset.DELTAS, delta_rows(T + 500, 110, 111, 109, [("bid", 1.0, 1.0)]))
    with pytest.raises(DataError, match="continuity break"):
        book.run(str(tmp_path), "binance", "BTCUSDT", str(T + 600))
    write(tmp_path, Dataset.GAPS, gap_rows("reconnect", 104, 110, T + 300, T + 500))
    with pytest.raises(DataError, match="refusing: a reconnect gap"):
        book.run(str(tmp_path), "binance", "BTCUSDT", str(T + 600))


# --- arrival order: ids can go backwards --------------------------------------------

T0 = ms("2026-11-28T04:00:00Z")


def _sides(df: pl.DataFrame) -> tuple[dict, dict]:
    bids = dict(df.filter(pl.col("side") == "bid").select("price", "quantity").rows())
    asks = dict(df.filter(pl.col("side") == "ask").select("price", "quantity").rows())
    return bids, asks


def test_book_after_a_bybit_id_restart(tmp_path: Path) -> None:
    """Was: after Bybit's `u == 1` restart every pre-restart delta has a higher id than
    the new snapshot, so they were selected too and the book was refused (or wrong)."""
    bybit_restart(tmp_path, T0)
    df, facts = book.rebuild(tmp_path, "bybit", "BTCUSDT", T0 + 1350)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (1, 3, 4)
    assert _sides(df) == ({100.0: 7.0, 98.0: 3.0}, {101.0: 22.0})
    df, facts = book.rebuild(tmp_path, "bybit", "BTCUSDT", T0 + 450)  # before the restart
    assert (facts["snapshot_id"], facts["last_update_id"]) == (5000, 5004)
    assert _sides(df) == ({100.0: 13.0, 99.0: 2.0}, {101.0: 1.0, 102.0: 2.0})


def test_gap_before_an_id_restart_does_not_refuse_the_book_after_it(tmp_path: Path) -> None:
    bybit_restart(tmp_path, T0, lose=5003)
    with pytest.raises(DataError, match="refusing: a sequence_break gap"):
        book.rebuild(tmp_path, "bybit", "BTCUSDT", T0 + 450)
    # its ids (5002..5004) are above the new snapshot's 1, but the restart healed it
    df, _ = book.rebuild(tmp_path, "bybit", "BTCUSDT", T0 + 1350)
    assert _sides(df) == ({100.0: 7.0, 98.0: 3.0}, {101.0: 22.0})


def _restart_an_hour_back(root: Path, exchange: str) -> int:
    """The old chain (snapshot 5000 at 04:20; 5003 lost: a gap record), the restart at
    04:30 (Bybit: an in-stream snapshot `u == 1`; OKX: a reset, seqId 1 with prevSeqId
    5004), one delta every 10 s (bid 100 -> id) and a poll at 05:10:05 (id 241), in the
    next hour. Returns the poll's time."""
    kw: dict = dict(exchange=exchange)
    t0, s = ms("2026-11-28T04:20:00Z"), ms("2026-11-28T04:30:00Z")
    source = "stream" if exchange == "bybit" else "poll"
    snaps = snapshot_rows(t0, 5000, [(100.0, 1.0)], [(101.0, 1.0)], source=source, **kw)
    deltas = [
        r
        for u in (5001, 5002, 5004)
        for r in delta_rows(t0 + 100 * (u - 5000), u, u, u - 1, [("bid", 100.0, 9.0)], **kw)
    ]
    if exchange == "bybit":
        snaps += snapshot_rows(s, 1, [(100.0, 1.0)], [(101.0, 4.0)], source="stream", **kw)
    else:
        deltas += delta_rows(s, 1, 1, 5004, [("ask", 101.0, 4.0)], **kw)
    poll = ms("2026-11-28T05:10:05Z")
    snaps += snapshot_rows(poll, 241, [(100.0, 241.0)], [(101.0, 4.0)], **kw)
    write(root, Dataset.SNAPSHOTS, snaps)
    deltas += [r for u in range(2, 300)
               for r in delta_rows(s + 10_000 * (u - 1), u, u, u - 1, [("bid", 100.0, float(u))],
                                   **kw)]  # fmt: skip
    write(root, Dataset.DELTAS, deltas)
    write(root, Dataset.GAPS, gap_rows("sequence_break", 5002, 5004, t0 + 200, t0 + 400, **kw))
    return poll


@pytest.mark.parametrize("exchange", ["bybit", "okx"])
def test_restart_an_hour_before_the_snapshot_heals_older_gaps(tmp_path: Path, exchange) -> None:
    """Was: only the chosen snapshot's hour was searched for the in-stream snapshot that
    began its chain (and a reset was no restart at all), so a gap of the chain before a
    restart in an earlier hour (ids 5002..5004, above the new 241) refused every book
    after it, with a message that said the gap lay between the snapshot and AT."""
    poll = _restart_an_hour_back(tmp_path, exchange)
    df, facts = book.rebuild(tmp_path, exchange, "BTCUSDT", poll + 25_000)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (241, 3, 244)
    assert _sides(df) == ({100.0: 244.0}, {101.0: 4.0})
    # a gap detected after the restart is not healed by it
    gap = gap_rows("sequence_break", 240, 243, poll - 6000, poll + 5000, exchange=exchange)
    gap[0]["detected_at"] = (poll - 1000) * 1000  # before the poll was received
    write(tmp_path, Dataset.GAPS, gap)
    with pytest.raises(DataError) as e:
        book.rebuild(tmp_path, exchange, "BTCUSDT", poll + 25_000)
    assert str(e.value) == (
        "refusing: a sequence_break gap (updates 240..243, 2026-11-28T05:09:59.000Z .. "
        "2026-11-28T05:10:10.000Z) is not healed by the snapshot 241 at "
        "2026-11-28T05:10:05.000Z, the last before 2026-11-28T05:10:30.000Z: the updates "
        "between it and 243 are not trustworthy"
    )


def test_okx_seq_id_going_backwards_is_applied(tmp_path: Path) -> None:
    """OKX `seqId` may go backwards after maintenance (prevSeqId still matching). Was:
    only ids above the snapshot's were taken, so the book silently stopped at 105."""
    kw: dict = dict(exchange="okx")
    snap = snapshot_rows(T0, 100, [(100.0, 1.0)], [(101.0, 1.0)], **kw)  # a REST poll
    write(tmp_path, Dataset.SNAPSHOTS, snap)
    deltas = delta_rows(T0 + 100, 101, 105, 100, [("bid", 100.0, 2.0)], **kw)
    deltas += delta_rows(T0 + 200, 3, 3, 105, [("bid", 100.0, 3.0)], **kw)
    deltas += delta_rows(T0 + 300, 4, 8, 3, [("bid", 99.0, 4.0)], **kw)
    write(tmp_path, Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 400)
    assert (facts["messages"], facts["last_update_id"]) == (3, 8)
    assert _sides(df) == ({100.0: 3.0, 99.0: 4.0}, {101.0: 1.0})


def test_okx_poll_without_seq_id_is_passed_over(tmp_path: Path) -> None:
    """An OKX poll whose body had no seqId is stored with last_update_id -1 (NO_SEQ_ID):
    nothing can continue it. Was: chosen as the latest snapshot, then the book refused
    ("deltas do not continue snapshot -1"); now the latest one with an id anchors it."""
    kw: dict = dict(exchange="okx")
    snaps = snapshot_rows(T0, 100, [(100.0, 1.0)], [(101.0, 1.0)], **kw)
    snaps += snapshot_rows(T0 + 300, -1, [(100.0, 9.0)], [(101.0, 9.0)], **kw)
    write(tmp_path, Dataset.SNAPSHOTS, snaps)
    deltas = delta_rows(T0 + 100, 101, 105, 100, [("bid", 100.0, 2.0)], **kw)
    deltas += delta_rows(T0 + 400, 106, 108, 105, [("ask", 101.0, 3.0)], **kw)
    write(tmp_path, Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 500)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (100, 2, 108)
    assert _sides(df) == ({100.0: 2.0}, {101.0: 3.0})
    only = tmp_path / "only"  # nothing but polls without an id: said so
    write(only, Dataset.SNAPSHOTS, snapshot_rows(T0, -1, [(100.0, 9.0)], [(101.0, 9.0)], **kw))
    with pytest.raises(DataError, match="the 1 stored before it have no update id"):
        book.rebuild(only, "okx", "BTCUSDT", T0 + 500)


def _okx_reset_then_poll(root: Path, poll_ts: int, poll_id: int, poll_recv_us: int) -> None:
    """OKX, no in-stream snapshot: a poll at 100, updates 101..104 and 105, the reset
    (seqId 3, prevSeqId 105) at T0 + 200, 4..8, 9..10; and a second poll as given."""
    kw: dict = dict(exchange="okx")
    snaps = snapshot_rows(T0, 100, [(100.0, 1.0)], [(101.0, 1.0)], **kw)
    snaps += snapshot_rows(poll_ts, poll_id, [(100.0, 3.0), (99.0, 4.0)], [(101.0, 1.0)],
                           receive_us=poll_recv_us, **kw)  # fmt: skip
    write(root, Dataset.SNAPSHOTS, snaps)
    deltas = delta_rows(T0 + 100, 101, 104, 100, [("bid", 100.0, 2.0)], **kw)
    deltas += delta_rows(T0 + 140, 105, 105, 104, [("bid", 98.0, 1.0)], **kw)
    deltas += delta_rows(T0 + 200, 3, 3, 105, [("bid", 100.0, 3.0)], **kw)
    deltas += delta_rows(T0 + 300, 4, 8, 3, [("bid", 99.0, 4.0)], **kw)
    deltas += delta_rows(T0 + 400, 9, 10, 8, [("ask", 101.0, 5.0)], **kw)
    write(root, Dataset.DELTAS, deltas)


def test_poll_after_an_okx_reset_takes_only_its_own_chain(tmp_path: Path) -> None:
    """A poll taken after the reset (seqId 8): the deltas received before it with ids
    above 8 are the old chain's (101..105). Was: they were taken as the first deltas after
    it and the book was refused ("the first stored message after it starts at update
    101"); now only messages from the reset on count."""
    _okx_reset_then_poll(tmp_path, T0 + 350, 8, (T0 + 355) * 1000)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 450)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (8, 1, 10)
    assert _sides(df) == ({100.0: 3.0, 99.0: 4.0}, {101.0: 5.0})
    # before that poll: the first one, through the reset
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 320)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (100, 4, 8)
    assert _sides(df) == ({100.0: 3.0, 99.0: 4.0, 98.0: 1.0}, {101.0: 1.0})
    # a gap recorded in the old chain (ids above 8) lies before the reset: it makes the
    # first poll's book unknown, not the second's
    write(tmp_path, Dataset.GAPS, gap_rows("checksum", 104, 105, T0 + 100, T0 + 140,
                                           exchange="okx"))  # fmt: skip
    with pytest.raises(DataError, match="refusing: a checksum gap"):
        book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 320)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 450)
    assert (facts["snapshot_id"], facts["last_update_id"]) == (8, 10)


def test_poll_whose_book_predates_an_okx_reset_is_not_moved_past_it(tmp_path: Path) -> None:
    """A poll at seqId 104 whose book (event time T0 + 120) is older than the reset
    (T0 + 200) but received after it (REST in flight across the reset). Taking only the
    messages from the reset on would skip 105 and every later update with an id up to 104
    as "already in the snapshot" and serve the bare poll; it belongs to the chain before
    the reset, so the stored ids show the break and the book is refused."""
    _okx_reset_then_poll(tmp_path, T0 + 120, 104, (T0 + 260) * 1000)
    with pytest.raises(DataError, match=r"continuity break .* after update 105"):
        book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 450)


def test_okx_reset_to_ids_already_used_is_applied(tmp_path: Path) -> None:
    """Was: refused ("update 110 is stored with conflicting id ranges") although the
    chain is continuous: the reset starts a new chain, where 110 may appear again."""
    okx_reset_revisiting_ids(tmp_path, T0)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 800)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (100, 6, 125)
    assert _sides(df) == ({100.0: 7.0}, {101.0: 1.0})


def test_rest_snapshot_straddled_by_a_diff_received_before_it(tmp_path: Path) -> None:
    """Binance: the diff containing L + 1 often arrives while the REST request is in
    flight, so deltas received before a REST snapshot still count when they reach past
    its id; older ones (inside the snapshot) are left out."""
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    recv = T * 1000 + 5000  # the snapshot's receive time
    deltas = delta_rows(T - 30, 90, 99, 89, [("bid", 10.0, 9.0)], receive_us=recv - 20_000)
    deltas += delta_rows(T - 10, 100, 102, 99, [("bid", 10.0, 2.0)], receive_us=recv - 1)
    deltas += delta_rows(T + 50, 103, 103, 102, [("ask", 11.0, 3.0)])
    write(tmp_path, Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", T + 100)
    assert (facts["messages"], facts["last_update_id"]) == (2, 103)
    assert _sides(df) == ({10.0: 2.0}, {11.0: 3.0})


def test_straddling_diff_with_an_event_time_in_the_previous_hour(tmp_path: Path) -> None:
    """The same straddle across an hour boundary: the diff's event time is in the hour
    before the snapshot's. Was: delta files were listed from the snapshot's hour, the
    diff was never read and the book refused ("deltas do not continue snapshot 100")."""
    s = ms("2026-11-28T05:00:00.010Z")
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(s, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    recv = s * 1000 + 5000  # the snapshot's receive time
    deltas = delta_rows(s - 15, 95, 102, 94, [("bid", 10.0, 2.0)], receive_us=recv - 3000)
    deltas += delta_rows(s + 90, 103, 105, 102, [("ask", 11.0, 3.0)])
    paths = write(tmp_path, Dataset.DELTAS, deltas)
    assert len({p.parent for p in paths}) == 2  # hour=04 and hour=05
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", s + 190)
    assert (facts["messages"], facts["last_update_id"]) == (2, 105)
    assert _sides(df) == ({10.0: 2.0}, {11.0: 3.0})


def test_snapshot_at_a_diffs_end_id_is_continued_by_prev_id(tmp_path: Path) -> None:
    """Binance futures ids jump between a symbol's diffs. A REST snapshot whose id L is a
    diff's `u` holds that diff; the next one has `pu == L` but `U` far above L + 1. Was:
    refused ("deltas do not continue snapshot 100"), though it continues L exactly."""
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    deltas = delta_rows(T - 2, 95, 100, 90, [("bid", 10.0, 1.0)])  # in the snapshot
    deltas += delta_rows(T + 50, 150, 160, 100, [("bid", 10.0, 2.0)])
    deltas += delta_rows(T + 150, 170, 171, 160, [("ask", 11.0, 3.0)])
    write(tmp_path, Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", T + 200)
    assert (facts["messages"], facts["last_update_id"]) == (2, 171)
    assert _sides(df) == ({10.0: 2.0}, {11.0: 3.0})
    # a first message that neither continues L by its prev nor holds L + 1 is still refused
    other = tmp_path / "other"
    write(other, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    write(other, Dataset.DELTAS, delta_rows(T + 50, 150, 160, 120, [("bid", 10.0, 2.0)]))
    with pytest.raises(DataError, match=r"deltas do not continue snapshot 100: .* update 150"):
        book.rebuild(other, "binance", "BTCUSDT", T + 200)


def test_okx_reset_right_after_a_poll_is_applied(tmp_path: Path) -> None:
    """An OKX reset whose prevSeqId is the poll's seqId continues it, though its own id
    (3) is lower. Was: left out with the rest of the new chain as "in the snapshot" up to
    the first id above the poll's, which was then applied as if it straddled it: a book
    silently missing every update in between."""
    kw: dict = dict(exchange="okx")
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T0, 105, [(100.0, 1.0)], [(101.0, 1.0)], **kw))
    deltas = delta_rows(T0 + 100, 3, 3, 105, [("bid", 99.0, 3.0)], **kw)
    deltas += delta_rows(T0 + 200, 4, 104, 3, [("bid", 98.0, 4.0)], **kw)
    deltas += delta_rows(T0 + 300, 105, 110, 104, [("ask", 101.0, 5.0)], **kw)
    write(tmp_path, Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 400)
    assert (facts["messages"], facts["last_update_id"]) == (3, 110)
    assert _sides(df) == ({100.0: 1.0, 99.0: 3.0, 98.0: 4.0}, {101.0: 5.0})


def _akro_reference(path: Path) -> tuple[int, list[tuple[int, dict, dict]]]:
    """Independent of the project: AKROUSDT's REST snapshot (id L, event time) and, for
    each of its diffs from L on (in arrival order, `pu` chained from L, stdlib json
    only), the event time and the full book after it."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    snap = next(r["msg"] for r in recs if r["channel"].endswith("symbol=AKROUSDT&limit=1000"))
    bids = {float(p): float(q) for p, q in snap["bids"]}
    asks = {float(p): float(q) for p, q in snap["asks"]}
    last, books = snap["lastUpdateId"], []
    for r in recs:
        d = r["msg"].get("data", {})
        if r["kind"] != "ws" or d["s"] != "AKROUSDT" or d["u"] <= snap["lastUpdateId"]:
            continue
        assert d["pu"] == last  # the recording has no break
        last = d["u"]
        for side, key in ((bids, "b"), (asks, "a")):
            for p, q in d[key]:
                side[float(p)] = float(q)
                if float(q) == 0:
                    del side[float(p)]
        books.append((d["E"], dict(bids), dict(asks)))
    return snap["E"], books


@pytest.mark.skipif(not SUSHI_AKRO.is_file(), reason="shared recordings not present")
def test_recorded_binance_book_on_a_diff_boundary(tmp_path: Path) -> None:
    """The AKROUSDT recording: its REST snapshot's id is the `u` of a diff, and the next
    diff starts far above it (`pu` == the snapshot's id). Was: `book` refused 187 of its
    189 event times; now the book at a diff's event time equals the recording's."""
    assert replay.run("binance", SUSHI_AKRO, tmp_path / "out") == 0
    snap_ts, books = _akro_reference(SUSHI_AKRO)
    assert len(books) > 150
    for ts, bids, asks in books[::4] + books[-1:]:  # every 4th: the test stays ~1 s
        df, facts = book.rebuild(tmp_path / "out", "binance", "AKROUSDT", max(ts, snap_ts))
        assert facts["snapshot_time"] == snap_ts
        assert _sides(df) == (bids, asks), ts


@pytest.mark.parametrize("exchange", ["bybit", "okx"])
def test_in_stream_snapshot_with_no_delta_before_at(tmp_path: Path, exchange: str) -> None:
    """No delta row between the chain's start and AT: a snapshot-only stream (Bybit
    `orderbook.1` sends nothing else: no deltas dataset at all), or AT at an in-stream
    snapshot's own time with its deltas after it. Was: `unexpected ColumnNotFoundError`
    (the empty deltas frame had no `rt` column); the snapshot is the book."""
    kw: dict = dict(exchange=exchange, source="stream")
    snaps = snapshot_rows(T0, 7, [(100.0, 1.0)], [(101.0, 2.0)], **kw)
    write(tmp_path / "only", Dataset.SNAPSHOTS, snaps)
    df, facts = book.rebuild(tmp_path / "only", exchange, "BTCUSDT", T0 + 500)
    assert (facts["snapshot_id"], facts["messages"], facts["last_update_id"]) == (7, 0, 7)
    assert _sides(df) == ({100.0: 1.0}, {101.0: 2.0})
    write(tmp_path / "later", Dataset.SNAPSHOTS, snaps)
    deltas = delta_rows(T0 + 100, 8, 8, 7, [("bid", 100.0, 5.0)], exchange=exchange)
    write(tmp_path / "later", Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path / "later", exchange, "BTCUSDT", T0)
    assert (facts["messages"], facts["last_update_id"]) == (0, 7)
    assert _sides(df) == ({100.0: 1.0}, {101.0: 2.0})
    assert book.run(str(tmp_path / "later"), exchange, "BTCUSDT", str(T0)) == 0


def _recorded_stream_snapshot(path: Path, symbol: str, at_ms: int, mult: str) -> tuple:
    """The recording's last in-stream snapshot of `symbol` at or before `at_ms` as
    ({price: qty}, {price: qty}), sizes times `mult` (stdlib json, no project code)."""
    book_ = None
    for line in path.read_text().splitlines():
        msg = json.loads(line)["msg"]
        d = msg["data"][0] if isinstance(msg["data"], list) else msg["data"]
        name = msg["arg"]["instId"] if "arg" in msg else d["s"]
        ts = int(d["ts"] if "arg" in msg else msg["ts"])
        if name == symbol and msg.get("type", msg.get("action")) == "snapshot" and ts <= at_ms:
            book_ = tuple(
                {float(p): float(Decimal(q) * Decimal(mult)) for p, q, *_ in d[k]}
                for k in (("bids", "asks") if "arg" in msg else ("b", "a"))
            )
    return book_


@pytest.mark.skipif(not BYBIT1.is_file(), reason="shared recordings not present")
@pytest.mark.parametrize(
    ("exchange", "path", "symbol", "stored", "at", "mult"),
    [
        ("bybit", BYBIT1, "BANDUSDT", "BANDUSDT", 1749833480000, "1"),  # snapshots only
        ("bybit", BYBIT500, "XRPUSDT", "XRPUSDT", 1733011200691, "1"),  # at the snapshot
        ("okx", OKX_XMR, "XMR-USDT-SWAP", "XMRUSDT", 1626995753297, "0.1"),
    ],
)
def test_recorded_in_stream_snapshot_with_no_delta_before_at(
    tmp_path: Path, exchange, path, symbol, stored, at, mult
) -> None:
    """The audit's repro on the recordings: the book at AT is the in-stream snapshot."""
    multipliers = [f"{stored}={mult}"] if exchange == "okx" else []
    assert replay.run(exchange, path, tmp_path, multipliers=multipliers) == 0
    df, facts = book.rebuild(tmp_path, exchange, stored, at)
    assert facts["messages"] == 0
    assert _sides(df) == _recorded_stream_snapshot(path, symbol, at, mult)


def test_marker_rows_change_no_level(tmp_path: Path) -> None:
    """A message that changed no level is stored as one row with side, price and
    quantity null (it keeps the id chain complete); applying it changes nothing."""
    _hand_data(tmp_path)
    write(tmp_path, Dataset.DELTAS, delta_rows(T + 350, 105, 105, 104, [(None, None, None)]))
    write(tmp_path, Dataset.DELTAS, delta_rows(T + 380, 106, 106, 105, [("bid", 10.0, 4.0)]))
    df, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", T + 400)
    assert (facts["messages"], facts["last_update_id"]) == (5, 106)
    assert _sides(df) == ({10.5: 5.0, 10.0: 4.0, 9.0: 2.5}, {10.8: 1.0, 12.0: 4.0})


def test_documented_duckdb_query_skips_marker_rows(tmp_path: Path) -> None:
    """docs/operations.md's DuckDB example, run with polars SQL on a stored tree: it
    returns level changes only (was: the marker row of a message that changed no level
    came back as a row with side, price and quantity null)."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    block = doc.split("**DuckDB**", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    m = re.search(r"SELECT .*?;", block, re.S)
    assert m is not None
    sql = re.sub(r"read_parquet\(.*?\)", "deltas", m.group(0), flags=re.S).rstrip(";")
    t = ms("2026-01-15T08:10:00Z")  # the example's exchange, symbol and hours
    rows = delta_rows(t, 1, 1, 0, [("bid", 10.0, 1.0)])
    rows += delta_rows(t + 100, 2, 2, 1, [(None, None, None)])
    rows += delta_rows(t + 200, 3, 3, 2, [("ask", 11.0, 0.0)])
    write(tmp_path, Dataset.DELTAS, rows)
    lf = pl.scan_parquet(str(tmp_path / "deltas" / "**" / "*.parquet"), hive_partitioning=True)
    got = pl.SQLContext(deltas=lf).execute(sql).collect()
    levels = got.select("side", "price", "quantity").rows()
    assert levels == [("bid", 10.0, 1.0), ("ask", 11.0, 0.0)]


def test_okx_heartbeat_markers_are_no_conflict(tmp_path: Path) -> None:
    """An OKX heartbeat (seqId == prevSeqId) repeats the last id, normalized 105..105 prev
    105, stored as a marker row: not a conflicting range for update 105."""
    kw: dict = dict(exchange="okx")
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T0, 100, [(100.0, 1.0)], [(101.0, 1.0)], **kw))
    deltas = delta_rows(T0 + 100, 101, 105, 100, [("bid", 100.0, 2.0)], **kw)
    deltas += delta_rows(T0 + 200, 105, 105, 105, [(None, None, None)], **kw)
    deltas += delta_rows(T0 + 300, 105, 105, 105, [(None, None, None)], **kw)
    deltas += delta_rows(T0 + 400, 106, 107, 105, [("ask", 101.0, 5.0)], **kw)
    write(tmp_path, Dataset.DELTAS, deltas)
    df, facts = book.rebuild(tmp_path, "okx", "BTCUSDT", T0 + 500)
    assert (facts["messages"], facts["last_update_id"]) == (4, 107)
    assert _sides(df) == ({100.0: 2.0}, {101.0: 5.0})


def test_printed_quantities_are_exact(tmp_path: Path) -> None:
    """Was `:g`: 7654321.5 printed as 7.65432e+06 and 0.123456789 as 0.123457."""
    snap = snapshot_rows(T, 100, [(10.0, 7654321.5), (9.0, 20.0)], [(11.0, 0.123456789)])
    write(tmp_path, Dataset.SNAPSHOTS, snap)
    console = Console(width=200, record=True)
    assert book.run(str(tmp_path), "binance", "BTCUSDT", str(T + 1), console=console) == 0
    text = console.export_text()
    assert "7654321.5" in text and "0.123456789" in text and "20.0" in text
    assert "e+06" not in text


@pytest.mark.parametrize(
    "at",
    [
        "99999999999999999",
        "-99999999999999999",
        "1" + "0" * 30,
        "0001-01-01T00:30:00+01:00",  # in the calendar as written, year 0 in UTC
        "9999-12-31T23:30:00-01:00",  # year 10000 in UTC
    ],
)
def test_time_out_of_the_calendar_is_a_usage_error(tmp_path: Path, at: str) -> None:
    """Was: `error: unexpected OverflowError` (exit 1) from the date arithmetic (epoch
    milliseconds, and later an ISO time whose offset moves it out of years 1..9999)."""
    _hand_data(tmp_path)
    with pytest.raises(UsageError, match="out of range"):
        book.run(str(tmp_path), "binance", "BTCUSDT", at)
    res = CliRunner().invoke(
        cli_app, ["book", str(tmp_path), "-e", "binance", "-s", "BTCUSDT", "--at", at]
    )
    assert res.exit_code == 2 and "bad time" in res.output and "Overflow" not in res.output
    res = CliRunner().invoke(cli_app, ["inspect", str(tmp_path), "--from", at])
    assert res.exit_code == 2 and "bad time" in res.output


def test_an_unreadable_gaps_file_refuses_the_book(tmp_path: Path) -> None:
    """The gap row that refuses the book at AT sits in a gaps file that cannot be read:
    the book was served (exit 0) as if there were no gap; now refused like any other
    unreadable input."""
    _hand_data(tmp_path)
    (gaps_file,) = write(tmp_path, Dataset.GAPS, gap_rows("checksum", 101, 102, T + 100, T + 200))
    with pytest.raises(DataError, match="refusing: a checksum gap"):
        book.rebuild(tmp_path, "binance", "BTCUSDT", T + 250)
    gaps_file.write_bytes(gaps_file.read_bytes()[:100])
    with pytest.raises(DataError, match="unreadable gaps file"):
        book.rebuild(tmp_path, "binance", "BTCUSDT", T + 250)


# --- the message after --at: a lost file just before it -----------------------------


def _lost_before_at(root: Path, *, keep_102: bool) -> None:
    """Snapshot 100 at T; messages 101 (T+100), 102 (T+200), 103 (T+300), each its own
    file; without `keep_102` the file holding 102 was lost."""
    write(root, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    for u in (101, 102, 103):
        if u != 102 or keep_102:
            write(root, Dataset.DELTAS, delta_rows(T + (u - 100) * 100, u, u, u - 1,
                                                   [("bid", 10.0, float(u))]))  # fmt: skip


def test_a_lost_file_just_before_at_refuses_the_book(tmp_path: Path) -> None:
    """The messages up to --at (101) continue the snapshot, but the first stored one
    after --at has prev 102: update 102, before --at, is missing. The stale book (bid
    10.0 at 101's size) was served, exit 0 (found by an audit deleting one delta file)."""
    _lost_before_at(tmp_path / "whole", keep_102=True)
    df, facts = book.rebuild(tmp_path / "whole", "binance", "BTCUSDT", T + 250)
    assert facts["last_update_id"] == 102 and _sides(df)[0] == {10.0: 102.0}
    _lost_before_at(tmp_path / "lost", keep_102=False)
    with pytest.raises(DataError) as e:
        book.rebuild(tmp_path / "lost", "binance", "BTCUSDT", T + 250)
    assert str(e.value).startswith(
        "continuity break between the snapshot and --at: after update 101 the next stored "
        "message, after --at, is 103..103 with prev 102"
    )
    # the lost update's time is unknown (between 101's and 103's): refused at T+150 too
    with pytest.raises(DataError, match="continuity break"):
        book.rebuild(tmp_path / "lost", "binance", "BTCUSDT", T + 150)


def test_a_lost_first_message_after_the_snapshot_refuses_the_book(tmp_path: Path) -> None:
    """No stored message between the snapshot and --at: the one after --at must still
    continue the snapshot (here 101 and 102 were lost, the next has prev 102)."""
    write(tmp_path, Dataset.SNAPSHOTS, snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)]))
    write(tmp_path, Dataset.DELTAS, delta_rows(T + 300, 103, 103, 102, [("bid", 10.0, 3.0)]))
    with pytest.raises(DataError, match="after update 100 the next stored message"):
        book.rebuild(tmp_path, "binance", "BTCUSDT", T + 250)


def test_a_start_row_after_at_is_a_downtime_not_a_loss(tmp_path: Path) -> None:
    """The collector stopped after 101 and the next run began at 103 (its `start` row):
    the book at --at between them is the one at 101, as the docs allow."""
    _lost_before_at(tmp_path, keep_102=False)
    write(tmp_path, Dataset.GAPS, gap_rows("start", None, 103, None, T + 300))
    _, facts = book.rebuild(tmp_path, "binance", "BTCUSDT", T + 250)
    assert facts["last_update_id"] == 101


def test_an_in_stream_snapshot_after_at_restarts_the_chain(tmp_path: Path) -> None:
    """Bybit: after --at the stream sends a new snapshot (500, ids restarted) and 501
    continues it, not 101: no break to refuse for."""
    kw: dict = dict(exchange="bybit", source="stream")
    write(tmp_path, Dataset.SNAPSHOTS,
          snapshot_rows(T, 100, [(10.0, 1.0)], [(11.0, 1.0)], **kw)
          + snapshot_rows(T + 300, 500, [(10.0, 5.0)], [(11.0, 1.0)], **kw))  # fmt: skip
    write(tmp_path, Dataset.DELTAS,
          delta_rows(T + 100, 101, 101, 100, [("bid", 10.0, 2.0)], exchange="bybit")
          + delta_rows(T + 400, 501, 501, 500, [("bid", 10.0, 6.0)], exchange="bybit"))  # fmt: skip
    df, facts = book.rebuild(tmp_path, "bybit", "BTCUSDT", T + 250)
    assert facts["last_update_id"] == 101 and _sides(df)[0] == {10.0: 2.0}
