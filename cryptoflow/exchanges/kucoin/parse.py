"""KuCoin Futures: pure parsers, bytes -> records (no I/O).

- `parse_rest_snapshot`: `GET /api/v1/level2/snapshot?symbol=XBTUSDTM` body.
  `is_plain_success`, `count_snapshot_levels`: quick looks at a body the poll lane
  leaves unparsed until the writer's flush (read then by `exchanges/kucoin/batch.py`).
- `parse_ws_message`: one frame of the futures public WebSocket (welcome, ack, pong,
  error, `/contractMarket/level2:<symbol>` messages).
- `parse_instruments`: `GET /api/v1/contracts/active` body.

Prices and sizes come as JSON numbers (REST) or inside "price,side,size" (stream). The
REST bodies are decoded with the standard library's `json` with ``parse_float=str`` so
each number's text is kept exactly (orjson would give floats), then every price and size
is put in `rules.canonical_decimal` form, the same on both lanes. Sizes are lots
(× multiplier). Ids are normalized as `rules.py` says.
"""

from __future__ import annotations

import json
from typing import Any, Final

import attrs

from cryptoflow.exchanges.base import Control, Instrument, SymbolMap, WsItem
from cryptoflow.exchanges.fields import INT64_MIN, Fields, plain_success
from cryptoflow.exchanges.kucoin import rules
from cryptoflow.models import MARKET_FUTURES, DepthDiff, DepthSnapshot, Level, SnapshotSource

EXCHANGE = rules.EXCHANGE
_F = Fields(EXCHANGE)


_malformed = _F.malformed
_loads = _F.loads
_int = _F.int


def _loads_exact(body: bytes | str, symbol: str = "") -> Any:
    """JSON with every non-integer number kept as its source text (a str)."""
    try:
        return json.loads(body, parse_float=str)
    except (ValueError, UnicodeDecodeError) as e:
        raise _malformed(f"not JSON: {e}", symbol) from None


def _num_text(v: Any, field: str, symbol: str) -> str:
    """A number from `_loads_exact` (int, or float text) or a numeric string -> canonical."""
    if type(v) is int:
        return str(v)
    if type(v) is str:
        try:
            return rules.canonical_decimal(v)
        except ValueError:
            pass
    raise _malformed(f"field {field!r} is not a number: {v!r}", symbol)


def _levels(raw: Any, field: str, symbol: str) -> list[Level]:
    """[[price, size], ...] -> levels, each number `_num_text`-normalized.

    Hot (1000-level snapshots): the common cases are inlined — float text that is
    already canonical is kept as it is, an int becomes `str(int)`; anything else goes
    through `_num_text` (the same results as calling it for every value)."""
    if type(raw) is not list:
        raise _malformed(f"field {field!r} is not a list", symbol)
    out: list[Level] = []
    append = out.append
    canonical = rules.is_canonical
    for lv in raw:
        if type(lv) is not list or len(lv) < 2:
            raise _malformed(f"field {field!r} has a level that is not [price, size]", symbol)
        p, q = lv[0], lv[1]
        if type(p) is int:
            p = str(p)
        elif type(p) is not str or canonical(p) is None:
            p = _num_text(p, field, symbol)
        if type(q) is int:
            q = str(q)
        elif type(q) is not str or canonical(q) is None:
            q = _num_text(q, field, symbol)
        append((p, q))
    return out


def default_symbol(venue_symbol: str) -> str:
    """`XBTUSDTM` -> `BTCUSDT`, `ETHUSDCM` -> `ETHUSDC`: drop the trailing M, XBT -> BTC."""
    s = venue_symbol.removesuffix("M")
    if s.startswith("XBT"):
        s = "BTC" + s[3:]
    return s


def check_code(obj: Any, symbol: str = "") -> None:
    """Raise the error a non-"200000" `code` stands for."""
    _F.check_body_code(
        obj,
        symbol,
        field="code",
        ok=rules.CODE_OK,
        message_field="msg",
        rate_limited=rules.RATE_LIMITED_CODES,
        server_errors=rules.SERVER_ERROR_CODES,
        retry_after=rules.RATE_LIMIT_RETRY_AFTER_S,
        as_text=True,
    )


#: how every success body of `GET /api/v1/level2/snapshot` begins (`code` is its first key)
SUCCESS_PREFIX: Final = b'{"code":"200000",'


