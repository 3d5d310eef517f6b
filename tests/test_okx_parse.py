"""OKX v5 parsers and checksum on the shared recordings and on documented payloads."""

from __future__ import annotations

import itertools
import zlib
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage, RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.base import Control
from cryptoflow.exchanges.okx import rules
from cryptoflow.exchanges.okx.checksum import book_checksum, okx_checksum, should_check
from cryptoflow.exchanges.okx.parse import (
    default_symbol,
    parse_instruments,
    parse_rest_snapshot,
    parse_ws_message,
)
from cryptoflow.exchanges.okx.rules import LegacySequencer
from cryptoflow.models import DepthDiff

REC = RECORDED / "okx"
XMR = REC / "swap_books-l2-tbt_XMR-USDT-SWAP_2021-07-22.jsonl"
UNI = REC / "swap_books_UNI-USD-SWAP_2022-05-13.jsonl"

needs_rec = pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")


def _records(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _parse_all(records: list[dict], legacy: LegacySequencer | None = None) -> list[DepthDiff]:
    out: list[DepthDiff] = []
    for r in records:
        item = parse_ws_message(orjson.dumps(r["msg"]), r["recv_ns"], None, legacy)
        assert isinstance(item, list)
        out.extend(item)
    return out


def _replay_checksums(diffs: list[DepthDiff]) -> list[bool]:
    """Apply to a dict book (keys = price text as sent) and compare after each message."""
    bids: dict[str, str] = {}
    asks: dict[str, str] = {}
    ok: list[bool] = []
    for d in diffs:
        if d.is_snapshot:
            bids, asks = {}, {}
        for side, levels in ((bids, d.bids), (asks, d.asks)):
            for p, s in levels:
                if Decimal(s) == 0:
                    side.pop(p, None)
                else:
                    side[p] = s
        ok.append(book_checksum(bids, asks) == d.checksum)
    return ok


@needs_rec
@pytest.mark.parametrize(
    ("path", "n", "symbol", "empty"),
    [(XMR, 318, "XMRUSDT", 2), (UNI, 93, "UNIUSD", 0)],
)
def test_recording_checksums_match_every_message(
    path: Path, n: int, symbol: str, empty: int
) -> None:
    diffs = _parse_all(_records(path))
    assert len(diffs) == n
    assert [d.is_snapshot for d in diffs] == [True] + [False] * (n - 1)
    assert {d.symbol for d in diffs} == {symbol}
    assert all(len(b) == 2 for d in diffs for b in d.bids + d.asks)  # 4-element levels trimmed
    assert all(should_check(d.checksum) for d in diffs)
    assert _replay_checksums(diffs) == [True] * n
    empties = [d for d in diffs if not d.bids and not d.asks]
    assert len(empties) == empty
    # no seqId/prevSeqId and no sequencer: None-safe constant ids
    assert diffs[0].prev_update_id is None
    assert all(d.prev_update_id is None for d in diffs)
    assert all(d.first_update_id == d.last_update_id == rules.LEGACY_ID for d in diffs)


@needs_rec
def test_xmr_empty_updates_keep_the_checksum() -> None:
    diffs = _parse_all(_records(XMR))
    idx = [i for i, d in enumerate(diffs) if not d.bids and not d.asks]
    assert len(idx) == 2
    for i in idx:
        assert diffs[i].checksum == diffs[i - 1].checksum
        assert not diffs[i].is_snapshot


@needs_rec
@pytest.mark.parametrize("path", [XMR, UNI])
def test_removed_update_is_a_checksum_mismatch(path: Path) -> None:
    recs = _records(path)
    # drop the first non-empty update after the middle of the file
    k = next(
        i
        for i in range(len(recs) // 2, len(recs))
        if recs[i]["msg"]["data"][0]["bids"] or recs[i]["msg"]["data"][0]["asks"]
    )
    diffs = _parse_all(recs[:k] + recs[k + 1 :])
    ok = _replay_checksums(diffs)
    assert all(ok[:k])
    assert ok[k] is False  # the message right after the hole already disagrees


@needs_rec
def test_legacy_sequencer_gives_a_continuous_chain() -> None:
    seqr = LegacySequencer()
    diffs = _parse_all(_records(UNI), seqr)
    assert diffs[0].is_snapshot and diffs[0].last_update_id == 1
    assert diffs[0].prev_update_id is None
    for a, b in itertools.pairwise(diffs):
        assert b.prev_update_id == a.last_update_id
        assert b.first_update_id == b.last_update_id == a.last_update_id + 1
    # a new snapshot restarts the chain
    again = _parse_all(_records(UNI)[:1], seqr)
    assert again[0].last_update_id == 1


def test_okx_checksum_algorithm() -> None:
    bids = [("3366.1", "7"), ("3366", "6")]
    asks = [("3366.8", "9"), ("3368", "8"), ("3372", "8")]
    text = "3366.1:7:3366.8:9:3366:6:3368:8:3372:8"
    crc = zlib.crc32(text.encode())
    expected = crc - 2**32 if crc >= 2**31 else crc
    assert okx_checksum(bids, asks) == expected
    # only 25 levels count
    many_b = [(str(1000 - i), "1") for i in range(40)]
    many_a = [(str(2000 + i), "1") for i in range(40)]
    assert okx_checksum(many_b, many_a) == okx_checksum(many_b[:25], many_a[:25])
    assert okx_checksum(many_b, many_a) != okx_checksum(many_b[:24], many_a[:25])
    assert book_checksum(dict(bids), dict(asks)) == expected
    assert not should_check(0) and not should_check(None) and should_check(-5)


SNAP = (
    b'{"arg": {"channel": "books", "instId": "BTC-USDT-SWAP"}, "action": "snapshot",'
    b' "data": [{"asks": [["8476.98", "415", "0", "13"]], "bids": [["8476.97", "256", "0", "12"]],'
    b' "ts": "1597026383085", "checksum": 0, "prevSeqId": -1, "seqId": 123456}]}'
)
UPD = (
    b'{"arg": {"channel": "books", "instId": "BTC-USDT-SWAP"}, "action": "update",'
    b' "data": [{"asks": [["8476.98", "0", "0", "0"]], "bids": [], "ts": "1597026383185",'
    b' "checksum": 0, "prevSeqId": 123456, "seqId": 123471}]}'
)


def _upd(prev: int, seq: int) -> bytes:
    return UPD.replace(
        b'"prevSeqId": 123456, "seqId": 123471', f'"prevSeqId": {prev}, "seqId": {seq}'.encode()
    )


def test_documented_snapshot_and_update_ids() -> None:
    (s,) = parse_ws_message(SNAP, 5)
    assert s.is_snapshot and s.prev_update_id is None
    assert s.first_update_id == s.last_update_id == 123456
    assert s.symbol == "BTCUSDT" and s.event_time == 1597026383085
    assert s.bids == [("8476.97", "256")] and s.checksum == 0
    (u,) = parse_ws_message(UPD.decode(), 6)
    assert (u.first_update_id, u.last_update_id, u.prev_update_id) == (123457, 123471, 123456)
    assert u.prev_update_id == s.last_update_id and not u.is_snapshot
    assert u.asks == [("8476.98", "0")]
    # heartbeat: seqId == prevSeqId
    (h,) = parse_ws_message(_upd(123471, 123471), 7)
    assert h.prev_update_id == h.last_update_id == 123471 and h.first_update_id == 123471
    # seqId reset after maintenance: prev still chains, first <= last
    (r,) = parse_ws_message(_upd(123471, 15), 8)
    assert r.prev_update_id == 123471 and r.first_update_id == r.last_update_id == 15
    # a break
    (b,) = parse_ws_message(_upd(123500, 123510), 9)
    assert b.prev_update_id != u.last_update_id


def test_rest_anchor_rule_in_normalized_ids() -> None:
    # OKX: first update after a REST seqId L has prevSeqId <= L < seqId
    (u,) = parse_ws_message(_upd(100, 120), 0)
    for L in (100, 110, 119):
        assert u.first_update_id <= L + 1 <= u.last_update_id + 1
    assert not (u.first_update_id <= 99 + 1)  # L below prevSeqId: cannot anchor


def test_multiple_data_elements_and_symbol_map() -> None:
    obj = orjson.loads(UPD)
    obj["data"].append(dict(obj["data"][0], prevSeqId=123471, seqId=123480))
    out = parse_ws_message(orjson.dumps(obj), 0, {"BTC-USDT-SWAP": "XBT"})
    assert isinstance(out, list) and len(out) == 2
    assert out[1].prev_update_id == out[0].last_update_id
    assert {d.symbol for d in out} == {"XBT"}


@pytest.mark.parametrize(
    ("raw", "kind", "reconnect"),
    [
        ("pong", "pong", False),
        (b"pong", "pong", False),
        (
            b'{"event":"subscribe","arg":{"channel":"books","instId":"BTC-USDT-SWAP"},"connId":"a"}',
            "ack",
            False,
        ),
        (b'{"event":"error","code":"60012","msg":"Invalid request","connId":"a"}', "error", False),
        (
            b'{"event":"notice","code":"64008","msg":"The connection will soon be closed",'
            b'"connId":"a"}',
            "notice",
            True,
        ),
        (b'{"event":"channel-conn-count","channel":"books","connCount":"2"}', "other", False),
        (b'{"arg":{"channel":"trades","instId":"BTC-USDT-SWAP"},"data":[]}', "other", False),
    ],
)
def test_control_frames(raw: bytes | str, kind: str, reconnect: bool) -> None:
    item = parse_ws_message(raw, 0)
    assert isinstance(item, Control)
    assert item.kind == kind and item.reconnect is reconnect


def test_default_symbols() -> None:
    assert default_symbol("BTC-USDT-SWAP") == "BTCUSDT"
    assert default_symbol("XMR-USDT-SWAP") == "XMRUSDT"
    assert default_symbol("UNI-USD-SWAP") == "UNIUSD"


DOC_REST = (
    b'{"code": "0", "msg": "", "data": [{'
    b' "asks": [["41006.8", "0.60038921", "0", "1"]],'
    b' "bids": [["41006.3", "0.30178218", "0", "2"]], "ts": "1629966436396"}]}'
)


def test_rest_snapshot_documented_and_with_seq_id() -> None:
    s = parse_rest_snapshot(DOC_REST, "BTCUSDT", 1)
    assert s.asks == [("41006.8", "0.60038921")] and s.bids == [("41006.3", "0.30178218")]
    assert s.event_time == 1629966436396 and s.last_update_id == rules.NO_SEQ_ID
    with_seq = DOC_REST.replace(b'"ts": "1629966436396"', b'"ts": "1629966436396", "seqId": 987')
    assert parse_rest_snapshot(with_seq, "BTCUSDT", 1).last_update_id == 987


@pytest.mark.parametrize(
    ("code", "exc"),
    [("50011", RateLimited), ("50001", ServerError), ("51001", RequestRejected)],
)
def test_rest_code_errors(code: str, exc: type[Exception]) -> None:
    body = orjson.dumps({"code": code, "msg": "Too Many Requests", "data": []})
    with pytest.raises(exc, match=code):
        parse_rest_snapshot(body, "BTCUSDT", 0)
    if exc is not RateLimited:
        with pytest.raises(exc) as ei:
            parse_rest_snapshot(body, "BTCUSDT", 0)
        assert not isinstance(ei.value, RateLimited)


@pytest.mark.parametrize("code", [b"[0]", b'{"code":"50011"}', b"true", b"0.0"])
def test_rest_code_of_another_type_is_malformed(code: bytes) -> None:
    """A code that is neither a string nor an integer is a malformed body. Was: its text
    ("[0]", "True") made it a rejected request, as if the venue had refused it."""
    body = b'{"code":' + code + b',"msg":"","data":[]}'
    for parse in (lambda b: parse_rest_snapshot(b, "BTCUSDT", 0), parse_instruments):
        with pytest.raises(MalformedMessage, match="field 'code' is not an integer") as ei:
            parse(body)
        assert ei.value.exchange == "okx"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (SNAP.replace(b'"ts": "1597026383085", ', b""), "ts"),
        (
            SNAP.replace(b'"bids": [["8476.97", "256", "0", "12"]]', b'"bids": [["8476.97"]]'),
            "bids",
        ),
        (SNAP.replace(b'"asks": [["8476.98", "415", "0", "13"]]', b'"asks": 5'), "asks"),
        (SNAP.replace(b'"action": "snapshot"', b'"action": "weird"'), "action"),
        (SNAP.replace(b', "seqId": 123456', b""), "seqId"),
        (b'{"arg":{"channel":"books"},"data":[]}', "instId"),
        (b"{nope", "JSON"),
    ],
)
def test_ws_malformed(raw: bytes, field: str) -> None:
    with pytest.raises(MalformedMessage, match=field) as ei:
        parse_ws_message(raw, 0)
    if b"BTC-USDT-SWAP" in raw:
        assert ei.value.symbol == "BTCUSDT"


