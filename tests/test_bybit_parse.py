"""Bybit v5 linear parsers on the shared recordings and on documented payloads."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage, RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.base import Control
from cryptoflow.exchanges.bybit import rules
from cryptoflow.exchanges.bybit.parse import (
    parse_instruments,
    parse_rest_snapshot,
    parse_ws_message,
)
from cryptoflow.models import DepthDiff, SnapshotSource

REC = RECORDED / "bybit"
OB1 = REC / "linear_orderbook1_BAND_RAD_SNT_AIOZ_2025-06-13.jsonl"
OB500 = REC / "linear_orderbook500_XRPUSDT_2024-12-01.jsonl"

pytestmark = pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")


def _records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _parse_all(records: list[dict]) -> list[DepthDiff]:
    out: list[DepthDiff] = []
    for r in records:
        item = parse_ws_message(orjson.dumps(r["msg"]), r["recv_ns"])
        assert isinstance(item, list) and len(item) == 1
        out.extend(item)
    return out


def _breaks_normalized(diffs: list[DepthDiff]) -> int:
    """The shared sync machine's check: prev == previous last (snapshots reset)."""
    breaks, last = 0, None
    for d in diffs:
        if not d.is_snapshot and d.prev_update_id != last:
            breaks += 1
        last = d.last_update_id
    return breaks


def _breaks_raw(records: list[dict]) -> int:
    """Independent: Bybit's own rule on the raw messages, u == previous u + 1."""
    breaks, prev_u = 0, None
    for r in records:
        m = r["msg"]
        u = m["data"]["u"]
        if m["type"] == "delta" and u != 1 and u != prev_u + 1:
            breaks += 1
        prev_u = u
    return breaks


def test_orderbook1_counts_per_symbol() -> None:
    diffs = _parse_all(_records(OB1))
    assert len(diffs) == 198
    assert all(d.is_snapshot and d.prev_update_id is None for d in diffs)
    assert Counter(d.symbol for d in diffs) == {
        "BANDUSDT": 45,
        "RADUSDT": 18,
        "SNTUSDT": 107,
        "AIOZUSDT": 28,
    }
    first = diffs[0]
    assert first.exchange == "bybit" and first.market == "futures"
    assert first.bids == [("0.6131", "17.9")] and first.asks == [("0.6134", "35.4")]
    assert first.event_time == 1749833474773 and first.transaction_time == 1749833474768
    assert first.first_update_id == first.last_update_id == 24042997
    assert first.receive_time == 1749833474285131500
    # 16 pushes repeat the previous u of their symbol
    last_u: dict[str, int] = {}
    repeats = 0
    for d in diffs:
        repeats += last_u.get(d.symbol) == d.last_update_id
        last_u[d.symbol] = d.last_update_id
    assert repeats == 16


def test_orderbook500_snapshot_and_deltas() -> None:
    recs = _records(OB500)
    diffs = _parse_all(recs)
    assert [d.is_snapshot for d in diffs] == [True] + [False] * 49
    snap = diffs[0]
    assert len(snap.bids) == 500 and len(snap.asks) == 500
    assert snap.bids[0] == ("1.9531", "6203") and snap.prev_update_id is None
    assert sum(len(d.bids) + len(d.asks) for d in diffs) == 3966
    assert diffs[0].last_update_id == 20254869 and diffs[-1].last_update_id == 20254918
    for d in diffs[1:]:
        assert d.first_update_id == d.last_update_id
        assert d.prev_update_id == d.last_update_id - 1
    assert _breaks_normalized(diffs) == 0 == _breaks_raw(recs)


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        ({5, 20, 40}, 3),  # three separate holes
        ({10, 11, 30}, 2),  # two adjacent deltas make one hole
        ({7, 25, 49}, 2),  # the last delta leaves no hole anyone can see
    ],
)
def test_orderbook500_removed_deltas_are_breaks(removed: set[int], expected: int) -> None:
    recs = [r for i, r in enumerate(_records(OB500)) if i not in removed]
    assert _breaks_raw(recs) == expected
    assert _breaks_normalized(_parse_all(recs)) == expected


