"""An integer id or time outside the signed 64-bit range is a malformed message.

Ids and times are stored in Int64 columns; a bigger value used to pass the parsers and
fail the writer's polars compaction later, for every symbol of the flush. Each venue's
parser must now refuse it at the edge with a `MalformedMessage` naming the field, and
still accept the largest value that fits (2**63 - 1).

Inputs: a real message of each venue where one exists (the shared recordings for Binance
and Bybit WS), else the documented example shapes (Bybit REST, OKX with seqId/prevSeqId,
which its recordings predate; KuCoin from `tests/data/kucoin`), one field changed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage
from cryptoflow.exchanges.binance import parse as binance
from cryptoflow.exchanges.bybit import parse as bybit
from cryptoflow.exchanges.fields import INT64_MAX, INT64_MIN, Fields
from cryptoflow.exchanges.kucoin import parse as kucoin
from cryptoflow.exchanges.okx import parse as okx
from cryptoflow.models import DepthDiff, DepthSnapshot
from cryptoflow.tools.recording import iter_records

BINANCE_REC = RECORDED / "binance" / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"
BYBIT_REC = RECORDED / "bybit" / "linear_orderbook500_XRPUSDT_2024-12-01.jsonl"
KUCOIN_DATA = Path(__file__).parent / "data" / "kucoin"

needs_rec = pytest.mark.skipif(
    not (BINANCE_REC.exists() and BYBIT_REC.exists()), reason="shared recordings not present"
)

TOO_BIG = 2**63
TOO_SMALL = -(2**63) - 1


def _first(path: Path, kind: str) -> dict[str, Any]:
    """The first recorded `kind` payload that is not a Bybit `snapshot` push, as decoded
    JSON (a fresh copy each call)."""
    for rec in iter_records(path):
        if rec.kind == kind and rec.msg.get("type") != "snapshot":
            return rec.msg
    raise AssertionError(f"no {kind} record in {path}")


def _dumps(msg: Any) -> bytes:
    """The standard library's encoder: orjson's refuses integers below -2**63."""
    return json.dumps(msg, separators=(",", ":")).encode()


# --- WS diffs: (message with the field set to v) for each venue ----------------------


def binance_diff(field: str, v: int) -> bytes:
    msg = _first(BINANCE_REC, "ws")
    msg["data"][field] = v
    return _dumps(msg)


def bybit_diff(field: str, v: int) -> bytes:
    msg = _first(BYBIT_REC, "ws")
    assert msg["type"] == "delta"
    (msg["data"] if field == "u" else msg)[field] = v
    return _dumps(msg)


OKX_UPDATE = {
    "arg": {"channel": "books", "instId": "BTC-USDT-SWAP"},
    "action": "update",
    "data": [
        {
            "asks": [["8476.98", "0", "0", "0"]],
            "bids": [],
            "ts": "1597026383185",
            "checksum": 0,
            "prevSeqId": 123456,
            "seqId": 123471,
        }
    ],
}


def okx_diff(field: str, v: int) -> bytes:
    msg = orjson.loads(orjson.dumps(OKX_UPDATE))
    # OKX sends `ts` as a decimal string: the string path must be bounded too
    msg["data"][0][field] = str(v) if field == "ts" else v
    return _dumps(msg)


def kucoin_diff(field: str, v: int) -> bytes:
    msg = orjson.loads((KUCOIN_DATA / "level2.json").read_bytes())
    msg["data"][field] = v
    return _dumps(msg)


WS: dict[str, tuple[Callable[..., Any], Callable[[str, int], bytes]]] = {
    "binance": (binance.parse_ws_message, binance_diff),
    "bybit": (bybit.parse_ws_message, bybit_diff),
    "okx": (okx.parse_ws_message, okx_diff),
    "kucoin": (kucoin.parse_ws_message, kucoin_diff),
}

#: (venue, field, how the error names it): each venue's sequence/update ids and its time
WS_FIELDS = [
    pytest.param("binance", "u", "'u'", marks=needs_rec),
    pytest.param("binance", "U", "'U'", marks=needs_rec),
    pytest.param("binance", "pu", "'pu'", marks=needs_rec),
    pytest.param("binance", "E", "'E'", marks=needs_rec),
    pytest.param("bybit", "u", "data.'u'", marks=needs_rec),
    pytest.param("bybit", "ts", "'ts'", marks=needs_rec),
    pytest.param("okx", "seqId", "data[0].'seqId'"),
    pytest.param("okx", "prevSeqId", "data[0].'prevSeqId'"),
    pytest.param("okx", "ts", "data[0].'ts'"),
    pytest.param("kucoin", "sequence", "data.'sequence'"),
    pytest.param("kucoin", "timestamp", "data.'timestamp'"),
]


def _refused(call: Callable[[], Any], named: str, v: int) -> MalformedMessage:
    """`call` raises MalformedMessage naming the field: for 2**63 (which orjson decodes
    to an int) the range error itself; below -2**63 orjson gives a float, already "not
    an integer", while decimal strings and `json.loads` give the range error."""
    with pytest.raises(MalformedMessage) as ei:
        call()
    text = str(ei.value)
    if v == TOO_BIG:
        assert f"field {named} is out of the 64-bit range: {v}" in text, text
    else:
        assert f"field {named} is " in text, text
    return ei.value


@pytest.mark.parametrize(("venue", "field", "named"), WS_FIELDS)
@pytest.mark.parametrize("v", [TOO_BIG, TOO_SMALL])
def test_ws_field_outside_int64_is_malformed(venue: str, field: str, named: str, v: int) -> None:
    parse, diff = WS[venue]
    err = _refused(lambda: parse(diff(field, v), 1), named, v)
    assert err.exchange == venue and err.symbol


