"""The batch fast path (`pipeline/batch.py`, `Normalizer.feed_frames` /
`feed_snapshot_bodies`, `replay --fast`) gives exactly the simple path's output.

The simple path is the per-frame one (`binance.parse.parse_ws_message` /
`parse_rest_snapshot` + `Normalizer.feed_many` + `frame_from_columns`). Compared on the
real recordings, on damaged copies (frames removed, duplicated, reordered, so gaps and
resyncs happen), and on frames the fast path must refuse (it returns None and the simple
path decides). Frames are the recorded payloads as bytes, as a WebSocket delivers them.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import polars as pl
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage
from cryptoflow.exchanges.binance import parse as binance_parse
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import MARKET_FUTURES, Dataset, SnapshotSource
from cryptoflow.pipeline import batch
from cryptoflow.pipeline.normalize import (
    NormalizeOutput,
    Normalizer,
    frame_from_batch,
    frame_from_columns,
    frame_from_wire,
    wire_frame,
)
from cryptoflow.tools.recording import iter_records
from cryptoflow.tools.replay import replay_summary

REC = RECORDED / "binance"
SUSHI = REC / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"
BTC = REC / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz"

pytestmark = pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")

FrameKey = tuple[Dataset, str]


def records(path: Path) -> list[tuple[str, bytes, int, str]]:
    return [(r.kind, orjson.dumps(r.msg), r.recv_ns, r.channel) for r in iter_records(path)]


def _rest(payload: bytes, recv_ns: int, channel: str):
    symbol = channel.split("symbol=", 1)[1].split("&", 1)[0]
    return binance_parse.parse_rest_snapshot(payload, symbol, recv_ns, SnapshotSource.REPLAY)


def _collect(out: NormalizeOutput, into: dict[FrameKey, list[pl.DataFrame]]) -> None:
    for b in out.batches:
        into.setdefault((b.dataset, b.symbol), []).append(frame_from_batch(b))
    for fb in out.frames:
        into.setdefault((fb.dataset, fb.symbol), []).append(frame_from_batch(fb))


def run_simple(recs, chunk: int = 500):
    norm = Normalizer({"binance": RULES})
    frames: dict[FrameKey, list[pl.DataFrame]] = {}
    gaps, resyncs, bad = [], [], 0
    items: list = []

    def process():
        out = norm.feed_many(items)
        items.clear()
        _collect(out, frames)
        gaps.extend(out.gaps)
        resyncs.extend(out.resync_requests)

    for kind, payload, recv_ns, channel in recs:
        try:
            if kind == "ws":
                parsed = binance_parse.parse_ws_message(payload, recv_ns)
                if isinstance(parsed, list):
                    items.extend(parsed)
            else:
                items.append(_rest(payload, recv_ns, channel))
        except MalformedMessage:
            bad += 1
        if len(items) >= chunk:
            process()
    process()
    return _result(norm, frames, gaps, resyncs)


def run_fast(recs, chunk: int = 500, *, expect_fast: bool = True):
    """Frames in chunks through `feed_frames`; a refused chunk through the simple path."""
    norm = Normalizer({"binance": RULES})
    frames: dict[FrameKey, list[pl.DataFrame]] = {}
    gaps, resyncs = [], []
    pending: list[tuple[bytes, int]] = []
    refused = 0

    def take(out):
        _collect(out, frames)
        gaps.extend(out.gaps)
        resyncs.extend(out.resync_requests)

    def drain():
        nonlocal refused
        if not pending:
            return
        out = norm.feed_frames("binance", MARKET_FUTURES, *map(list, zip(*pending, strict=True)))
        if out is None:
            refused += 1
            items = []
            for payload, recv_ns in pending:
                try:
                    parsed = binance_parse.parse_ws_message(payload, recv_ns)
                except MalformedMessage:
                    continue
                if isinstance(parsed, list):
                    items.extend(parsed)
            out = norm.feed_many(items)
        take(out)
        pending.clear()

    for kind, payload, recv_ns, channel in recs:
        if kind == "ws":
            pending.append((payload, recv_ns))
            if len(pending) >= chunk:
                drain()
        else:
            drain()
            take(norm.feed_many([_rest(payload, recv_ns, channel)]))
    drain()
    if expect_fast:
        assert refused == 0
    return _result(norm, frames, gaps, resyncs)


def _result(norm, frames, gaps, resyncs):
    merged = {k: pl.concat(v) for k, v in frames.items()}
    return merged, gaps, resyncs, norm.totals()


def assert_same(a, b):
    frames_a, gaps_a, resyncs_a, totals_a = a
    frames_b, gaps_b, resyncs_b, totals_b = b
    assert frames_a.keys() == frames_b.keys()
    for key in frames_a:
        assert frames_a[key].schema == frames_b[key].schema, key
        assert frames_a[key].equals(frames_b[key]), key
    assert gaps_a == gaps_b
    assert resyncs_a == resyncs_b
    assert totals_a == totals_b


# one-frame batches only on the small file: 6,551 of them on BTC add nothing but time
@pytest.mark.parametrize(
    ("path", "chunk"),
    [(SUSHI, 1), (SUSHI, 37), (SUSHI, 2000), (BTC, 37), (BTC, 2000)],
    ids=["sushi_akro-1", "sushi_akro-37", "sushi_akro-2000", "btc-37", "btc-2000"],
)
def test_recordings_fast_equals_simple(path, chunk):
    recs = records(path)
    simple = run_simple(recs)
    fast = run_fast(recs, chunk)
    assert_same(simple, fast)
    deltas = sum(f.height for (ds, _), f in simple[0].items() if ds is Dataset.DELTAS)
    assert deltas == {SUSHI: 4982, BTC: 443521}[path]


def _damaged(recs):
    """Frames removed (breaks -> gaps, resyncs), an exact duplicate (dropped), an older
    frame out of order, and one frame without levels."""
    ws = [i for i, r in enumerate(recs) if r[0] == "ws"]
    out = list(recs)
    for i in sorted((ws[50], ws[51], ws[300]), reverse=True):
        del out[i]
    out.insert(ws[120], out[ws[120] - 1])  # exact duplicate of the previous record
    out.insert(ws[200], out[ws[150]])  # an older frame, out of order
    kind, payload, recv_ns, channel = out[ws[10]]
    msg = orjson.loads(payload)
    msg["data"]["b"], msg["data"]["a"] = [], []
    out[ws[10]] = (kind, orjson.dumps(msg), recv_ns, channel)
    return out


@pytest.mark.parametrize("path", [SUSHI, BTC], ids=["sushi_akro", "btc"])
def test_damaged_copies_fast_equals_simple(path):
    recs = _damaged(records(path))
    simple = run_simple(recs)
    assert simple[1], "the damage must produce gaps"
    assert simple[3].duplicates >= 1
    assert_same(simple, run_fast(recs, 64))


def _frame(**changes) -> bytes:
    data = {
        "e": "depthUpdate",
        "E": 1723161256299,
        "T": 1723161256298,
        "s": "BTCUSDT",
        "U": 10,
        "u": 12,
        "pu": 9,
        "b": [["61000.10", "0.5"], ["61000.00", "0.000"]],
        "a": [["61001.00", "1.25"]],
    }
    data.update(changes)
    return orjson.dumps({"stream": "btcusdt@depth@0ms", "data": data})


GOOD = _frame()
REFUSED = {
    "number_level": _frame(b=[[61000.1, "0.5"]]),
    "bool_level": _frame(a=[["1", True]]),
    "null_level": _frame(a=[["1", None]]),
    "nested_level": _frame(b=[[["61000.10"], "0.5"]]),
    "triple_level": _frame(b=[["1", "2", "3"]]),
    "single_level": _frame(b=[["1"]]),
    "empty_level": _frame(b=[[]]),
    "object_level": _frame(b=[{"p": "1"}]),
    "levels_not_list": _frame(b="x"),
    "levels_null": _frame(b=None),
    "string_E": _frame(E="1723161256299"),
    "float_E": _frame(E=1.5),
    # times outside the window the parser accepts (`fields.TIME_MIN_MS`): it refuses them
    "far_E": _frame(E=300_000_000_000_000),
    "far_T": _frame(T=300_000_000_000_000),
    "early_E": _frame(E=946_684_799_999),
    "big_U": GOOD.replace(b'"U":10', b'"U":99999999999999999999'),
    "leading_zero": GOOD.replace(b'"U":10', b'"U":010'),
    "exponent": GOOD.replace(b'"U":10', b'"U":1e1'),
    "number_symbol": _frame(s=5),
    "missing_T": GOOD.replace(b',"T":1723161256298', b""),
    "extra_field": _frame(x=1),
    "duplicate_key": GOOD.replace(b'"u":12', b'"u":11,"u":12'),
    "other_event": _frame(e="bookTicker"),
    "escape": _frame(b=[["6100\\u0030", "1"]]).replace(b"\\\\u", b"\\u"),
    "whitespace": GOOD.replace(b'"E":', b'"E": '),
    "pretty": orjson.dumps(orjson.loads(GOOD), option=orjson.OPT_INDENT_2),
    "control": b'{"result":null,"id":1}',
    "invalid_json": GOOD[:-1],
    "invalid_utf8": GOOD.replace(b"BTCUSDT", b"BTC\xffUSDT"),
    "trailing": GOOD + b"x",
}


def test_good_frame_is_read():
    got = batch.read_diff_frames([GOOD, GOOD.replace(b"btcusdt@", b"x@")])
    assert got is not None
    assert got.heads.row(0) == ("BTCUSDT", 1723161256299, 1723161256298, 10, 12, 9)
    assert got.rows.get_column("price").to_list()[:3] == ["61000.10", "61000.00", "61001.00"]
    assert got.rows.get_column("side").to_list()[:3] == ["bid", "bid", "ask"]
    # T may be null (parse_ws_message keeps None) and the bare event form is read too
    assert batch.read_diff_frames([_frame(T=None)]).heads["T"].to_list() == [None]
    bare = orjson.dumps(orjson.loads(GOOD)["data"])
    assert batch.read_diff_frames([bare]).heads.row(0) == got.heads.row(0)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unusual_frames_go_to_the_simple_path(name):
    frame = REFUSED[name]
    assert batch.read_diff_frames([GOOD, frame]) is None
    norm = Normalizer({"binance": RULES})
    assert norm.feed_frames("binance", MARKET_FUTURES, [GOOD, frame], [1, 2]) is None
    assert norm.totals().diffs == 0  # nothing was fed


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_replay_with_an_unusual_frame_equals_simple(name, tmp_path):
    """A recording with one odd frame in a chunk: the chunk falls back, output equal."""
    with gzip.open(BTC, "rb") as f:
        lines = f.read().splitlines()[:400]
    frame = REFUSED[name]
    # keep the odd frame's ids in the chain so the rest of the stream still continues
    odd = orjson.loads(lines[200])["msg"]["data"] if name != "control" else None
    if odd is not None and frame.startswith(b'{"stream"'):
        for key in ("U", "u", "pu", "E"):
            frame = frame.replace(
                f'"{key}":'.encode() + str(orjson.loads(GOOD)["data"][key]).encode(),
                f'"{key}":{odd[key]}'.encode(),
                1,
            )
    rec = orjson.loads(lines[200])
    head = orjson.dumps({k: rec[k] for k in ("recv_ns", "kind", "channel")})[:-1]
    lines[200] = head + b',"msg":' + frame + b"}"
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = {}
    for fast in (False, True):
        root = tmp_path / f"out-{fast}"
        summary = replay_summary("binance", path, root, chunk_records=64, fast=fast)
        files = sorted(p.relative_to(root) for p in root.rglob("*.parquet"))
        out[fast] = (
            summary.line(),
            summary.bad_records,
            files,
            [(root / f).read_bytes() for f in files],
        )
    assert out[True] == out[False]


@pytest.mark.parametrize("path", [SUSHI, BTC], ids=["sushi_akro", "btc"])
def test_replay_fast_writes_the_same_files(path, tmp_path):
    got = {}
    for fast in (False, True):
        root = tmp_path / str(fast)
        summary = replay_summary("binance", path, root, fast=fast)
        files = sorted(p.relative_to(root) for p in root.rglob("*.parquet"))
        got[fast] = (summary.line(), files, [(root / f).read_bytes() for f in files])
    assert got[True] == got[False]
    assert got[True][1]  # something was written


def test_symbol_map_is_applied_like_the_parser():
    frames = [GOOD, _frame(U=13, u=14, pu=12, s="1000PEPEUSDT")]
    symbols = {"1000PEPEUSDT": "PEPEUSDT"}
    fast = Normalizer({"binance": RULES}).feed_frames(
        "binance", MARKET_FUTURES, frames, [1, 2], symbols
    )
    simple_items = [
        d for i, f in enumerate(frames) for d in binance_parse.parse_ws_message(f, i + 1, symbols)
    ]
    simple = Normalizer({"binance": RULES}).feed_many(simple_items)
    assert (
        {fb.symbol for fb in fast.frames}
        == {b.symbol for b in simple.batches}
        == {
            "BTCUSDT",
            "PEPEUSDT",
        }
    )
    for b in simple.batches:
        fb = next(f for f in fast.frames if f.symbol == b.symbol)
        assert fb.frame.equals(wire_frame(b.columns))


def _snapshot_body(path: Path = BTC) -> tuple[bytes, int, str]:
    for r in iter_records(path):
        if r.kind == "rest_snapshot":
            return orjson.dumps(r.msg), r.recv_ns, r.channel
    raise AssertionError


def _snap_simple(bodies, symbols, recv):
    norm = Normalizer({"binance": RULES})
    snaps = [
        binance_parse.parse_rest_snapshot(b, s, t, SnapshotSource.POLL)
        for b, s, t in zip(bodies, symbols, recv, strict=True)
    ]
    out = norm.feed_many(snaps)
    return {
        b.symbol: frame_from_columns(b.dataset, b.exchange, b.market, b.symbol, b.columns)
        for b in out.batches
    }, norm.totals()


def test_snapshot_bodies_fast_equals_simple():
    body, recv_ns, _ = _snapshot_body()
    sushi = [r for r in iter_records(SUSHI) if r.kind == "rest_snapshot"]
    old = orjson.loads(body)
    del old["E"], old["T"]  # old responses: no E / T -> the receive time is the event time
    bodies = [body, *(orjson.dumps(r.msg) for r in sushi), orjson.dumps(old), body]
    symbols = ["BTCUSDT", "SUSHIUSDT", "AKROUSDT", "BTCUSDT", "BTCUSDT"]
    recv = [recv_ns, *(r.recv_ns for r in sushi), recv_ns + 1, recv_ns + 2]
    norm = Normalizer({"binance": RULES})
    out = norm.feed_snapshot_bodies("binance", MARKET_FUTURES, symbols, bodies, recv)
    assert out is not None
    fast = {
        fb.symbol: frame_from_wire(fb.dataset, fb.exchange, fb.market, fb.symbol, fb.frame)
        for fb in out.frames
    }
    simple, totals = _snap_simple(bodies, symbols, recv)
    assert fast.keys() == simple.keys()
    for sym in simple:
        assert fast[sym].equals(simple[sym]), sym
    assert norm.totals() == totals


@pytest.mark.parametrize(
    "change",
    [
        lambda o: o.update(bids=[[1, "2"]]),
        lambda o: o.update(lastUpdateId="5"),
        lambda o: o.update(extra=1),
        lambda o: o.pop("lastUpdateId"),
        lambda o: o.update(asks=[["1", "2", "3"]]),
        lambda o: o.update(E=300_000_000_000_000),  # outside the time window
        lambda o: o.update(T=0),
    ],
)
def test_unusual_snapshot_bodies_go_to_the_simple_path(change):
    body, recv_ns, _ = _snapshot_body()
    obj = orjson.loads(body)
    change(obj)
    norm = Normalizer({"binance": RULES})
    assert (
        norm.feed_snapshot_bodies(
            "binance", MARKET_FUTURES, ["BTCUSDT"], [orjson.dumps(obj)], [recv_ns]
        )
        is None
    )
    assert norm.totals().snapshots == 0


def test_book_tracking_keeps_the_simple_path():
    norm = Normalizer({"binance": RULES}, track_book=True)
    assert norm.feed_frames("binance", MARKET_FUTURES, [GOOD], [1]) is None


# --- the level arrays: every shape the grammar refuses, and unusual ones it reads ---------

#: level arrays (JSON text) outside `[["<str>","<str>"],...]`: each must send the batch to
#: the simple path, in a snapshot body and in a diff frame, as bids and as asks
BAD_LEVELS = {
    "triple": b'[["1","2","3"]]',
    "single": b'[["1"]]',
    "empty_pair": b"[[]]",
    "empty_pair_after": b'[["1","2"],[]]',
    # as many strings as two pairs, grouped wrongly: counting quotes would not see it
    "regrouped": b'[["1","2","3"],["4"]]',
    "regrouped_3": b'[["1","2"],["3","4","5"],["6"]]',
    "number_price": b'[[1,"2"]]',
    "number_quantity": b'[["1",2]]',
    "null_quantity": b'[["1",null]]',
    "nested": b'[[["1"],"2"]]',
    "pair_not_in_list": b'["1","2"]',
    "bare_strings": b'["1","2","3","4"]',
    "object": b'[{"p":"1","q":"2"}]',
    "null_level": b'[["1","2"],null]',
    "string_level": b'[["1","2"],"x"]',
    "null": b"null",
    "string": b'"x"',
    "no_comma_between_pairs": b'[["1","2"]["3","4"]]',
    "no_comma_in_pair": b'[["1""2"]]',
    "semicolon": b'[["1";"2"]]',
    "trailing_comma": b'[["1","2"],]',
    "leading_comma": b'[,["1","2"]]',
    "extra_close": b'[["1","2"]]]',
    "missing_close": b'[["1","2"]',
    "missing_pair_close": b'[["1","2",["3","4"]]',
    "unquoted": b'[["1","2],["3","4"]]',
    "space_in_pair": b'[["1", "2"]]',
    "space_between_pairs": b'[["1","2"], ["3","4"]]',
    "space_before": b' [["1","2"]]',
    "newline_between_pairs": b'[["1","2"],\n["3","4"]]',
    "escaped_quote": b'[["1\\"2","3"]]',
    "escaped_digit": b'[["6100\\u0030","1"]]',
    "escaped_backslash": b'[["1\\\\","2"]]',
    "raw_tab": b'[["1\t","2"]]',
    "raw_newline": b'[["1","2\n"]]',
    "raw_control": b'[["1\x01","2"]]',
    "raw_nul": b'[["1","\x00"]]',
}

#: unusual but exact level arrays: read, and equal to what orjson gives
ODD_LEVELS = {
    "empty": b"[]",
    "empty_strings": b'[["",""]]',
    # a string that is exactly `],[`: the reader before the one-regex grammar split the
    # levels at `"],["` and read this pair wrong
    "brackets_in_strings": b'[["[1]","],["],["]","["]]',
    "separators_in_strings": b'[[",",":"],["],[","}"]]',
    "non_ascii": '[["61000.1é","日本"],["\u2028","\x7f"]]'.encode(),
    "long_strings": b'[["123456789012345.123456789","0.000000000000000001"],["1","2"]]',
    "one_level": b'[["61000.10","0.5"]]',
}


def _snapshot_raw(
    bids: bytes, asks: bytes, head: bytes = b'"lastUpdateId":50,"E":1723161256007,"T":1723161256006'
) -> bytes:
    return b"{" + head + b',"bids":' + bids + b',"asks":' + asks + b"}"


def _diff_raw(b: bytes, a: bytes, wrapped: bool = True, u: int = 12) -> bytes:
    data = (
        b'{"e":"depthUpdate","E":1723161256299,"T":1723161256298,"s":"BTCUSDT",'
        b'"U":10,"u":' + str(u).encode() + b',"pu":9,"b":' + b + b',"a":' + a + b"}"
    )
    return b'{"stream":"btcusdt@depth@0ms","data":' + data + b"}" if wrapped else data


def _expected_diff_rows(frames: list[bytes]) -> pl.DataFrame:
    """The rows `read_diff_frames` must give, from orjson."""
    rows = []
    for i, frame in enumerate(frames):
        d = orjson.loads(frame)
        d = d.get("data", d)
        for side, key in (("bid", "b"), ("ask", "a")):
            rows += [(i, d["E"], d["T"], d["U"], d["u"], d["pu"], side, p, q) for p, q in d[key]]
        if not d["b"] and not d["a"] and d["pu"] != d["u"]:  # the marker of a no-level diff
            rows.append((i, d["E"], d["T"], d["U"], d["u"], d["pu"], None, None, None))
    schema = {
        "_i": pl.UInt32,
        "timestamp": pl.Int64,
        "transaction_time": pl.Int64,
        "first_update_id": pl.Int64,
        "last_update_id": pl.Int64,
        "prev_update_id": pl.Int64,
        "side": pl.String,
        "price": pl.String,
        "raw_quantity": pl.String,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def _expected_snapshot_rows(bodies: list[bytes], recv: list[int], source: str) -> pl.DataFrame:
    """The rows `read_snapshot_bodies` must give, from orjson (as `parse_rest_snapshot`)."""
    rows = []
    for i, (body, t) in enumerate(zip(bodies, recv, strict=True)):
        d = orjson.loads(body)
        ev = d.get("E", d.get("T", t // 1_000_000))
        for side, key in (("bid", "bids"), ("ask", "asks")):
            rows += [
                (i, ev, d.get("T"), t, d["lastUpdateId"], side, j, p, q, source)
                for j, (p, q) in enumerate(d[key])
            ]
    schema = {
        "_i": pl.UInt32,
        "timestamp": pl.Int64,
        "transaction_time": pl.Int64,
        "receive_time": pl.Int64,
        "last_update_id": pl.Int64,
        "side": pl.String,
        "level": pl.Int64,
        "price": pl.String,
        "raw_quantity": pl.String,
        "source": pl.String,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


def _assert_frame(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got.schema == want.schema
    assert got.equals(want), (got, want)


@pytest.mark.parametrize("name", sorted(BAD_LEVELS))
def test_bad_level_arrays_go_to_the_simple_path(name):
    bad, ok = BAD_LEVELS[name], b'[["1","2"]]'
    good_body = _snapshot_raw(ok, ok)
    for body in (_snapshot_raw(bad, ok), _snapshot_raw(ok, bad), _snapshot_raw(bad, bad)):
        assert batch.read_snapshot_bodies([good_body, body], [1, 2], "poll") is None
        assert batch.read_snapshot_bodies([body], [1], "poll") is None
    for wrapped in (True, False):
        good = _diff_raw(ok, ok, wrapped)
        for frame in (_diff_raw(bad, ok, wrapped), _diff_raw(ok, bad, wrapped)):
            assert batch.read_diff_frames([good, frame]) is None
            assert batch.read_diff_frames([frame]) is None


@pytest.mark.parametrize("name", sorted(ODD_LEVELS))
def test_unusual_level_arrays_are_read_exactly(name):
    odd, ok = ODD_LEVELS[name], b'[["61000.10","0.5"],["61000.00","0.000"]]'
    bodies = [
        _snapshot_raw(odd, ok),
        _snapshot_raw(ok, odd, head=b'"lastUpdateId":51'),  # no E, no T
        _snapshot_raw(odd, odd, head=b'"lastUpdateId":52,"T":1723161258008'),
    ]
    recv = [1_723_161_256_000_000_001, 1_723_161_257_000_000_002, 1_723_161_258_000_000_003]
    got = batch.read_snapshot_bodies(bodies, recv, "poll")
    assert got is not None
    _assert_frame(got.rows, _expected_snapshot_rows(bodies, recv, "poll"))
    assert got.heads.rows() == [
        (50, 1_723_161_256_007, 1_723_161_256_006),
        (51, 1_723_161_257_000, None),
        (52, 1_723_161_258_008, 1_723_161_258_008),
    ]
    # the simple path reads them alike
    for body, t in zip(bodies, recv, strict=True):
        snapshot = binance_parse.parse_rest_snapshot(body, "BTCUSDT", t)
        assert [snapshot.bids, snapshot.asks] == [orjson.loads(body)[k] for k in ("bids", "asks")]
    for wrapped in (True, False):
        frames = [
            _diff_raw(odd, ok, wrapped),
            _diff_raw(ok, odd, wrapped),
            _diff_raw(odd, odd, wrapped),
        ]
        got = batch.read_diff_frames(frames)
        assert got is not None
        _assert_frame(got.rows, _expected_diff_rows(frames))
        assert got.heads.height == 3


def test_batches_with_empty_sides_keep_the_row_order():
    """Messages without bids, without asks or without both, between others: rows are
    bids then asks of each message, in message order, with the right message index."""
    lv = [b"[]", b'[["1","2"]]', b'[["3","4"],["5","6"],["7","8"]]']
    frames = [_diff_raw(b, a, u=n) for n, (b, a) in enumerate((b, a) for b in lv for a in lv)]
    got = batch.read_diff_frames(frames)
    assert got is not None
    _assert_frame(got.rows, _expected_diff_rows(frames))
    assert got.heads["u"].to_list() == list(range(9))
    bodies = [_snapshot_raw(b, a) for b in lv for a in lv]
    recv = list(range(1, 10))
    snap = batch.read_snapshot_bodies(bodies, recv, "poll")
    assert snap is not None
    _assert_frame(snap.rows, _expected_snapshot_rows(bodies, recv, "poll"))
    # nothing at all
    none = batch.read_snapshot_bodies([_snapshot_raw(b"[]", b"[]")], [1], "poll")
    assert none is not None and none.rows.height == 0
    _assert_frame(none.rows, _expected_snapshot_rows([_snapshot_raw(b"[]", b"[]")], [1], "poll"))


def test_a_frame_without_levels_is_a_marker_row_unless_a_heartbeat():
    """As the simple path: a frame with no level whose ids move on (pu 9 -> u 12) is one
    row with side, price and quantity null; one that repeats its id (pu == u) is none."""
    frames = [_diff_raw(b"[]", b"[]", u=9), _diff_raw(b"[]", b"[]", u=12)]
    got = batch.read_diff_frames(frames)
    assert got is not None
    _assert_frame(got.rows, _expected_diff_rows(frames))
    assert got.rows.select("_i", "last_update_id", "side").rows() == [(1, 12, None)]


def test_recorded_levels_are_read_exactly():
    """The fast readers against orjson on the recording (not only through the Normalizer)."""
    recs = records(BTC)
    frames = [payload for kind, payload, _, _ in recs if kind == "ws"][:700]
    got = batch.read_diff_frames(frames)
    assert got is not None
    _assert_frame(got.rows, _expected_diff_rows(frames))
    bodies = [payload for kind, payload, _, _ in recs if kind == "rest_snapshot"][:3]
    recv = [7 * 10**18 + i for i in range(len(bodies))]
    snap = batch.read_snapshot_bodies(bodies, recv, "replay")
    assert snap is not None
    _assert_frame(snap.rows, _expected_snapshot_rows(bodies, recv, "replay"))
    assert snap.rows.height == sum(
        len(orjson.loads(b)["bids"]) + len(orjson.loads(b)["asks"]) for b in bodies
    )


@pytest.mark.parametrize(
    "head",
    [
        b'"lastUpdateId":9223372036854775808',  # one past Int64
        b'"lastUpdateId":5,"E":99999999999999999999',
        b'"lastUpdateId":5,"T":-9223372036854775809',
        b'"lastUpdateId":5,"E":300000000000000',  # outside the time window
        b'"lastUpdateId":5,"E":1723161256007,"T":946684799999',
        b'"lastUpdateId":5,"T":4102444800000',
        b'"lastUpdateId":5,"T":6,"E":7',  # out of order
        b'"E":7,"lastUpdateId":5',
        b'"lastUpdateId":5,"E":7,"E":7',
        b'"lastUpdateId":5,"E":null',
        b'"lastUpdateId":05',
        b'"lastUpdateId":5.0',
        b'"lastUpdateId":-',
        b'"lastUpdateId":5,',
        b'"lastUpdateId":"5"',
    ],
)
def test_unusual_snapshot_heads_go_to_the_simple_path(head):
    ok = b'[["1","2"]]'
    assert batch.read_snapshot_bodies([_snapshot_raw(ok, ok, head)], [1], "poll") is None


def test_snapshot_integers_at_the_int64_limits_are_read():
    """Ids at the Int64 limits; times at the edges of the time window (`fields.TIME_MIN_MS`:
    the parser refuses any other, tests/test_time_window.py)."""
    ok = b'[["1","2"]]'
    heads = [
        b'"lastUpdateId":9223372036854775807,"E":946684800000',
        b'"lastUpdateId":-9223372036854775808,"E":4102444799999,"T":946684800000',
        b'"lastUpdateId":-0,"T":4102444799999',
    ]
    bodies = [_snapshot_raw(ok, ok, h) for h in heads]
    got = batch.read_snapshot_bodies(bodies, [1, 2, 3], "poll")
    assert got is not None
    _assert_frame(got.rows, _expected_snapshot_rows(bodies, [1, 2, 3], "poll"))