def test_u_equal_1_is_a_snapshot() -> None:
    raw = (
        b'{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":1671179923046,'
        b'"data":{"s":"BTCUSDT","b":[["1","2"]],"a":[],"u":1,"seq":5},"cts":1671179923044}'
    )
    (d,) = parse_ws_message(raw, 0)
    assert d.is_snapshot and d.prev_update_id is None and d.last_update_id == 1


def test_documented_delta_and_symbol_map() -> None:
    raw = (
        '{"topic": "orderbook.50.BTCUSDT", "type": "delta", "ts": 1671179923046,'
        ' "data": {"s": "BTCUSDT", "b": [], "a": [["17440.50", "78.857"], ["17442.00", "1.510"]],'
        ' "u": 13079593, "seq": 22520573261}, "cts": 1671179923044}'
    )
    (d,) = parse_ws_message(raw, 7, {"BTCUSDT": "BTC-NORM"})
    assert d.symbol == "BTC-NORM"
    assert (d.first_update_id, d.last_update_id, d.prev_update_id) == (13079593,) * 2 + (13079592,)
    assert d.bids == [] and d.asks == [("17440.50", "78.857"), ("17442.00", "1.510")]
    assert d.transaction_time == 1671179923044 and not d.is_snapshot


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b'{"success":true,"ret_msg":"","conn_id":"x","req_id":"1","op":"subscribe"}', "ack"),
        (b'{"op":"pong","args":["1671179923046"],"conn_id":"x"}', "pong"),
        (b'{"success":true,"ret_msg":"pong","conn_id":"x","op":"ping"}', "pong"),
        (b'{"success":false,"ret_msg":"error:handler not found","op":"subscribe"}', "error"),
        (b'{"topic":"tickers.BTCUSDT","type":"snapshot","data":{}}', "other"),
    ],
)
def test_control_frames(raw: bytes, kind: str) -> None:
    item = parse_ws_message(raw, 0)
    assert isinstance(item, Control) and item.kind == kind


DOC_REST = (
    b'{"retCode": 0, "retMsg": "OK", "time": 1672765737734,'
    b' "result": {"s": "BTCUSDT", "b": [["16493.50", "0.006"], ["16493.00", "0.100"]],'
    b' "a": [["16611.00", "0.029"], ["16612.00", "0.213"]],'
    b' "ts": 1672765737733, "u": 5277055, "seq": 7961638724, "cts": 1672765737731}}'
)


def test_rest_snapshot_documented() -> None:
    s = parse_rest_snapshot(DOC_REST, "BTCUSDT", 99, SnapshotSource.RESYNC)
    assert s.last_update_id == 5277055
    assert s.event_time == 1672765737733 and s.transaction_time == 1672765737731
    assert s.bids == [("16493.50", "0.006"), ("16493.00", "0.100")]
    assert s.asks[1] == ("16612.00", "0.213")
    assert s.receive_time == 99 and s.source is SnapshotSource.RESYNC
    assert s.exchange == "bybit" and s.symbol == "BTCUSDT"


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        (10006, RateLimited),
        (10018, RateLimited),
        (10016, ServerError),
        (10001, RequestRejected),
        (110001, RequestRejected),
    ],
)
def test_rest_ret_code_errors(code: int, exc: type[Exception]) -> None:
    body = orjson.dumps({"retCode": code, "retMsg": "Too many visits!", "result": {}})
    with pytest.raises(exc) as ei:
        parse_rest_snapshot(body, "BTCUSDT", 0)
    assert str(code) in str(ei.value)
    if exc is RateLimited:
        assert ei.value.retry_after > 0
    else:
        assert not isinstance(ei.value, RateLimited)