#: the fields above that are times: they fit Int64 at INT64_MAX, but lie far outside the
#: time window (`fields.TIME_MIN_MS`; tests/test_time_window.py)
TIMES = {"E", "ts", "timestamp"}


@pytest.mark.parametrize(("venue", "field", "named"), WS_FIELDS)
def test_ws_field_at_int64_max_still_parses(venue: str, field: str, named: str) -> None:
    parse, diff = WS[venue]
    if field in TIMES:
        far = re.escape(f"field {named} is {INT64_MAX}") + ".*: not a time within"
        with pytest.raises(MalformedMessage, match=far):
            parse(diff(field, INT64_MAX), 1)
        return
    out = parse(diff(field, INT64_MAX), 1)
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], DepthDiff)
    ids = (out[0].first_update_id, out[0].last_update_id, out[0].prev_update_id)
    assert all(i is None or INT64_MIN <= i <= INT64_MAX for i in ids)
    if field in ("u", "seqId", "sequence"):
        assert out[0].last_update_id == INT64_MAX


@pytest.mark.parametrize(
    ("venue", "field"),
    [pytest.param("bybit", "u", marks=needs_rec), ("kucoin", "sequence")],
)
def test_ws_id_whose_prev_would_underflow_is_malformed(venue: str, field: str) -> None:
    """Bybit and KuCoin store prev = id - 1: id = INT64_MIN would give a prev Int64 cannot
    hold, so it is refused; one more parses."""
    parse, diff = WS[venue]
    with pytest.raises(MalformedMessage, match=f"'{field}' is .*: the id before it would not"):
        parse(diff(field, INT64_MIN), 1)
    (d,) = parse(diff(field, INT64_MIN + 1), 1)
    assert d.prev_update_id == INT64_MIN


# --- REST snapshots --------------------------------------------------------------------


def binance_snapshot(v: int) -> bytes:
    msg = _first(BINANCE_REC, "rest_snapshot")
    msg["lastUpdateId"] = v
    return _dumps(msg)


BYBIT_REST = (  # the Bybit v5 docs' example of GET /v5/market/orderbook
    b'{"retCode":0,"retMsg":"OK","result":{"s":"BTCUSDT","b":[["16493.50","0.006"]],'
    b'"a":[["16611.00","0.029"]],"ts":1672765737733,"u":5277055,"seq":7961638724,'
    b'"cts":1672765737731},"retExtInfo":{},"time":1672765737734}'
)
OKX_REST = (  # the OKX v5 docs' example of GET /api/v5/market/books, with seqId
    b'{"code":"0","msg":"","data":[{"asks":[["41006.8","0.60038921","0","1"]],'
    b'"bids":[["41006.3","0.30178218","0","2"]],"ts":"1629966436396","seqId":987}]}'
)


def bybit_snapshot(v: int) -> bytes:
    return BYBIT_REST.replace(b'"u":5277055', b'"u":%d' % v)


def okx_snapshot(v: int) -> bytes:
    return OKX_REST.replace(b'"seqId":987', b'"seqId":%d' % v)


def kucoin_snapshot(v: int) -> bytes:
    body = (KUCOIN_DATA / "snapshot.json").read_bytes()
    assert b'"sequence": 100,' in body
    return body.replace(b'"sequence": 100,', b'"sequence": %d,' % v)


REST = [
    pytest.param(binance.parse_rest_snapshot, binance_snapshot, "'lastUpdateId'", marks=needs_rec),
    pytest.param(bybit.parse_rest_snapshot, bybit_snapshot, "result.'u'"),
    pytest.param(okx.parse_rest_snapshot, okx_snapshot, "data[0].'seqId'"),
    pytest.param(kucoin.parse_rest_snapshot, kucoin_snapshot, "data.'sequence'"),
]


@pytest.mark.parametrize(("parse", "body", "named"), REST)
def test_rest_snapshot_id_outside_int64_is_malformed(
    parse: Callable[..., DepthSnapshot], body: Callable[[int], bytes], named: str
) -> None:
    for v in (TOO_BIG, TOO_SMALL):
        err = _refused(lambda v=v: parse(body(v), "BTCUSDT", 1), named, v)
        assert err.symbol == "BTCUSDT"
    assert parse(body(INT64_MAX), "BTCUSDT", 1).last_update_id == INT64_MAX
    assert parse(body(INT64_MIN), "BTCUSDT", 1).last_update_id == INT64_MIN


# --- the shared reader itself ---------------------------------------------------------


@pytest.mark.parametrize("wire", [int, str])
def test_fields_int_bounds_json_ints_and_decimal_strings(wire: Callable[[int], Any]) -> None:
    f = Fields("x")
    for v in (INT64_MIN, -1, 0, INT64_MAX):
        assert f.int({"k": wire(v)}, "k", "S") == v
    for v in (TOO_SMALL, TOO_BIG, 10**30):
        with pytest.raises(MalformedMessage, match=f"'k' is out of the 64-bit range: {v}"):
            f.int({"k": wire(v)}, "k", "S")
    with pytest.raises(MalformedMessage, match=f"'k' is {INT64_MIN}: the id before it would"):
        f.int({"k": wire(INT64_MIN)}, "k", "S", lo=INT64_MIN + 1)
    assert f.opt_int({"k": None}, "k", "S") is None
    with pytest.raises(MalformedMessage, match="out of the 64-bit range"):
        f.opt_int({"k": wire(TOO_BIG)}, "k", "S")
