"""Normalizer: rows, gaps, resync requests, and frames with exactly the stored schemas."""

from __future__ import annotations

from pathlib import Path

import attrs
import polars as pl
import pytest
from paths import RECORDED

from cryptoflow.exchanges.binance.parse import parse_ws_message
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import SCHEMAS, Dataset, DepthDiff, DepthSnapshot, GapKind, StreamEvent
from cryptoflow.pipeline.normalize import (
    Normalizer,
    excess_digit_count,
    frame_from_batch,
    frame_from_columns,
)
from cryptoflow.tools.recording import iter_records
from cryptoflow.tools.replay import VENUES

REC = RECORDED / "binance"
RECORDINGS = [
    REC / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl",
    REC / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz",
]


def items_of(path: Path) -> list:
    out: list = []
    for rec in iter_records(path):
        if rec.kind == "ws":
            out.extend(parse_ws_message(rec.msg, rec.recv_ns))
        else:
            out.append(VENUES["binance"].parse_rest(rec, {}))
    return out


def diff(first, last, prev, bids=(), asks=(), symbol="BTCUSDT", snap=False) -> DepthDiff:
    return DepthDiff(
        "binance", "futures", symbol, last, last - 1, first, last, prev,
        [list(x) for x in bids], [list(x) for x in asks], last * 1_000_000, is_snapshot=snap,
    )  # fmt: skip


def snapshot(last, bids=(), asks=(), symbol="BTCUSDT") -> DepthSnapshot:
    return DepthSnapshot(
        "binance", "futures", symbol, last, None, last,
        [list(x) for x in bids], [list(x) for x in asks], last * 1_000_000,
    )  # fmt: skip


def merged(outputs) -> dict:
    """(dataset, symbol) -> concatenated columns, from a list of NormalizeOutput."""
    acc: dict = {}
    for out in outputs:
        for b in out.batches:
            cols = acc.setdefault((b.dataset, b.symbol), {k: [] for k in b.columns})
            for k, v in b.columns.items():
                cols[k].extend(v)
    return acc


@pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")
@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name[:30])
def test_feed_many_equals_feed_one_by_one(path):
    items = items_of(path)
    slow = Normalizer({"binance": RULES})
    simple = merged([slow.feed(item) for item in items])
    fast = Normalizer({"binance": RULES})
    outs = [fast.feed_many(items[i : i + 500]) for i in range(0, len(items), 500)]
    assert merged(outs) == simple
    assert fast.totals() == slow.totals()
    deltas = sum(len(c["price"]) for (ds, _), c in simple.items() if ds is Dataset.DELTAS)
    assert deltas == sum(len(i.bids) + len(i.asks) for i in items if isinstance(i, DepthDiff))


def test_outputs_gaps_requests_and_stream_snapshots():
    n = Normalizer({"binance": RULES})
    out = n.feed(diff(1, 10, 0, bids=[("1.5", "2")]))
    assert out.resync_requests == [("binance", "BTCUSDT")]
    assert out.counters["delta_rows"] == 1
    (batch,) = out.batches
    assert batch.dataset is Dataset.DELTAS and batch.rows == 1
    assert batch.columns["price"] == ["1.5"] and batch.columns["prev_update_id"] == [0]
    out = n.feed(snapshot(5, bids=[("1.5", "1"), ("1.4", "1")], asks=[("1.6", "1")]))
    (batch,) = out.batches
    assert batch.dataset is Dataset.SNAPSHOTS and batch.columns["level"] == [0, 1, 0]
    assert batch.columns["source"] == ["poll"] * 3 and out.resync_requests == []
    n.feed(StreamEvent("binance", "futures", "BTCUSDT", GapKind.CONSUMER_OVERLOAD, 0, "", 4))
    out = n.feed(diff(11, 20, 10, asks=[("1.6", "0")]))
    assert [g.kind for g in out.gaps] == [GapKind.CONSUMER_OVERLOAD]
    assert out.resync_requests == [("binance", "BTCUSDT")]
    gaps = [b for b in out.batches if b.dataset is Dataset.GAPS]
    assert gaps[0].columns["kind"] == ["consumer_overload"]
    assert gaps[0].columns["timestamp"] == [20]  # end_time
    out = n.feed(diff(21, 21, None, bids=[("1.5", "3")], snap=True))
    assert [g.kind for g in out.gaps] == [GapKind.RESYNC]
    snaps = [b for b in out.batches if b.dataset is Dataset.SNAPSHOTS]
    assert snaps[0].columns["source"] == ["stream"]
    for b in out.batches:
        assert frame_from_batch(b).schema == SCHEMAS[b.dataset]


def test_duplicates_not_recorded_and_other_symbols_independent():
    n = Normalizer({"binance": RULES})
    n.feed(diff(1, 10, 0, bids=[("1", "1")]))
    out = n.feed(diff(1, 10, 0, bids=[("1", "1")]))
    assert out.batches == [] and out.counters["dropped"] == 1
    out = n.feed(diff(50, 60, 49, bids=[("1", "1")], symbol="ETHUSDT"))
    assert out.gaps == [] and n.totals().duplicates == 1