@pytest.mark.parametrize("code", [b"[1]", b'{"code":10006}', b"true", b"0.0", b"10006.0"])
def test_rest_ret_code_of_another_type_is_malformed(code: bytes) -> None:
    """Was: a list or object raised TypeError (`code in rate_limited` hashes it), which
    crashed the poll task; `true` and `0.0` compared equal to the codes 1 and 0."""
    body = b'{"retCode":' + code + b',"retMsg":"OK","result":{"b":[],"a":[],"ts":1,"u":1}}'
    with pytest.raises(MalformedMessage) as ei:
        parse_rest_snapshot(body, "BTCUSDT", 0)
    assert str(ei.value).startswith("bybit/BTCUSDT: field 'retCode' is not an integer or string")
    with pytest.raises(MalformedMessage, match="field 'retCode' is not an integer"):
        parse_instruments(body)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"retCode":0,"result":{"b":[],"a":[],"ts":1671179923046}}', "'u'"),
        (b'{"retCode":0,"result":{"b":[["1"]],"a":[],"ts":1671179923046,"u":2}}', "result.b"),
        (b'{"retCode":0,"result":{"b":[],"a":[[1.5,"2"]],"ts":1671179923046,"u":2}}', "result.a"),
        (b'{"retCode":0,"result":{"b":[],"a":"x","ts":1671179923046,"u":2}}', "result.a"),
        (b'{"retCode":0}', "result"),
        (b"not json", "JSON"),
    ],
)
def test_rest_malformed(body: bytes, field: str) -> None:
    with pytest.raises(MalformedMessage, match=field) as ei:
        parse_rest_snapshot(body, "BTCUSDT", 0)
    assert ei.value.exchange == "bybit"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (
            b'{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":1671179923046,'
            b'"data":{"b":[],"a":[]}}',
            "u",
        ),
        (
            b'{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":1671179923046,"data":{"b":{},"a":[],"u":3}}',
            "data.b",
        ),
        (  # a string level: not split into ("1", "6")
            b'{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":1671179923046,'
            b'"data":{"b":["16493.50"],"a":[],"u":3}}',
            "data.b",
        ),
        (  # a symbol that is not a string (was a TypeError: the connection dropped)
            b'{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":1671179923046,'
            b'"data":{"s":["BTCUSDT"],"b":[],"a":[],"u":3}}',
            "data.s",
        ),
        (
            b'{"topic":"orderbook.50.BTCUSDT","type":"weird","ts":1671179923046,"data":{"u":3}}',
            "type",
        ),
        (b'{"topic":"orderbook.50.BTCUSDT","type":"delta","ts":1671179923046}', "data"),
        (b"[1,2]", "object"),
    ],
)
def test_ws_malformed_names_field_and_symbol(raw: bytes, field: str) -> None:
    with pytest.raises(MalformedMessage, match=field) as ei:
        parse_ws_message(raw, 0)
    if raw.startswith(b'{"topic"'):
        assert ei.value.symbol == "BTCUSDT"


def test_instruments() -> None:
    body = orjson.dumps(
        {
            "retCode": 0,
            "retMsg": "OK",
            "result": {
                "category": "linear",
                "list": [
                    {
                        "symbol": "BTCUSDT",
                        "contractType": "LinearPerpetual",
                        "status": "Trading",
                        "priceFilter": {"minPrice": "0.10", "tickSize": "0.10"},
                        "lotSizeFilter": {"maxOrderQty": "100.000", "qtyStep": "0.001"},
                    },
                    {
                        "symbol": "1000PEPEUSDT",
                        "status": "Closed",
                        "priceFilter": {"tickSize": "0.0000001"},
                        "lotSizeFilter": {"qtyStep": "100"},
                    },
                ],
                "nextPageCursor": "",
            },
        }
    )
    inst = parse_instruments(body)
    assert inst["BTCUSDT"].status_ok and inst["BTCUSDT"].multiplier == 1.0
    assert inst["BTCUSDT"].tick_size == "0.10" and inst["BTCUSDT"].step_size == "0.001"
    assert not inst["1000PEPEUSDT"].status_ok
    with pytest.raises(RateLimited):
        parse_instruments(b'{"retCode":10006,"retMsg":"Too many visits!"}')


def test_rules_ids() -> None:
    assert rules.diff_ids(10, False) == (10, 10, 9)
    assert rules.diff_ids(10, True) == (10, 10, None)
    assert rules.is_continuous(9, 10) and not rules.is_continuous(9, 11)


@pytest.mark.parametrize(("removed", "expected"), [(set(), 0), ({5, 20, 40}, 3)])
def test_shared_sync_machine_sees_the_same_breaks(removed: set[int], expected: int) -> None:
    from cryptoflow.book.sync import BookSync

    recs = [r for i, r in enumerate(_records(OB500)) if i not in removed]
    sync = BookSync("bybit", "futures", "XRPUSDT", rules.RULES)
    gaps = [g for d in _parse_all(recs) for g in sync.on_diff(d).gaps]
    assert sync.counters.breaks == expected
    assert len([g for g in gaps if g.kind == "sequence_break"]) == expected
