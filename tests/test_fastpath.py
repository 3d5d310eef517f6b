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
