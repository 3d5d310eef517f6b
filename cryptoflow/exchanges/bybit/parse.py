"""Bybit v5 linear: pure parsers, bytes -> records (no I/O).

- `parse_rest_snapshot`: `GET /v5/market/orderbook?category=linear` body.
  `is_plain_success`, `count_snapshot_levels`: quick looks at a body the poll lane
  leaves unparsed until the writer's flush (read then by `exchanges/bybit/batch.py`).
- `parse_ws_message`: one frame of `wss://stream.bybit.com/v5/public/linear`
  (`orderbook.<depth>.<symbol>` pushes, subscribe acks, pongs).
- `parse_instruments`: `GET /v5/market/instruments-info?category=linear` body.

Prices and sizes stay the strings Bybit sent. Ids are normalized as `rules.py` says.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from cryptoflow.exchanges.base import Control, Instrument, SymbolMap, WsItem
from cryptoflow.exchanges.bybit import rules
from cryptoflow.exchanges.fields import INT64_MIN, Fields, plain_success
from cryptoflow.models import MARKET_FUTURES, DepthDiff, DepthSnapshot, SnapshotSource

EXCHANGE = rules.EXCHANGE
_TOPIC_PREFIX = "orderbook."


_F = Fields(EXCHANGE)
_malformed = _F.malformed
_loads = _F.loads
_levels = _F.levels
_int = _F.int
_opt_int = _F.opt_int
_time = _F.time
_opt_time = _F.opt_time


def default_symbol(venue_symbol: str) -> str:
    """Bybit linear names are already normalized (`BTCUSDT`)."""
    return venue_symbol


def check_ret_code(obj: Any, symbol: str = "") -> None:
    """Raise the error a non-zero `retCode` in an HTTP-200 body stands for."""
    _F.check_body_code(
        obj,
        symbol,
        field="retCode",
        ok=rules.RET_OK,
        message_field="retMsg",
        rate_limited=rules.RATE_LIMITED_CODES,
        server_errors=rules.SERVER_ERROR_CODES,
        retry_after=rules.RATE_LIMIT_RETRY_AFTER_S,
    )


#: how every success body of `GET /v5/market/orderbook` begins (`retCode` is its first key)
SUCCESS_PREFIX: Final = b'{"retCode":0,'


def is_plain_success(body: bytes) -> bool:
    """`fields.plain_success` for this venue's depth body (`BybitRest.fetch_snapshot_body`)."""
    return plain_success(body, SUCCESS_PREFIX, b'"retCode"')


def count_snapshot_levels(body: bytes) -> int:
    """The levels in a well-formed `/v5/market/orderbook` body: each is one
    `["price","size"]` and no other `["` occurs (the envelope and `result` hold only
    `retMsg` "OK", the symbol, integers and `{}`): the writer's accounting for a body it
    parses later."""
    return body.count(b'["')


def parse_rest_snapshot(
    body: bytes, symbol: str, receive_ns: int, source: SnapshotSource = SnapshotSource.POLL
) -> DepthSnapshot:
    """`/v5/market/orderbook` body -> snapshot at `result.u`; `symbol` is the normalized name.

    event_time = `result.ts` (falls back to the envelope `time`), transaction_time =
    `result.cts` when present.
    """
    obj = _loads(body, symbol)
    check_ret_code(obj, symbol)
    res = obj.get("result")
    if type(res) is not dict:
        raise _malformed("missing field 'result'", symbol)
    ts = _opt_time(res, "ts", symbol, where="result.")
    if ts is None:
        ts = _time(obj, "time", symbol)
    return DepthSnapshot(
        exchange=EXCHANGE,
        market=MARKET_FUTURES,
        symbol=symbol,
        event_time=ts,
        transaction_time=_opt_time(res, "cts", symbol, where="result."),
        last_update_id=_int(res, "u", symbol, where="result."),
        bids=_levels(res.get("b"), "result.b", symbol),
        asks=_levels(res.get("a"), "result.a", symbol),
        receive_time=receive_ns,
        source=source,
    )


