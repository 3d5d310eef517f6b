"""An event, transaction or snapshot time outside [2000-01-01, 2100-01-01) UTC is a
malformed message, on every parse path.

The audit (session 8) found that the parsers took any Int64 as a time: one Binance diff
with `E=300000000000000` (year 11476) was stored in a journal that no split could ever
name an hour partition for, and every symbol's deltas stayed in the spool behind it
(`/tmp/audit8a/e2e_far_delta.py`); a far snapshot time did the same to the snapshots
(`e2e_far_snapshot.py`). Now each venue's checked parser refuses such a time with a
`MalformedMessage` naming the field and the symbol (`fields.check_time`), and each batch
reader (Binance frames and bodies, Bybit, OKX and KuCoin bodies) hands a batch holding
one to the checked parser, so the fast and the simple path still give the same rows:
the bad message left out, every other one kept.

Inputs: the venues' documented example payloads (docs/exchanges.md), compact as they
are sent, one time changed; the Binance BTCUSDT recording for the replay.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from typing import Any

import bodies_support
import orjson
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.binance import parse as binance
from cryptoflow.exchanges.bybit import parse as bybit
from cryptoflow.exchanges.fields import INT64_MAX, TIME_MAX_MS, TIME_MIN_MS
from cryptoflow.exchanges.kucoin import parse as kucoin
from cryptoflow.exchanges.okx import parse as okx
from cryptoflow.models import MARKET_FUTURES, SnapshotBody, SnapshotSource
from cryptoflow.pipeline import batch
from cryptoflow.pipeline.bodies import frame_from_bodies
from cryptoflow.pipeline.normalize import Normalizer
from cryptoflow.tools.replay import replay_summary

SYM = "BTCUSDT"
FAR = 300_000_000_000_000  # the audit's value: year 11476 in ms, a valid Int64
#: times outside the window (ms), each refused
OUTSIDE = [FAR, TIME_MIN_MS - 1, TIME_MAX_MS, 0, -1]
#: the window's edges (ms), each accepted
EDGES = [TIME_MIN_MS, TIME_MAX_MS - 1]
BTC_REC = RECORDED / "binance" / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz"


def _ns(ms: int) -> int:
    """`ms` in ns, for KuCoin; FAR in ns would not fit Int64: then INT64_MAX (year 2262)."""
    return min(ms * 10**6, INT64_MAX)


def _refused(call: Callable[[], Any], named: str, symbol: str = SYM) -> None:
    with pytest.raises(MalformedMessage) as ei:
        call()
    assert re.search(f"field {re.escape(named)} is .*: not a time within 2000-01-01", str(ei.value))
    assert ei.value.symbol == symbol


# --- WebSocket diffs ------------------------------------------------------------------


def binance_ws(**data: Any) -> bytes:
    d = {
        "e": "depthUpdate",
        "E": 1723161256299,
        "T": 1723161256298,
        "s": SYM,
        "U": 10,
        "u": 12,
        "pu": 9,
        "b": [["61000.10", "0.5"]],
        "a": [],
    }
    d.update(data)
    return orjson.dumps({"stream": "btcusdt@depth@0ms", "data": d})


def bybit_ws(**top: Any) -> bytes:
    msg = {
        "topic": "orderbook.50.BTCUSDT",
        "type": "delta",
        "ts": 1671179923046,
        "data": {"s": SYM, "b": [], "a": [["17440.50", "78.857"]], "u": 5, "seq": 7},
        "cts": 1671179923044,
    }
    msg.update(top)
    return orjson.dumps(msg)


def okx_ws(ts: int) -> bytes:
    d = {"asks": [["8476.98", "0", "0", "0"]], "bids": [], "ts": str(ts), "checksum": 0}
    return orjson.dumps({"arg": {"channel": "books", "instId": "BTC-USDT-SWAP"}, "data": [d]})


def kucoin_ws(timestamp: int) -> bytes:
    data = {"sequence": 18, "change": "5000.0,sell,83", "timestamp": timestamp}
    return orjson.dumps(
        {"type": "message", "topic": "/contractMarket/level2:XBTUSDTM", "data": data}
    )


#: (parse, a frame with the time `ms` in one field, how the error names the field)
WS = {
    "binance-E": (binance.parse_ws_message, lambda ms: binance_ws(E=ms), "'E'"),
    "binance-T": (binance.parse_ws_message, lambda ms: binance_ws(T=ms), "'T'"),
    "bybit-ts": (bybit.parse_ws_message, lambda ms: bybit_ws(ts=ms), "'ts'"),
    "bybit-cts": (bybit.parse_ws_message, lambda ms: bybit_ws(cts=ms), "'cts'"),
    "okx-ts": (okx.parse_ws_message, okx_ws, "data[0].'ts'"),
    "kucoin-ms": (kucoin.parse_ws_message, kucoin_ws, "data.'timestamp'"),
    "kucoin-ns": (kucoin.parse_ws_message, lambda ms: kucoin_ws(_ns(ms)), "data.'timestamp'"),
}


@pytest.mark.parametrize("case", sorted(WS))
@pytest.mark.parametrize("ms", OUTSIDE)
def test_ws_time_outside_the_window_is_malformed(case: str, ms: int) -> None:
    parse, frame, named = WS[case]
    _refused(lambda: parse(frame(ms), 1), named)


@pytest.mark.parametrize("case", sorted(WS))
@pytest.mark.parametrize("ms", EDGES)
def test_ws_time_at_the_window_edges_parses(case: str, ms: int) -> None:
    parse, frame, _ = WS[case]
    (diff,) = parse(frame(ms), 1)
    assert ms in (diff.event_time, diff.transaction_time)


def test_the_error_names_the_value_as_sent() -> None:
    with pytest.raises(MalformedMessage) as ei:
        binance.parse_ws_message(binance_ws(E=FAR), 1)
    assert str(ei.value) == (
        "binance/BTCUSDT: field 'E' is 300000000000000: not a time within "
        "2000-01-01 .. 2100-01-01 UTC"
    )
    with pytest.raises(MalformedMessage) as ei:
        kucoin.parse_ws_message(kucoin_ws(5 * 10**18), 1)
    assert "field data.'timestamp' is 5000000000000000000 (5000000000000 ms): not a time" in str(
        ei.value
    )


# --- REST snapshot bodies, checked parser and batch reader ------------------------------

BINANCE_BODY = (  # the Binance docs' example of GET /fapi/v1/depth
    b'{"lastUpdateId":1027024,"E":1589436922972,"T":1589436922959,'
    b'"bids":[["4.00000000","431.00000000"]],"asks":[["4.00000200","12.00000000"]]}'
)
BYBIT_BODY = (  # the Bybit v5 docs' example of GET /v5/market/orderbook
    b'{"retCode":0,"retMsg":"OK","result":{"s":"BTCUSDT","b":[["16493.50","0.006"]],'
    b'"a":[["16611.00","0.029"]],"ts":1672765737733,"u":5277055,"seq":7961638724,'
    b'"cts":1672765737731},"retExtInfo":{},"time":1672765737734}'
)
OKX_BODY = (  # the OKX v5 docs' example of GET /api/v5/market/books, with seqId
    b'{"code":"0","msg":"","data":[{"asks":[["41006.8","0.60038921","0","1"]],'
    b'"bids":[["41006.3","0.30178218","0","2"]],"ts":"1629966436396","seqId":987}]}'
)
KUCOIN_BODY = (  # the KuCoin docs' example of GET /api/v1/level2/snapshot (ts in ns)
    b'{"code":"200000","data":{"symbol":"XBTUSDTM","sequence":100,'
    b'"asks":[[5000.0,1000],[6000.0,1983]],"bids":[[3200.0,800],[3100.0,100]],'
    b'"ts":1604643655040584408}}'
)


def _sub(body: bytes, old: bytes, new: bytes) -> bytes:
    assert body.count(old) == 1, old
    return body.replace(old, new)


#: (venue, the documented body, [(a copy with one time changed to `ms`, field named)])
BODIES: dict[str, tuple[str, bytes, Callable[[int], bytes], str]] = {
    "binance-E": (
        "binance",
        BINANCE_BODY,
        lambda ms: _sub(BINANCE_BODY, b'"E":1589436922972', b'"E":%d' % ms),
        "'E'",
    ),
    "binance-T": (
        "binance",
        BINANCE_BODY,
        lambda ms: _sub(BINANCE_BODY, b'"T":1589436922959', b'"T":%d' % ms),
        "'T'",
    ),
    "binance-T-only": (  # an old response without E: T is the event time
        "binance",
        BINANCE_BODY,
        lambda ms: _sub(BINANCE_BODY, b'"E":1589436922972,"T":1589436922959', b'"T":%d' % ms),
        "'T'",
    ),
    "bybit-ts": (
        "bybit",
        BYBIT_BODY,
        lambda ms: _sub(BYBIT_BODY, b'"ts":1672765737733', b'"ts":%d' % ms),
        "result.'ts'",
    ),
    "bybit-cts": (
        "bybit",
        BYBIT_BODY,
        lambda ms: _sub(BYBIT_BODY, b'"cts":1672765737731', b'"cts":%d' % ms),
        "result.'cts'",
    ),
    "bybit-time-without-ts": (  # no result.ts: the envelope time is the event time
        "bybit",
        BYBIT_BODY,
        lambda ms: _sub(
            _sub(BYBIT_BODY, b'"ts":1672765737733,', b""),
            b'"time":1672765737734',
            b'"time":%d' % ms,
        ),
        "'time'",
    ),
    "okx-ts": (
        "okx",
        OKX_BODY,
        lambda ms: _sub(OKX_BODY, b'"ts":"1629966436396"', b'"ts":"%d"' % ms),
        "data[0].'ts'",
    ),
    "kucoin-ts-ns": (
        "kucoin",
        KUCOIN_BODY,
        lambda ms: _sub(KUCOIN_BODY, b'"ts":1604643655040584408', b'"ts":%d' % _ns(ms)),
        "data.'ts'",
    ),
    "kucoin-ts-ms": (
        "kucoin",
        KUCOIN_BODY,
        lambda ms: _sub(KUCOIN_BODY, b'"ts":1604643655040584408', b'"ts":%d' % ms),
        "data.'ts'",
    ),
}
RECV = 1_700_000_000_000_000_000


def _items(exchange: str, bodies: list[bytes]) -> list[SnapshotBody]:
    return [
        SnapshotBody(exchange, MARKET_FUTURES, SYM, b, RECV + i * 10**9, SnapshotSource.POLL)
        for i, b in enumerate(bodies)
    ]


@pytest.mark.parametrize("case", sorted(BODIES))
@pytest.mark.parametrize("ms", OUTSIDE)
def test_snapshot_time_outside_the_window_is_left_out_on_both_paths(case: str, ms: int) -> None:
    """The checked parser refuses the body; the batch reader does not read the batch it
    is in (None), so the flush reads them one by one: the bad body left out and named,
    the others stored exactly as the simple path stores them."""
    exchange, good, bad, named = BODIES[case]
    codec = registry.get_venue(exchange).snapshot_codec
    assert codec is not None
    _refused(lambda: codec.parse(bad(ms), SYM, RECV, SnapshotSource.POLL), named)
    items = _items(exchange, [good, bad(ms), good])
    assert bodies_support.read_batch(codec.read, items) is None
    assert bodies_support.read_batch(codec.read, _items(exchange, [good, good])) is not None
    frame, rejected = frame_from_bodies(exchange, MARKET_FUTURES, SYM, "1", codec, items)
    assert len(rejected) == 1 and named in rejected[0] and "not a time within" in rejected[0]
    kept = [items[0], items[2]]
    rules = registry.get_venue(exchange).rules
    assert frame.equals(bodies_support.simple_frame(rules, codec.parse, kept))


@pytest.mark.parametrize("case", sorted(BODIES))
@pytest.mark.parametrize("ms", EDGES)
def test_snapshot_time_at_the_window_edges_is_read_on_both_paths(case: str, ms: int) -> None:
    exchange, good, bad, _ = BODIES[case]
    codec = registry.get_venue(exchange).snapshot_codec
    assert codec is not None
    items = _items(exchange, [good, bad(ms)])
    assert bodies_support.read_batch(codec.read, items) is not None
    frame, rejected = frame_from_bodies(exchange, MARKET_FUTURES, SYM, "1", codec, items)
    assert rejected == []
    rules = registry.get_venue(exchange).rules
    assert frame.equals(bodies_support.simple_frame(rules, codec.parse, items))


def test_bybit_envelope_time_is_not_read_when_result_ts_is_there() -> None:
    """`parse_rest_snapshot` reads `time` only without `result.ts`; the batch reader
    likewise does not send a body to the checked parser for it."""
    body = _sub(BYBIT_BODY, b'"time":1672765737734', b'"time":%d' % FAR)
    codec = registry.get_venue("bybit").snapshot_codec
    assert codec is not None
    assert codec.parse(body, SYM, RECV, SnapshotSource.POLL).event_time == 1672765737733
    assert bodies_support.read_batch(codec.read, _items("bybit", [body])) is not None


# --- the Binance frame reader and replay -------------------------------------------------


@pytest.mark.parametrize("field", ["E", "T"])
def test_binance_frames_with_a_far_time_go_to_the_simple_path(field: str) -> None:
    good = binance_ws()
    assert batch.read_diff_frames([good, good]) is not None
    far = binance_ws(**{field: FAR})
    assert batch.read_diff_frames([good, far]) is None
    norm = Normalizer({"binance": registry.get_venue("binance").rules})
    assert norm.feed_frames("binance", MARKET_FUTURES, [good, far], [1, 2]) is None
    assert norm.totals().diffs == 0  # nothing was fed: the simple path decides


@pytest.mark.skipif(not BTC_REC.exists(), reason="shared recordings not present")
def test_replay_skips_a_far_diff_and_writes_everything_else_in_real_hours(tmp_path) -> None:
    """The recording with one diff's E set to year 11476: both replay paths skip exactly
    that record, write the same files, and every file lands in the recording's hours."""
    with gzip.open(BTC_REC, "rb") as f:
        lines = f.read().splitlines()[:400]
    rec = orjson.loads(lines[200])
    assert rec["kind"] == "ws"
    rec["msg"]["data"]["E"] = FAR
    lines[200] = orjson.dumps(rec)
    path = tmp_path / "far.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = {}
    for fast in (False, True):
        root = tmp_path / f"out-{fast}"
        summary = replay_summary("binance", path, root, chunk_records=64, fast=fast)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))
        assert summary.bad_records == 1
        assert files and all("/year=2024/" in f for f in files), files
        out[fast] = (summary.line(), files, [(root / f).read_bytes() for f in files])
    assert out[True] == out[False]
