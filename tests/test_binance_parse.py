"""Binance parsers on the shared recordings and on broken payloads."""

from __future__ import annotations

import json

import orjson
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage
from cryptoflow.exchanges.base import Control
from cryptoflow.exchanges.binance.parse import (
    parse_instruments,
    parse_rest_snapshot,
    parse_ws_message,
)
from cryptoflow.models import DepthDiff, SnapshotSource
from cryptoflow.tools.recording import iter_records

REC = RECORDED / "binance"
SUSHI = REC / "futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"
BTC = REC / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz"

pytestmark = pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")

DIFF = {
    "e": "depthUpdate",
    "E": 1626992741037,
    "T": 1626992741024,
    "s": "SUSHIUSDT",
    "U": 600859599090,
    "u": 600859600917,
    "pu": 600859598061,
    "b": [["7.5040", "813"], ["7.6090", "0"]],
    "a": [["7.6150", "1563"]],
}


@pytest.mark.parametrize(
    ("path", "diffs", "levels", "snapshots", "snapshot_levels"),
    [(SUSHI, 444, 4982, 2, 3372), (BTC, 6551, 443521, 1, 2000)],
)
def test_recordings_parse_completely(path, diffs, levels, snapshots, snapshot_levels):
    n_diffs = n_levels = n_snaps = n_snap_levels = 0
    for rec in iter_records(path):
        if rec.kind == "ws":
            # the recorded combined-stream frame, as bytes, as str and already decoded
            raw = orjson.dumps(rec.msg)
            items = parse_ws_message(raw, rec.recv_ns)
            assert items == parse_ws_message(raw.decode(), rec.recv_ns)
            assert items == parse_ws_message(rec.msg, rec.recv_ns)
            # the bare event (/ws/<stream> path) gives the same diff
            assert items == parse_ws_message(orjson.dumps(rec.msg["data"]), rec.recv_ns)
            (d,) = items
            data = rec.msg["data"]
            assert isinstance(d, DepthDiff)
            assert (d.first_update_id, d.last_update_id, d.prev_update_id) == (
                data["U"],
                data["u"],
                data["pu"],
            )
            assert d.event_time == data["E"] and d.transaction_time == data["T"]
            assert d.receive_time == rec.recv_ns and d.symbol == data["s"]
            assert [list(x) for x in d.bids] == data["b"] and [list(x) for x in d.asks] == data["a"]
            n_diffs += 1
            n_levels += len(d.bids) + len(d.asks)
        else:
            sym = rec.channel.split("symbol=")[1].split("&")[0]
            s = parse_rest_snapshot(orjson.dumps(rec.msg), sym, rec.recv_ns)
            assert s.last_update_id == rec.msg["lastUpdateId"]
            assert s.event_time == rec.msg["E"] and s.transaction_time == rec.msg["T"]
            assert s.source is SnapshotSource.POLL and s.symbol == sym
            n_snaps += 1
            n_snap_levels += len(s.bids) + len(s.asks)
    assert (n_diffs, n_levels, n_snaps, n_snap_levels) == (
        diffs,
        levels,
        snapshots,
        snapshot_levels,
    )


def test_symbol_map_applies():
    (d,) = parse_ws_message(DIFF, 1, {"SUSHIUSDT": "SUSHI-NORM"})
    assert d.symbol == "SUSHI-NORM"
    (d,) = parse_ws_message(DIFF, 1, {})
    assert d.symbol == "SUSHIUSDT"


def test_acks_errors_and_other_events():
    assert parse_ws_message(b'{"result":null,"id":1}', 0) == Control("ack", detail="1")
    err = parse_ws_message(b'{"error":{"code":2,"msg":"Invalid request"},"id":3}', 0)
    assert isinstance(err, Control) and err.kind == "error" and "Invalid request" in err.detail
    other = parse_ws_message({"stream": "x@aggTrade", "data": {"e": "aggTrade"}}, 0)
    assert other == Control("other", detail="aggTrade")


def test_snapshot_without_event_time_falls_back():
    body = {"lastUpdateId": 5, "T": 1_600_000_000_000, "bids": [], "asks": []}
    assert parse_rest_snapshot(json.dumps(body), "X", 7_000_000_000).event_time == 1_600_000_000_000
    body = {"lastUpdateId": 5, "bids": [["1", "2"]], "asks": []}
    s = parse_rest_snapshot(json.dumps(body).encode(), "X", 7_000_000_000)
    assert (s.event_time, s.transaction_time) == (7000, None)


@pytest.mark.parametrize("field", ["E", "U", "u", "pu", "b", "a", "s"])
def test_missing_diff_field_is_named(field):
    data = {k: v for k, v in DIFF.items() if k != field}
    with pytest.raises(MalformedMessage, match=f"'{field}'") as info:
        parse_ws_message(orjson.dumps({"stream": "sushiusdt@depth", "data": data}), 0)
    assert info.value.exchange == "binance"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("U", "12"),
        ("pu", 1.5),
        ("b", {"7.5": "1"}),
        ("b", [["7.5"]]),
        ("a", [["7.5", 3]]),
        ("a", [["7.5", "1", "x"]]),
        ("a", ["7.5"]),
        ("b", ["12", "34"]),  # two-character strings: not split into ("1", "2")
    ],
)
def test_bad_diff_field_is_named(field, value):
    with pytest.raises(MalformedMessage, match=f"'{field}'") as info:
        parse_ws_message({**DIFF, field: value}, 0)
    assert info.value.symbol == "SUSHIUSDT"


@pytest.mark.parametrize("raw", [b"{not json", b"", "[1, 2]", b'{"id": 1}'])
def test_malformed_frames(raw):
    with pytest.raises(MalformedMessage):
        parse_ws_message(raw, 0)


@pytest.mark.parametrize("field", ["lastUpdateId", "bids", "asks"])
def test_missing_snapshot_field_is_named(field):
    body = {"lastUpdateId": 5, "E": 1_600_000_000_001, "T": 1_600_000_000_000}
    body |= {"bids": [], "asks": []}
    del body[field]
    with pytest.raises(MalformedMessage, match=f"'{field}'") as info:
        parse_rest_snapshot(orjson.dumps(body), "BTCUSDT", 0)
    assert info.value.symbol == "BTCUSDT"
    with pytest.raises(MalformedMessage, match="invalid JSON"):
        parse_rest_snapshot(b'{"lastUpdateId": ', "BTCUSDT", 0)


def test_instruments():
    body = {
        "symbols": [
            {
                "symbol": "BTCUSDT",
                "status": "TRADING",
                "contractType": "PERPETUAL",
                "filters": [
                    {"filterType": "PRICE_FILTER", "tickSize": "0.10"},
                    {"filterType": "LOT_SIZE", "stepSize": "0.001"},
                ],
            },
            {"symbol": "BTCUSDT_240927", "status": "TRADING", "contractType": "CURRENT_QUARTER"},
            {"symbol": "OLDUSDT", "status": "SETTLING", "contractType": "PERPETUAL"},
        ]
    }
    out = parse_instruments(orjson.dumps(body))
    assert set(out) == {"BTCUSDT", "OLDUSDT"}
    assert out["BTCUSDT"].status_ok and not out["OLDUSDT"].status_ok
    assert (out["BTCUSDT"].tick_size, out["BTCUSDT"].step_size) == ("0.10", "0.001")
    assert out["BTCUSDT"].multiplier_text == "1"
    with pytest.raises(MalformedMessage, match="'symbols'"):
        parse_instruments(b'{"rateLimits": []}')
