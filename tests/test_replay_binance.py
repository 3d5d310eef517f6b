"""`replay` on the real Binance recordings, against an independent checker.

The checker below uses only stdlib json and loops (no project code) to count diffs,
levels, snapshots and continuity breaks (`pu` != previous `u` of the same symbol), so the
replay is compared with numbers it did not produce, including on copies of the
recordings with messages removed on purpose.
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
from paths import RECORDED

from cryptoflow.errors import DataError, UnreadableTail, UsageError
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.pipeline.normalize import Normalizer
from cryptoflow.tools.recording import iter_records
from cryptoflow.tools.replay import VENUES, replay_summary, run

REC = RECORDED / "binance"
SUSHI = REC / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"
BTC = REC / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz"

pytestmark = pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")


def read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [line for line in f if line.strip()]


def check(lines: list[str]) -> dict:
    """Independent expectation: counts and breaks, stdlib only."""
    out = Counter()
    last_u: dict[str, int] = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            out["messages"] += 1
            continue
        out["messages"] += 1
        msg = rec["msg"]
        if rec["kind"] == "rest_snapshot":
            out["snapshots"] += 1
            out["snapshot_rows"] += len(msg["bids"]) + len(msg["asks"])
            continue
        data = msg["data"]
        if not all(k in data for k in ("U", "u", "pu", "E", "b", "a")):
            continue
        out["diffs"] += 1
        out["rows"] += len(data["b"]) + len(data["a"])
        sym = data["s"]
        if sym in last_u and data["pu"] != last_u[sym]:
            out["breaks"] += 1
        last_u[sym] = data["u"]
    return dict(out)


def expected_level_rows(lines: list[str]) -> Counter:
    rows = Counter()
    for line in lines:
        rec = json.loads(line)
        if rec["kind"] != "ws":
            continue
        data = rec["msg"]["data"]
        for side, key in (("bid", "b"), ("ask", "a")):
            for price, qty in data[key]:
                rows[(data["s"], data["u"], side, float(price), float(qty))] += 1
    return rows


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (SUSHI, {"diffs": 444, "rows": 4982, "snapshots": 2, "snapshot_rows": 3372}),
        (BTC, {"diffs": 6551, "rows": 443521, "snapshots": 1, "snapshot_rows": 2000}),
    ],
)
def test_replay_matches_readme_and_checker(path, expected, tmp_path, capsys):
    lines = read_lines(path)
    independent = check(lines)
    # the README's independently checked numbers, and 0 breaks
    assert {k: independent[k] for k in expected} == expected
    assert independent.get("breaks", 0) == 0
    out = tmp_path / "out"
    assert run("binance", path, out) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (
        f"messages={expected['diffs'] + expected['snapshots']} rows={expected['rows']} "
        f"gaps=0 resyncs=0 snapshot_rows={expected['snapshot_rows']}"
    )

    deltas = pl.scan_parquet(str(out) + "/deltas/**/*.parquet", hive_partitioning=True).collect()
    snaps = pl.scan_parquet(str(out) + "/snapshots/**/*.parquet", hive_partitioning=True).collect()
    assert deltas.height == expected["rows"]
    assert snaps.height == expected["snapshot_rows"]
    assert not (out / "gaps").exists()
    # every level of every diff is a row, price and quantity equal to float(original str)
    got = Counter(
        zip(
            deltas["symbol"],
            deltas["last_update_id"],
            deltas["side"],
            deltas["price"],
            deltas["quantity"],
            strict=True,
        )
    )
    assert got == expected_level_rows(lines)
    assert (deltas["quantity"] == deltas["raw_quantity"]).all()
    # partitioned by event-time hour
    hours = deltas.select(
        (pl.col("timestamp").dt.hour() == pl.col("hour")).all().alias("h"),
        (pl.col("timestamp").dt.day() == pl.col("day")).all().alias("d"),
    )
    assert hours.row(0) == (True, True)
    # snapshot levels are numbered from the best price per side
    assert snaps.filter(pl.col("level") == 0).height == 2 * expected["snapshots"]


def test_btc_aligns_on_diff_4_received_before_snapshot():
    lines = read_lines(BTC)
    recs = [json.loads(x) for x in lines]
    snap_pos = next(i for i, r in enumerate(recs) if r["kind"] == "rest_snapshot")
    last_update_id = recs[snap_pos]["msg"]["lastUpdateId"]
    diffs = [r["msg"]["data"] for r in recs if r["kind"] == "ws"]
    aligning = next(
        i for i, d in enumerate(diffs) if d["U"] <= last_update_id + 1 and d["u"] >= last_update_id
    )
    assert aligning == 4 and aligning < snap_pos  # independent: received before the snapshot

    normalizer = Normalizer({"binance": RULES}, track_book=True)
    venue = VENUES["binance"]
    for rec in iter_records(BTC):
        if rec.kind == "ws":
            normalizer.feed_many(venue.parse_ws(rec.msg, rec.recv_ns, {}))
        else:
            normalizer.feed(venue.parse_rest(rec, {}))
    sync = normalizer.syncs()[("binance", "BTCUSDT")]
    c = sync.counters
    assert (c.stale_dropped, c.applied, c.breaks, c.resyncs) == (4, 6547, 0, 0)
    assert sync.book_id == diffs[-1]["u"] and not sync.book.crossed()


def write_copy(path: Path, lines: list[str], gz: bool = False) -> Path:
    if gz:
        with gzip.open(path, "wt") as f:
            f.writelines(lines)
    else:
        path.write_text("".join(lines))
    return path


def ws_positions(lines: list[str], symbol: str) -> list[int]:
    return [
        i
        for i, line in enumerate(lines)
        if json.loads(line)["kind"] == "ws" and json.loads(line)["msg"]["data"]["s"] == symbol
    ]


@pytest.mark.parametrize("gz", [False, True])
def test_removed_diffs_give_exactly_the_checked_breaks(tmp_path, gz):
    lines = read_lines(SUSHI)
    sushi = ws_positions(lines, "SUSHIUSDT")
    akro = ws_positions(lines, "AKROUSDT")
    # three separate SUSHI diffs (after the book synced) and two adjacent AKRO diffs
    drop = {sushi[50], sushi[100], sushi[200], akro[30], akro[31]}
    copy = [line for i, line in enumerate(lines) if i not in drop]
    independent = check(copy)
    assert independent["breaks"] == 4
    path = write_copy(tmp_path / ("cut.jsonl.gz" if gz else "cut.jsonl"), copy, gz)
    summary = replay_summary("binance", path, tmp_path / "out")
    assert (summary.messages, summary.rows, summary.gaps, summary.resyncs) == (
        independent["messages"],
        independent["rows"],
        independent["breaks"],
        0,
    )
    gaps = pl.scan_parquet(str(tmp_path / "out") + "/gaps/**/*.parquet", hive_partitioning=True)
    gaps = gaps.collect()
    assert gaps.height == 4
    assert sorted(gaps["symbol"].to_list()) == ["AKROUSDT"] + ["SUSHIUSDT"] * 3
    assert set(gaps["kind"]) == {"sequence_break"}
    # each gap names the last good id and the first id after it, as in the file
    first = json.loads(lines[sushi[50]])["msg"]["data"]
    before = json.loads(lines[sushi[49]])["msg"]["data"]
    after = json.loads(lines[sushi[51]])["msg"]["data"]
    row = gaps.filter(pl.col("last_good_id") == before["u"]).row(0, named=True)
    assert row["first_id_after"] == after["U"] and first["pu"] == before["u"]


def test_duplicate_line_is_dropped_not_a_break(tmp_path):
    lines = read_lines(SUSHI)
    pos = ws_positions(lines, "SUSHIUSDT")[20]
    copy = [*lines[: pos + 1], lines[pos], *lines[pos + 1 :]]
    summary = replay_summary("binance", write_copy(tmp_path / "dup.jsonl", copy), None)
    assert (summary.messages, summary.rows, summary.gaps) == (447, 4982, 0)
    assert summary.dropped_duplicates == 1


def test_bad_records_are_counted_and_skipped(tmp_path, caplog):
    lines = read_lines(SUSHI)
    pos = ws_positions(lines, "SUSHIUSDT")[10]
    broken = json.loads(lines[pos])
    del broken["msg"]["data"]["u"]
    copy = [*lines[:5], "{not json\n", *lines[5:pos], json.dumps(broken) + "\n", *lines[pos + 1 :]]
    independent = check(copy)
    summary = replay_summary("binance", write_copy(tmp_path / "bad.jsonl", copy), None)
    assert summary.bad_records == 2
    assert summary.messages == len(copy) == independent["messages"]
    assert summary.rows == independent["rows"]
    assert summary.gaps == independent["breaks"] == 1  # the broken diff is missing from the chain
    assert "bad.jsonl:6" in caplog.text and "'u'" in caplog.text


def test_help_names_every_input_format():
    from typer.testing import CliRunner

    from cryptoflow.cli import app

    res = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["replay", "--help"])
    assert res.exit_code == 0 and ".jsonl.zst" in res.output


def test_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        run("binance", tmp_path / "nope.jsonl", tmp_path / "out")
    # a directory is said to be one (was "does not exist", found by an audit)
    with pytest.raises(UsageError, match=re.escape(f"input '{tmp_path}' is a directory: --input")):
        run("binance", tmp_path, tmp_path / "out")
    with pytest.raises(UsageError, match="unknown exchange"):
        run("nasdaq", SUSHI, tmp_path / "out")
    # a Binance recording replayed as OKX: nothing readable is no replay (was exit 0)
    with pytest.raises(DataError, match="none of its 446 records could be read as okx"):
        run("okx", SUSHI, tmp_path / "out", multipliers=["SUSHIUSDT=1"])


# --- compressed files cut short or not what they say --------------------------------


def gz_cut(tmp_path: Path, fraction: float) -> tuple[Path, list[str]]:
    """The first `fraction` of the BTC .gz as a file, and the complete lines its
    compressed bytes hold (stdlib zlib, no project code)."""
    data = BTC.read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[: int(len(data) * fraction)])
    text = zlib.decompressobj(wbits=31).decompress(cut.read_bytes()).decode()
    return cut, text.splitlines(keepends=True)[:-1]  # the last one is cut


def test_truncated_gz_replays_its_readable_part(tmp_path, caplog):
    """Found by an audit: a .jsonl.gz cut short (90 % of the BTC file) failed with
    `error: unexpected EOFError: Compressed file ended before the end-of-stream marker
    was reached`, exit 1, nothing written and the file not named, where a .jsonl or
    .jsonl.zst cut short replays its readable part with one bad record skipped."""
    from typer.testing import CliRunner

    from cryptoflow.cli import app

    cut, complete = gz_cut(tmp_path, 0.9)
    independent = check(complete)
    assert 5000 < len(complete) < 6552
    stop = len(complete) + 1  # the line being read when the data ran out
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["replay", "-e", "binance", "-i", str(cut), "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == (
        f"messages={stop} rows={independent['rows']} gaps=0 resyncs=0 "
        f"snapshot_rows={independent['snapshot_rows']}"
    )
    assert f"{cut}:{stop}: skipped: line {stop}: truncated (the file was cut short)" in caplog.text
    assert "1 bad records skipped" in caplog.text
    deltas = pl.read_parquet(out / "deltas" / "**" / "*.parquet", hive_partitioning=False)
    assert deltas.height == independent["rows"] > 0
    # the record reader reports it the same way, or raises it without a callback
    errors: list[int] = []
    assert len(list(iter_records(cut, lambda n, _: errors.append(n)))) == len(complete)
    assert errors == [stop]
    with pytest.raises(UnreadableTail, match=f"line {stop}: truncated"):
        list(iter_records(cut))


def test_gz_with_nothing_readable_is_one_line_naming_it(tmp_path):
    """A .gz whose header is not gzip's (was `error: Unknown compression method`, the
    file not named) or that is cut before its first line ends: one line, exit 1."""
    from typer.testing import CliRunner

    from cryptoflow.cli import app

    not_gzip = tmp_path / "bad.jsonl.gz"
    not_gzip.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 4)
    short = tmp_path / "short.jsonl.gz"
    short.write_bytes(BTC.read_bytes()[:200])
    for path, why in ((not_gzip, "not readable as gzip: "), (short, "truncated ")):
        out = tmp_path / "out"
        args = ["replay", "-e", "binance", "-i", str(path), "--output", str(out)]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1, res.output
        assert res.stderr.startswith(f"error: {path}: {why}") and res.stderr.count("\n") == 1
        assert not out.exists()