def test_rest_malformed() -> None:
    with pytest.raises(MalformedMessage, match="data"):
        parse_rest_snapshot(b'{"code":"0","data":[]}', "BTCUSDT", 0)


def test_instruments() -> None:
    body = orjson.dumps(
        {
            "code": "0",
            "msg": "",
            "data": [
                {
                    "instId": "BTC-USDT-SWAP",
                    "instType": "SWAP",
                    "ctVal": "0.01",
                    "ctValCcy": "BTC",
                    "lotSz": "0.01",
                    "tickSz": "0.1",
                    "state": "live",
                },
                {
                    "instId": "XMR-USDT-SWAP",
                    "instType": "SWAP",
                    "ctVal": "0.1",
                    "lotSz": "1",
                    "tickSz": "0.01",
                    "state": "suspend",
                },
            ],
        }
    )
    inst = parse_instruments(body)
    btc = inst["BTC-USDT-SWAP"]
    assert btc.status_ok and btc.multiplier == 0.01 and btc.multiplier_text == "0.01"
    assert btc.tick_size == "0.1" and btc.step_size == "0.01"
    assert not inst["XMR-USDT-SWAP"].status_ok
    assert btc.unsupported == "" and inst["XMR-USDT-SWAP"].unsupported == ""
    with pytest.raises(RateLimited):
        parse_instruments(b'{"code":"50011","msg":"Too Many Requests","data":[]}')