def is_plain_success(body: bytes) -> bool:
    """`fields.plain_success` for this venue's depth body (`KucoinRest.fetch_snapshot_body`)."""
    return plain_success(body, SUCCESS_PREFIX, b'"code"')


def count_snapshot_levels(body: bytes) -> int:
    """The levels in a well-formed `/api/v1/level2/snapshot` body: the writer's accounting
    for a body it parses later (the flush counts exactly).

    Each level is one `[price,size]`: the first of a side opens with `[[`, each other one
    with `],[`, and no other `[[` or `],[` occurs (the rest of the body is the code, the
    symbol and two integers)."""
    return body.count(b"[[") + body.count(b"],[")


def parse_rest_snapshot(
    body: bytes, symbol: str, receive_ns: int, source: SnapshotSource = SnapshotSource.POLL
) -> DepthSnapshot:
    """`/api/v1/level2/snapshot` body -> snapshot at `data.sequence`.

    `symbol` is the normalized name. event_time = `data.ts` (ns on the wire) in ms.
    """
    obj = _loads_exact(body, symbol)
    check_code(obj, symbol)
    data = obj.get("data")
    if type(data) is not dict:
        raise _malformed("missing field 'data'", symbol)
    return DepthSnapshot(
        exchange=EXCHANGE,
        market=MARKET_FUTURES,
        symbol=symbol,
        event_time=_F.time(data, "ts", symbol, where="data.", to_ms=rules.ns_to_ms),
        transaction_time=None,
        last_update_id=_int(data, "sequence", symbol, where="data."),
        bids=_levels(data.get("bids"), "data.bids", symbol),
        asks=_levels(data.get("asks"), "data.asks", symbol),
        receive_time=receive_ns,
        source=source,
    )


def _parse_change(change: Any, symbol: str) -> tuple[list[Level], list[Level]]:
    """ "price,side,size" -> (bids, asks); price 0 -> no level at all."""
    if type(change) is not str:
        raise _malformed(f"field 'data.change' is not a string: {change!r}", symbol)
    parts = change.split(",")
    if len(parts) != 3:
        raise _malformed(f"field 'data.change' is not 'price,side,size': {change!r}", symbol)
    try:
        price = rules.canonical_decimal(parts[0].strip())
        size = rules.canonical_decimal(parts[2].strip())
    except ValueError:
        raise _malformed(f"field 'data.change' has a bad number: {change!r}", symbol) from None
    side = parts[1].strip()
    if side not in ("buy", "sell"):
        raise _malformed(f"field 'data.change' has side {side!r}, expected buy/sell", symbol)
    if price == "0":
        return [], []
    return ([(price, size)], []) if side == "buy" else ([], [(price, size)])


def parse_ws_message(raw: bytes | str, receive_ns: int, symbols: SymbolMap | None = None) -> WsItem:
    """One WS frame -> `[DepthDiff]` for a level2 message, else a `Control`.

    A price-0 message gives a `DepthDiff` with empty bids/asks: its sequence counts.
    event_time = `data.timestamp` (ms; ns/µs accepted and converted).
    """
    obj = _loads(raw)
    if type(obj) is not dict:
        raise _malformed("frame is not a JSON object")
    kind = obj.get("type")
    if kind == "welcome":
        return Control("welcome", detail=str(obj.get("id", "")))
    if kind == "ack":
        return Control("ack", detail=str(obj.get("id", "")))
    if kind == "pong":
        return Control("pong", detail=str(obj.get("id", "")))
    if kind == "ping":
        return Control("ping", detail=str(obj.get("id", "")))
    if kind == "error":
        return Control("error", detail=f"{obj.get('code', '')} {obj.get('data', '')}".strip())
    if kind != "message":
        return Control("other", detail=str(kind))
    topic = obj.get("topic")
    if type(topic) is not str:
        raise _malformed("missing field 'topic'")
    if not topic.startswith(rules.LEVEL2_TOPIC_PREFIX):
        return Control("other", detail=topic)
    venue_sym = topic[len(rules.LEVEL2_TOPIC_PREFIX) :]
    symbol = (symbols.get(venue_sym) if symbols is not None else None) or default_symbol(venue_sym)
    data = obj.get("data")
    if type(data) is not dict:
        raise _malformed("missing field 'data'", symbol)
    # `diff_ids` gives prev = sequence - 1: that must fit in Int64 too
    seq = _int(data, "sequence", symbol, where="data.", lo=INT64_MIN + 1)
    bids, asks = _parse_change(data.get("change"), symbol)
    first, last, prev = rules.diff_ids(seq)
    return [
        DepthDiff(
            exchange=EXCHANGE,
            market=MARKET_FUTURES,
            symbol=symbol,
            event_time=_F.time(data, "timestamp", symbol, where="data.", to_ms=rules.ns_to_ms),
            transaction_time=None,
            first_update_id=first,
            last_update_id=last,
            prev_update_id=prev,
            bids=bids,
            asks=asks,
            receive_time=receive_ns,
        )
    ]


