"""KuCoin Futures parsers on documented example payloads (no recording exists)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from cryptoflow.errors import MalformedMessage, RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.base import Control
from cryptoflow.exchanges.kucoin import rules
from cryptoflow.exchanges.kucoin.parse import (
    default_symbol,
    parse_instruments,
    parse_rest_snapshot,
    parse_ws_message,
)
from cryptoflow.models import DepthDiff, SnapshotSource

DATA = Path(__file__).parent / "data" / "kucoin"


def _b(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_documented_snapshot() -> None:
    s = parse_rest_snapshot(_b("snapshot.json"), "BTCUSDT", 42, SnapshotSource.RESYNC)
    assert s.exchange == "kucoin" and s.market == "futures" and s.symbol == "BTCUSDT"
    assert s.last_update_id == 100
    assert s.event_time == 1604643655040  # ns -> ms
    assert s.asks == [("5000", "1000"), ("6000", "1983")]
    assert s.bids == [("3200", "800"), ("3100", "100")]
    assert s.receive_time == 42 and s.source is SnapshotSource.RESYNC


def test_snapshot_numbers_keep_their_exact_value() -> None:
    s = parse_rest_snapshot(_b("snapshot_precision.json"), "BTCUSDT", 0)
    assert s.last_update_id == 1700000000123
    assert s.asks == [("27690.5", "1"), ("27690.6", "0.1"), ("27691", "0.00001")]
    assert s.bids == [("27690.4", "12.345678901234"), ("0.1", "3"), ("0.00001", "250")]
    for p, q in s.bids + s.asks:
        assert "e" not in p.lower() and "e" not in q.lower()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.1", "0.1"),
        ("1e-05", "0.00001"),
        ("1E-5", "0.00001"),
        ("27690.5", "27690.5"),
        ("27690.50", "27690.5"),
        ("5000.0", "5000"),
        ("2.5E+2", "250"),
        ("0.0", "0"),
        ("0", "0"),
        ("100", "100"),
        ("0.30000000000000004", "0.30000000000000004"),  # kept, not float-rounded
    ],
)
def test_canonical_decimal(text: str, expected: str) -> None:
    assert rules.canonical_decimal(text) == expected


def test_canonical_decimal_rejects_garbage() -> None:
    for bad in ("abc", "nan", "inf", ""):
        with pytest.raises(ValueError):
            rules.canonical_decimal(bad)
    # a hostile exponent would expand into a billion-digit string
    for huge in ("1e999999999", "1E-999999999", "1e41"):
        with pytest.raises(ValueError, match="out of range"):
            rules.canonical_decimal(huge)
    assert rules.canonical_decimal("1e40") == "1" + "0" * 40


def test_ws_change_with_a_huge_exponent_is_malformed() -> None:
    raw = (
        b'{"type":"message","topic":"/contractMarket/level2:XBTUSDTM","subject":"level2",'
        b'"data":{"sequence":5,"change":"1e999999999,buy,1","timestamp":1}}'
    )
    with pytest.raises(MalformedMessage, match="bad number"):
        parse_ws_message(raw, 0)


def test_ws_level_is_keyed_like_the_snapshot() -> None:
    snap = parse_rest_snapshot(_b("snapshot.json"), "BTCUSDT", 0)
    (d,) = parse_ws_message(_b("level2.json"), 1)
    assert d.asks == [("5000", "83")] and d.bids == []
    assert d.asks[0][0] in dict(snap.asks)  # "5000.0" on the wire, 5000.0 in REST


def test_level2_messages_ids_and_sides() -> None:
    diffs: list[DepthDiff] = []
    for name in ("level2.json", "level2_buy.json", "level2_price0.json"):
        item = parse_ws_message(_b(name), 7)
        assert isinstance(item, list) and len(item) == 1
        diffs.extend(item)
    a, b, c = diffs
    assert (a.first_update_id, a.last_update_id, a.prev_update_id) == (18, 18, 17)
    assert a.symbol == "BTCUSDT" and a.event_time == 1551770400000 and a.receive_time == 7
    assert b.bids == [("3200", "0")] and b.asks == []
    # price 0: no level, but the sequence still counts
    assert c.bids == [] and c.asks == [] and c.last_update_id == 20
    assert b.prev_update_id == a.last_update_id and c.prev_update_id == b.last_update_id
    assert not any(d.is_snapshot for d in diffs)


def test_sync_anchor_on_snapshot_sequence() -> None:
    """Shared machine: drop last < L; first applied needs first <= L+1 <= last+1."""
    L = 100
    seqs = [98, 99, 100, 101, 102]
    diffs = []
    for s in seqs:
        obj = orjson.loads(_b("level2.json"))
        obj["data"]["sequence"] = s
        (d,) = parse_ws_message(orjson.dumps(obj), 0)
        diffs.append(d)
    kept = [d for d in diffs if d.last_update_id >= L]
    first = kept[0]
    assert first.first_update_id <= L + 1 <= first.last_update_id + 1
    assert [d.last_update_id for d in kept] == [100, 101, 102]
    # a missing sequence is a break
    assert diffs[4].prev_update_id == diffs[3].last_update_id
    assert diffs[4].prev_update_id != diffs[2].last_update_id


def test_timestamp_units() -> None:
    assert rules.ns_to_ms(1604643655040584408) == 1604643655040
    assert rules.ns_to_ms(1604643655040584) == 1604643655040
    assert rules.ns_to_ms(1604643655040) == 1604643655040
    obj = orjson.loads(_b("level2.json"))
    obj["data"]["timestamp"] = 1551770400000123456
    (d,) = parse_ws_message(orjson.dumps(obj), 0)
    assert d.event_time == 1551770400000


@pytest.mark.parametrize(
    ("name", "kind", "detail"),
    [
        ("welcome.json", "welcome", "hQvf8jkno"),
        ("ack.json", "ack", "1"),
        ("pong.json", "pong", "1545910590801"),
    ],
)
def test_control_frames(name: str, kind: str, detail: str) -> None:
    item = parse_ws_message(_b(name), 0)
    assert isinstance(item, Control) and item.kind == kind and item.detail == detail


def test_other_frames() -> None:
    err = parse_ws_message(b'{"id":"1","type":"error","code":401,"data":"token is expired"}', 0)
    assert isinstance(err, Control) and err.kind == "error" and "token" in err.detail
    other = parse_ws_message(
        b'{"type":"message","topic":"/contractMarket/execution:XBTUSDTM","data":{}}', 0
    )
    assert isinstance(other, Control) and other.kind == "other"


def test_symbols() -> None:
    assert default_symbol("XBTUSDTM") == "BTCUSDT"
    assert default_symbol("ETHUSDTM") == "ETHUSDT"
    assert default_symbol("XBTUSDCM") == "BTCUSDC"
    (d,) = parse_ws_message(_b("level2.json"), 0, {"XBTUSDTM": "BTC-X"})
    assert d.symbol == "BTC-X"


@pytest.mark.parametrize(
    ("code", "exc"),
    [("429000", RateLimited), ("500000", ServerError), ("400100", RequestRejected)],
)
def test_rest_code_errors(code: str, exc: type[Exception]) -> None:
    body = orjson.dumps({"code": code, "msg": "Too Many Requests"})
    with pytest.raises(exc, match=code) as ei:
        parse_rest_snapshot(body, "BTCUSDT", 0)
    assert (exc is RateLimited) == isinstance(ei.value, RateLimited)


@pytest.mark.parametrize("code", [b'["200000"]', b'{"code":"429000"}', b"true", b"[]"])
def test_rest_code_of_another_type_is_malformed(code: bytes) -> None:
    """A code that is neither a string nor an integer is a malformed body. Was: its text
    ('["200000"]', "True") made it a rejected request, as if the venue had refused it."""
    body = b'{"code":' + code + b',"msg":"","data":{}}'
    for parse in (lambda b: parse_rest_snapshot(b, "BTCUSDT", 0), parse_instruments):
        with pytest.raises(MalformedMessage, match="field 'code' is not an integer") as ei:
            parse(body)
        assert ei.value.exchange == "kucoin"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"code":"200000","data":{"bids":[],"asks":[],"ts":1604643655040584408}}', "sequence"),
        (b'{"code":"200000","data":{"sequence":1,"bids":[],"asks":[]}}', "ts"),
        (
            b'{"code":"200000","data":{"sequence":1,"bids":[[1]],"asks":[],'
            b'"ts":1604643655040584408}}',
            "data.bids",
        ),
        (
            b'{"code":"200000","data":{"sequence":1,"bids":[],"asks":[["x",1]],'
            b'"ts":1604643655040584408}}',
            "data.asks",
        ),
        (b'{"code":"200000"}', "data"),
        (b'{"data":{}}', "code"),
        (b"<html>", "JSON"),
    ],
)
def test_rest_malformed(body: bytes, field: str) -> None:
    with pytest.raises(MalformedMessage, match=field) as ei:
        parse_rest_snapshot(body, "BTCUSDT", 0)
    assert ei.value.exchange == "kucoin"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ('"5000.0,sell"', "price,side,size"),
        ('"5000.0,hold,1"', "side"),
        ('"abc,sell,1"', "number"),
        ("5000", "change"),
    ],
)
def test_ws_malformed_change(change: str, match: str) -> None:
    raw = (
        '{"type":"message","topic":"/contractMarket/level2:XBTUSDTM","subject":"level2",'
        f'"data":{{"sequence":18,"change":{change},"timestamp":1}}}}'
    )
    with pytest.raises(MalformedMessage, match=match) as ei:
        parse_ws_message(raw, 0)
    assert ei.value.symbol == "BTCUSDT" and "data.change" in str(ei.value)


def test_ws_malformed_sequence() -> None:
    raw = (
        b'{"type":"message","topic":"/contractMarket/level2:XBTUSDTM",'
        b'"data":{"change":"1,buy,1","timestamp":1}}'
    )
    with pytest.raises(MalformedMessage, match="sequence"):
        parse_ws_message(raw, 0)


def test_instruments() -> None:
    inst = parse_instruments(_b("contracts_active.json"))
    btc = inst["XBTUSDTM"]
    assert btc.status_ok and btc.multiplier == 0.001 and btc.multiplier_text == "0.001"
    assert btc.tick_size == "0.1" and btc.step_size == "1"
    assert inst["ETHUSDTM"].multiplier_text == "0.01"
    pepe = inst["1000PEPEUSDTM"]
    assert not pepe.status_ok and pepe.tick_size == "0.0000001"
    assert btc.unsupported == "" and pepe.unsupported == ""
    inverse = inst["XBTUSDM"]  # lots of 1 USD: lots x multiplier is not a base-asset size
    assert inverse.status_ok and inverse.multiplier_text == "-1"
    assert "inverse contract (multiplier -1" in inverse.unsupported
    with pytest.raises(RateLimited):
        parse_instruments(b'{"code":"429000","msg":"Too Many Requests"}')


def test_snapshot_is_not_float_rounded() -> None:
    """More digits than a float holds: the text survives (the normalizer counts these)."""
    body = (
        b'{"code":"200000","data":{"sequence":5,"ts":1604643655040584408,'
        b'"bids":[[1.00000000000000001, 0.12345678901234567]],"asks":[]}}'
    )
    s = parse_rest_snapshot(body, "BTCUSDT", 0)
    assert s.bids == [("1.00000000000000001", "0.12345678901234567")]


def test_shared_sync_machine_anchors_on_the_snapshot_sequence() -> None:
    from cryptoflow.book.sync import BookSync

    sync = BookSync("kucoin", "futures", "BTCUSDT", rules.RULES, track_book=True)
    for s in (99, 100, 101, 102):
        obj = orjson.loads(_b("level2.json"))
        obj["data"]["sequence"] = s
        (d,) = parse_ws_message(orjson.dumps(obj), 0)
        sync.on_diff(d)
    snap = parse_rest_snapshot(_b("snapshot.json"), "BTCUSDT", 0)  # sequence 100
    sync.on_snapshot(snap)
    assert sync.book_id == 102 and sync.counters.breaks == 0
    obj = orjson.loads(_b("level2.json"))
    obj["data"]["sequence"] = 104  # 103 missing
    (d,) = parse_ws_message(orjson.dumps(obj), 0)
    assert sync.on_diff(d).gaps and sync.counters.breaks == 1