def test_instruments_mark_inverse_and_non_positive_contracts_unsupported() -> None:
    """An inverse swap's ctVal is USD: contracts x ctVal is not a base-asset size."""
    entries = [
        {"instId": "UNI-USD-SWAP", "ctVal": "10", "ctValCcy": "USD", "ctType": "inverse"},
        {"instId": "BTC-USDT-SWAP", "ctVal": "0.01", "ctValCcy": "BTC", "ctType": "linear"},
        {"instId": "ODD-USDT-SWAP", "ctVal": "0", "ctValCcy": "ODD", "ctType": "linear"},
        {"instId": "NEG-USDT-SWAP", "ctVal": "-1", "ctValCcy": "NEG", "ctType": "linear"},
    ]
    body = orjson.dumps({"code": "0", "msg": "", "data": [{**e, "state": "live"} for e in entries]})
    inst = parse_instruments(body)
    assert "inverse swap (ctVal 10 USD a contract)" in inst["UNI-USD-SWAP"].unsupported
    assert inst["BTC-USDT-SWAP"].unsupported == ""
    assert inst["ODD-USDT-SWAP"].unsupported == "contract value ctVal 0 is not positive"
    assert inst["NEG-USDT-SWAP"].unsupported == "contract value ctVal -1 is not positive"