def parse_instruments(body: bytes) -> dict[str, Instrument]:
    """`/api/v1/contracts/active` body -> symbol -> Instrument.

    multiplier = `multiplier` (base units per lot; its JSON text kept exactly in
    multiplier_text), status_ok = `status == "Open"`, tick = `tickSize`, step = `lotSize`.
    An inverse contract (`isInverse`, e.g. XBTUSDM: the multiplier is -1, one lot is
    1 USD, so a base size would need each level's price) or a multiplier that is not
    positive is marked `unsupported`.
    """
    obj = _loads_exact(body)
    check_code(obj)
    items = obj.get("data")
    if type(items) is not list:
        raise _malformed("field 'data' is not a list")
    out: dict[str, Instrument] = {}
    for it in items:
        if type(it) is not dict or type(it.get("symbol")) is not str:
            raise _malformed("an entry of 'data' has no 'symbol'")
        sym = it["symbol"]
        mult_text = _num_text(it.get("multiplier"), "multiplier", sym)
        tick = it.get("tickSize")
        lot = it.get("lotSize")
        out[sym] = Instrument(
            venue_symbol=sym,
            status_ok=it.get("status") == "Open",
            multiplier=float(mult_text),
            multiplier_text=mult_text,
            tick_size=_num_text(tick, "tickSize", sym) if tick is not None else "",
            step_size=_num_text(lot, "lotSize", sym) if lot is not None else "",
            unsupported=_unsupported(it, mult_text),
        )
    return out


def _unsupported(contract: dict, mult_text: str) -> str:
    if contract.get("isInverse") is True:
        return (
            f"an inverse contract (multiplier {mult_text}, sizes in quote currency): "
            "base-asset sizes would need each level's price; only linear contracts are "
            "supported"
        )
    if not float(mult_text) > 0:
        return f"multiplier {mult_text} is not positive"
    return ""


@attrs.frozen(slots=True)
class Bullet:
    """What `POST /api/v1/bullet-public` grants: a token for one WebSocket connection."""

    token: str
    endpoint: str  # e.g. wss://ws-api-futures.kucoin.com/
    ping_interval_s: float
    ping_timeout_s: float

    def url(self, connect_id: str) -> str:
        sep = "&" if "?" in self.endpoint else "?"
        return f"{self.endpoint}{sep}token={self.token}&connectId={connect_id}"


def parse_bullet(body: bytes) -> Bullet:
    """`/api/v1/bullet-public` body -> token, first instance server, ping timing (s)."""
    obj = _loads(body)
    check_code(obj)
    data = obj.get("data")
    if type(data) is not dict or type(data.get("token")) is not str:
        raise _malformed("missing field 'data.token'")
    servers = data.get("instanceServers")
    if type(servers) is not list or not servers or type(servers[0]) is not dict:
        raise _malformed("field 'data.instanceServers' is not a non-empty list")
    server = servers[0]
    endpoint = server.get("endpoint")
    if type(endpoint) is not str or not endpoint:
        raise _malformed("missing field 'data.instanceServers[0].endpoint'")

    def seconds(field: str, default: float) -> float:
        v = server.get(field)
        if type(v) in (int, float) and v > 0:
            return float(v) / 1000.0
        return default

    return Bullet(
        token=data["token"],
        endpoint=endpoint,
        ping_interval_s=seconds("pingInterval", rules.DEFAULT_PING_INTERVAL_S),
        ping_timeout_s=seconds("pingTimeout", rules.DEFAULT_PING_TIMEOUT_S),
    )