def test_frames_have_exact_schemas_and_exact_multiplier():
    n = Normalizer({"okx": RULES})
    n.set_multiplier("okx", "BTCUSDT", "0.1")
    d = diff(1, 10, 0, bids=[("61800.20", "3"), ("0.00001234", "0.000")], asks=[("7.6", "12.5")])
    out = n.feed(attrs.evolve(d, exchange="okx"))
    (batch,) = out.batches
    assert batch.multiplier == "0.1"
    frame = frame_from_batch(batch)
    assert frame.schema == SCHEMAS[Dataset.DELTAS]
    assert frame["quantity"].to_list() == [0.3, 0.0, 1.25]
    assert frame["raw_quantity"].to_list() == [3.0, 0.0, 12.5]
    assert frame["price"].to_list() == [61800.2, 0.00001234, 7.6]
    assert frame["exchange"].to_list() == ["okx"] * 3
    assert frame["timestamp"].dt.epoch("ms").to_list() == [10] * 3
    assert frame["receive_time"].dt.epoch("us").to_list() == [10_000] * 3


def test_empty_and_null_columns_keep_schema():
    cols = {
        "timestamp": [1],
        "kind": ["reconnect"],
        "last_good_id": [None],
        "first_id_after": [5],
        "start_time": [None],
        "end_time": [1],
        "reason": [""],
        "detected_at": [123_456_789],
    }
    frame = frame_from_columns(Dataset.GAPS, "binance", "futures", "X", cols, "1")
    assert frame.schema == SCHEMAS[Dataset.GAPS]
    assert frame["detected_at"].dt.epoch("us").to_list() == [123_456]
    empty = {k: [] for k in cols}
    assert frame_from_columns(Dataset.GAPS, "b", "f", "X", empty).schema == SCHEMAS[Dataset.GAPS]


def test_excess_digit_count():
    cols = {
        "price": ["61800.20", "0.0000000012345678901234567", "123456789012345"],
        "raw_quantity": ["1234567890.1234567", "0.000", "1e-5"],
    }
    assert excess_digit_count(cols) == 2
    assert pl.Series(["1.000000000000000"]).cast(pl.Float64).item() == 1.0


@pytest.mark.parametrize("side", ["bid", "ask"])
def test_one_change_diffs_give_the_same_rows_as_the_general_path(side):
    """`_delta_rows` appends a one-level diff (KuCoin's every message) instead of
    extending: the columns must be what the general path makes of it with a twin level."""
    level = [("100.5", "2")]
    one = diff(5, 5, 4, **{f"{side}s": level})
    two = diff(5, 5, 4, **{f"{side}s": level * 2})
    cols_one, cols_two = (
        merged([Normalizer({"binance": RULES}).feed(d)])[(Dataset.DELTAS, "BTCUSDT")]
        for d in (one, two)
    )
    assert cols_one == {name: values[:1] for name, values in cols_two.items()}
    assert cols_one["side"] == [side] and cols_one["price"] == ["100.5"]
    assert cols_one["raw_quantity"] == ["2"] and cols_one["prev_update_id"] == [4]


def test_a_diff_without_levels_is_one_marker_row_unless_it_repeats_its_id():
    """KuCoin's price-0 change and an empty OKX update move the id chain on: one row with
    side, price and quantity null keeps the stored chain whole (`verify` and `book` check
    it on the stored rows alone); an OKX heartbeat (seqId == prevSeqId) moves nothing."""
    from cryptoflow.exchanges.kucoin import parse as kucoin_parse
    from cryptoflow.exchanges.kucoin.rules import RULES as KUCOIN
    from cryptoflow.exchanges.okx import parse as okx_parse
    from cryptoflow.exchanges.okx.rules import RULES as OKX

    def kucoin(seq: int, change: str) -> DepthDiff:
        raw = (
            '{"type":"message","topic":"/contractMarket/level2:XBTUSDTM","subject":"level2",'
            f'"data":{{"sequence":{seq},"change":"{change}","timestamp":1551770400000}}}}'
        )
        (d,) = kucoin_parse.parse_ws_message(raw, seq * 1000, {"XBTUSDTM": "BTCUSDT"})
        return d

    n = Normalizer({"kucoin": KUCOIN})
    n.set_multiplier("kucoin", "BTCUSDT", "0.001")
    out = n.feed_many(
        [kucoin(17, "5000.0,sell,83"), kucoin(18, "0,sell,0"), kucoin(19, "4999,buy,2")]
    )
    (batch,) = out.batches
    frame = frame_from_batch(batch)
    assert frame.schema == SCHEMAS[Dataset.DELTAS]
    assert frame["last_update_id"].to_list() == [17, 18, 19]
    assert frame["prev_update_id"].to_list() == [16, 17, 18]
    assert frame["side"].to_list() == ["ask", None, "bid"]
    assert frame["price"].to_list() == [5000.0, None, 4999.0]
    assert frame["quantity"].to_list() == [0.083, None, 0.002]
    assert frame["raw_quantity"].to_list() == [83.0, None, 2.0]
    assert out.counters["delta_rows"] == 3 and out.gaps == []

    def okx(prev: int, seq: int) -> bytes:
        return (
            b'{"arg": {"channel": "books", "instId": "BTC-USDT-SWAP"}, "action": "update",'
            b' "data": [{"asks": [], "bids": [], "ts": "1597026383185", "checksum": 0,'
            b' "prevSeqId": %d, "seqId": %d}]}' % (prev, seq)
        )

    n = Normalizer({"okx": OKX})
    items = [
        d
        for raw in (okx(10, 12), okx(12, 12), okx(12, 15))
        for d in okx_parse.parse_ws_message(raw, 1)
    ]
    out = n.feed_many(items)
    (batch,) = out.batches
    assert batch.columns["last_update_id"] == [12, 15]  # the heartbeat at 12 left no row
    assert batch.columns["side"] == [None, None] and out.gaps == []