def test_rules_diff_ids() -> None:
    assert rules.diff_ids(123471, 123456, False) == (123457, 123471, 123456)
    assert rules.diff_ids(123456, -1, False) == (123456, 123456, None)
    assert rules.diff_ids(5, 5, False) == (5, 5, 5)


@needs_rec
def test_shared_sync_machine_accepts_legacy_ids() -> None:
    from cryptoflow.book.sync import BookSync

    for path in (XMR, UNI):
        sync = BookSync("okx", "futures", "X", rules.RULES)
        for d in _parse_all(_records(path)):
            assert not sync.on_diff(d).gaps
        assert sync.counters.breaks == 0 and sync.book_id is not None


def test_shared_sync_machine_on_seq_ids() -> None:
    from cryptoflow.book.sync import BookSync

    sync = BookSync("okx", "futures", "BTCUSDT", rules.RULES)
    frames = [SNAP, _upd(123456, 123471), _upd(123471, 123471), _upd(123471, 9), _upd(9, 30)]
    for f in frames:
        (d,) = parse_ws_message(f, 0)
        assert not sync.on_diff(d).gaps
    (d,) = parse_ws_message(_upd(31, 40), 0)
    assert sync.on_diff(d).gaps and sync.counters.breaks == 1


def test_seq_id_restart_across_a_reconnect_resyncs_on_a_rest_anchor() -> None:
    """Maintenance: the connection is lost and seqId restarts low on the new one, which
    sends no in-stream snapshot. The new chain must be followed so a REST `books`
    snapshot anchors it (it used to stay on the old, higher id: every update a break)."""
    from cryptoflow.book.sync import BookState, BookSync
    from cryptoflow.models import GapKind, SnapshotSource, StreamEvent

    sync = BookSync("okx", "futures", "BTCUSDT", rules.RULES)
    for f in (SNAP, _upd(123456, 123471)):
        (d,) = parse_ws_message(f, 0)
        assert not sync.on_diff(d).gaps
    sync.on_event(StreamEvent("okx", "futures", "BTCUSDT", GapKind.RECONNECT, time=0))
    gaps = []
    for f in (_upd(10, 20), _upd(20, 30)):
        (d,) = parse_ws_message(f, 0)
        gaps += [(g.kind, g.last_good_id) for g in sync.on_diff(d).gaps]
    rest = (
        b'{"code": "0", "msg": "", "data": [{"asks": [["8476.98", "5", "0", "1"]],'
        b' "bids": [["8470", "1", "0", "1"]], "ts": "1597026400005", "seqId": 30}]}'
    )
    gaps += [
        (g.kind, g.last_good_id)
        for g in sync.on_snapshot(
            parse_rest_snapshot(rest, "BTCUSDT", 0, SnapshotSource.RESYNC)
        ).gaps
    ]
    for f in (_upd(30, 45), _upd(45, 45), _upd(45, 61)):
        (d,) = parse_ws_message(f, 0)
        gaps += [(g.kind, g.last_good_id) for g in sync.on_diff(d).gaps]
    assert gaps == [(GapKind.RECONNECT, 123471), (GapKind.RESYNC, 123471)]
    assert sync.state is BookState.SYNCED and sync.book_id == 61


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event": "subscribe", "arg": "books:BTC-USDT-SWAP"}',  # arg not an object
        b'{"arg": {"channel": ["books"], "instId": "BTC-USDT-SWAP"}, "action": "update",'
        b' "data": []}',  # channel not a string
    ],
)
def test_odd_shapes_are_controls_not_crashes(raw: bytes) -> None:
    """These raised AttributeError / TypeError, which dropped the whole connection."""
    assert isinstance(parse_ws_message(raw, 0), Control)