def _control(obj: dict[str, Any]) -> Control:
    op = obj.get("op", "")
    ret_msg = obj.get("ret_msg", "") or ""
    if op == "pong" or ret_msg == "pong":
        return Control("pong")
    if op == "ping":
        # a server-side ping (rare): answer is the client's business
        return Control("ping")
    if "success" in obj:
        if obj.get("success"):
            return Control("ack", detail=str(op))
        return Control("error", detail=f"{op}: {ret_msg}")
    return Control("other", detail=orjson.dumps(obj).decode()[:200])


def parse_ws_message(raw: bytes | str, receive_ns: int, symbols: SymbolMap | None = None) -> WsItem:
    """One WS frame -> `[DepthDiff]` for an `orderbook.*` push, else a `Control`.

    `type: snapshot` and any push with `u == 1` give `is_snapshot=True`. event_time =
    `ts`, transaction_time = `cts` (matching engine) when present.
    """
    obj = _loads(raw)
    if type(obj) is not dict:
        raise _malformed("frame is not a JSON object")
    topic = obj.get("topic")
    if topic is None:
        return _control(obj)
    if type(topic) is not str:
        raise _malformed(f"field 'topic' is not a string: {topic!r}")
    if not topic.startswith(_TOPIC_PREFIX):
        return Control("other", detail=topic)
    data = obj.get("data")
    venue_sym = topic.rsplit(".", 1)[-1]
    if type(data) is not dict:
        raise _malformed("missing field 'data'", venue_sym)
    named = data.get("s")
    if named is not None and type(named) is not str:
        raise _malformed(f"field 'data.s' is not a string: {named!r}", venue_sym)
    venue_sym = named or venue_sym
    symbol = symbols.get(venue_sym, venue_sym) if symbols is not None else venue_sym
    kind = obj.get("type")
    if kind not in ("snapshot", "delta"):
        raise _malformed(f"field 'type' is {kind!r}, expected snapshot or delta", symbol)
    # `diff_ids` gives a delta prev = u - 1: that must fit in Int64 too
    u = _int(data, "u", symbol, where="data.", lo=INT64_MIN + 1)
    is_snapshot = kind == "snapshot" or u == rules.RESET_UPDATE_ID
    first, last, prev = rules.diff_ids(u, is_snapshot)
    return [
        DepthDiff(
            exchange=EXCHANGE,
            market=MARKET_FUTURES,
            symbol=symbol,
            event_time=_time(obj, "ts", symbol),
            transaction_time=_opt_time(obj, "cts", symbol),
            first_update_id=first,
            last_update_id=last,
            prev_update_id=prev,
            bids=_levels(data.get("b"), "data.b", symbol),
            asks=_levels(data.get("a"), "data.a", symbol),
            receive_time=receive_ns,
            is_snapshot=is_snapshot,
        )
    ]


def parse_instruments(body: bytes) -> dict[str, Instrument]:
    """`/v5/market/instruments-info?category=linear` body -> venue symbol -> Instrument.

    Sizes are base-asset units (multiplier 1). One page only: see `instruments_cursor`.
    """
    obj = _loads(body)
    check_ret_code(obj)
    res = obj.get("result")
    items = res.get("list") if type(res) is dict else None
    if type(items) is not list:
        raise _malformed("missing field 'result.list'")
    out: dict[str, Instrument] = {}
    for it in items:
        if type(it) is not dict or type(it.get("symbol")) is not str:
            raise _malformed("an entry of 'result.list' has no 'symbol'")
        pf = it.get("priceFilter") or {}
        lf = it.get("lotSizeFilter") or {}
        out[it["symbol"]] = Instrument(
            venue_symbol=it["symbol"],
            status_ok=it.get("status") == "Trading",
            multiplier=1.0,
            multiplier_text="1",
            tick_size=str(pf.get("tickSize", "")),
            step_size=str(lf.get("qtyStep", "")),
        )
    return out


def instruments_cursor(body: bytes) -> str:
    """`result.nextPageCursor` of an instruments page ("" on the last page)."""
    obj = _loads(body)
    res = obj.get("result") if type(obj) is dict else None
    return str(res.get("nextPageCursor") or "") if type(res) is dict else ""
