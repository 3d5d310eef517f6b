"""OKX v5 swaps: pure parsers, bytes -> records (no I/O).

- `parse_rest_snapshot`: `GET /api/v5/market/books` (or `books-full`) body.
- `parse_snapshot_body`, `count_snapshot_levels`: the same body kept unparsed for the
  writer's flush (the snapshot lane, `pipeline/bodies.py`; batch reader in `batch.py`).
- `parse_ws_message`: one frame of `wss://ws.okx.com:8443/ws/v5/public` (book channels,
  events, the literal text `pong`). One `DepthDiff` per element of `data`.
- `parse_instruments`: `GET /api/v5/public/instruments?instType=SWAP` body.

Levels arrive as ``[price, size, deprecated, orders]``: only (price, size) are kept, as
the strings OKX sent (the checksum depends on them). Sizes are contracts (× ctVal).
Ids are normalized as `rules.py` says.
"""

from __future__ import annotations

from typing import Any

from cryptoflow.errors import RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.base import Control, Instrument, SymbolMap, WsItem
from cryptoflow.exchanges.fields import Fields
from cryptoflow.exchanges.okx import rules
from cryptoflow.exchanges.okx.rules import LegacySequencer
from cryptoflow.models import MARKET_FUTURES, DepthDiff, DepthSnapshot, SnapshotSource

EXCHANGE = rules.EXCHANGE


_F = Fields(EXCHANGE)
_malformed = _F.malformed
_loads = _F.loads
_levels = _F.levels
_int = _F.int
_opt_int = _F.opt_int
_time = _F.time


def default_symbol(inst_id: str) -> str:
    """`BTC-USDT-SWAP` -> `BTCUSDT`, `XMR-USDT-SWAP` -> `XMRUSDT`, `UNI-USD-SWAP` -> `UNIUSD`."""
    base = inst_id.removesuffix("-SWAP")
    return base.replace("-", "")


def check_code(obj: Any, symbol: str = "") -> None:
    """Raise the error a non-"0" `code` stands for."""
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


def parse_rest_snapshot(
    body: bytes, symbol: str, receive_ns: int, source: SnapshotSource = SnapshotSource.POLL
) -> DepthSnapshot:
    """`/api/v5/market/books[-full]` body -> snapshot; `symbol` is the normalized name.

    last_update_id = `seqId` when the body has it, else `rules.NO_SEQ_ID` (-1: usable by
    the snapshot lane, never as a stream anchor). event_time = `ts` (string, ms).
    """
    obj = _loads(body, symbol)
    check_code(obj, symbol)
    data = obj.get("data")
    if type(data) is not list or not data or type(data[0]) is not dict:
        raise _malformed("field 'data' is not a one-element list of books", symbol)
    book = data[0]
    seq = _opt_int(book, "seqId", symbol, where="data[0].")
    return DepthSnapshot(
        exchange=EXCHANGE,
        market=MARKET_FUTURES,
        symbol=symbol,
        event_time=_time(book, "ts", symbol, where="data[0]."),
        transaction_time=None,
        last_update_id=rules.NO_SEQ_ID if seq is None else seq,
        bids=_levels(book.get("bids"), "data[0].bids", symbol),
        asks=_levels(book.get("asks"), "data[0].asks", symbol),
        receive_time=receive_ns,
        source=source,
    )


def parse_snapshot_body(
    body: bytes, symbol: str, receive_ns: int, source: SnapshotSource = SnapshotSource.POLL
) -> DepthSnapshot:
    """`parse_rest_snapshot` for a body kept for later (`SnapshotCodec.parse`): the same
    snapshot, but an error `code` is a `MalformedMessage` too, as that codec promises.

    `OkxRest.fetch_snapshot_body` raises the error a code stands for at fetch time (the
    rate budget must throttle then) and keeps only bodies that start `{"code":"0",`; one
    that still has an error code later (a second `code` key: JSON's last one wins) can
    only be left out, and must not stop the normalizer or fail the writer's flush.
    """
    try:
        return parse_rest_snapshot(body, symbol, receive_ns, source)
    except (RateLimited, ServerError, RequestRejected) as exc:
        detail = str(exc).removeprefix(f"{EXCHANGE}/{symbol}: ")
        raise _malformed(f"error code in a body read after the fetch: {detail}", symbol) from None


def count_snapshot_levels(body: bytes) -> int:
    """The levels in a well-formed books body (the writer's accounting for a body it
    parses later; the flush counts exactly).

    Each level is one `["px","sz","0","n"]`, so one `["` each; no other `["` occurs in the
    shape `batch.py` reads unless a string ends in `[`, which OKX's numbers and its
    success `msg` ("") never do.
    """
    return body.count(b'["')


def _event(obj: dict[str, Any]) -> Control:
    event = obj.get("event")
    code = str(obj.get("code", "") or "")
    msg = str(obj.get("msg", "") or "")
    if event in ("subscribe", "unsubscribe"):
        arg = obj.get("arg")
        arg = arg if type(arg) is dict else {}
        detail = f"{event} {arg.get('channel', '')}:{arg.get('instId', '')}"
        return Control("ack", detail=detail)
    if event == "error":
        return Control("error", detail=f"{code} {msg}".strip())
    if event == "notice":
        return Control(
            "notice", detail=f"{code} {msg}".strip(), reconnect=code == rules.NOTICE_RECONNECT_CODE
        )
    return Control("other", detail=f"{event} {code} {msg}".strip())


def parse_ws_message(
    raw: bytes | str,
    receive_ns: int,
    symbols: SymbolMap | None = None,
    legacy: LegacySequencer | None = None,
) -> WsItem:
    """One WS frame -> a `DepthDiff` per `data` element of a book push, else a `Control`.

    `legacy` (one per connection) gives frames without seqId/prevSeqId a synthetic id
    chain; see `rules.py`. `checksum` is carried as sent (0 = not computed by OKX).
    """
    if raw == "pong" or raw == b"pong":
        return Control("pong")
    if raw == "ping" or raw == b"ping":
        return Control("ping")
    obj = _loads(raw)
    if type(obj) is not dict:
        raise _malformed("frame is not a JSON object")
    if "event" in obj:
        return _event(obj)
    arg = obj.get("arg")
    if type(arg) is not dict:
        raise _malformed("missing field 'arg'")
    inst_id = arg.get("instId")
    if type(inst_id) is not str:
        raise _malformed("missing field 'arg.instId'")
    channel = arg.get("channel")
    symbol = (symbols.get(inst_id) if symbols is not None else None) or default_symbol(inst_id)
    if type(channel) is not str or channel not in rules.BOOK_CHANNELS:
        return Control("other", detail=f"{channel}:{inst_id}")
    action = obj.get("action", "snapshot")  # books5 pushes carry no action: full books
    if action not in ("snapshot", "update"):
        raise _malformed(f"field 'action' is {action!r}, expected snapshot or update", symbol)
    data = obj.get("data")
    if type(data) is not list:
        raise _malformed("field 'data' is not a list", symbol)
    out: list[DepthDiff] = []
    for i, d in enumerate(data):
        where = f"data[{i}]."
        if type(d) is not dict:
            raise _malformed(f"field 'data[{i}]' is not an object", symbol)
        seq = _opt_int(d, "seqId", symbol, where=where)
        prev_seq = _opt_int(d, "prevSeqId", symbol, where=where)
        is_snapshot = action == "snapshot" or prev_seq == rules.SNAPSHOT_PREV_SEQ_ID
        if seq is not None and prev_seq is not None:
            first, last, prev = rules.diff_ids(seq, prev_seq, is_snapshot)
        elif seq is not None or prev_seq is not None:
            raise _malformed(f"{where}seqId and {where}prevSeqId must come together", symbol)
        elif legacy is not None:
            first, last, prev = legacy.next_ids(inst_id, is_snapshot)
        else:
            first = last = rules.LEGACY_ID
            prev = None
        cks = d.get("checksum")
        if cks is not None and type(cks) is not int:
            raise _malformed(f"field {where}'checksum' is not an integer: {cks!r}", symbol)
        out.append(
            DepthDiff(
                exchange=EXCHANGE,
                market=MARKET_FUTURES,
                symbol=symbol,
                event_time=_time(d, "ts", symbol, where=where),
                transaction_time=None,
                first_update_id=first,
                last_update_id=last,
                prev_update_id=prev,
                bids=_levels(d.get("bids"), f"{where}bids", symbol),
                asks=_levels(d.get("asks"), f"{where}asks", symbol),
                receive_time=receive_ns,
                is_snapshot=is_snapshot,
                checksum=cks,
            )
        )
    return out


def parse_instruments(body: bytes) -> dict[str, Instrument]:
    """`/api/v5/public/instruments?instType=SWAP` body -> instId -> Instrument.

    multiplier = `ctVal` (contract value in `ctValCcy`: base currency for linear USDT
    swaps), status_ok = `state == "live"`, tick = `tickSz`, step = `lotSz`. An inverse
    swap (`ctType` "inverse", e.g. UNI-USD-SWAP: `ctVal` is USD, so a base size would
    need each level's price) or a `ctVal` that is not positive is marked `unsupported`.
    """
    obj = _loads(body)
    check_code(obj)
    items = obj.get("data")
    if type(items) is not list:
        raise _malformed("field 'data' is not a list")
    out: dict[str, Instrument] = {}
    for it in items:
        if type(it) is not dict or type(it.get("instId")) is not str:
            raise _malformed("an entry of 'data' has no 'instId'")
        inst_id = it["instId"]
        ct_val = str(it.get("ctVal") or "")
        if not ct_val:  # not a contract (spot, margin): nothing to scale
            continue
        try:
            mult = float(ct_val)
        except ValueError:
            raise _malformed(f"field 'ctVal' is not a number: {ct_val!r}", inst_id) from None
        out[inst_id] = Instrument(
            venue_symbol=inst_id,
            status_ok=it.get("state") == "live",
            multiplier=mult,
            multiplier_text=ct_val,
            tick_size=str(it.get("tickSz", "")),
            step_size=str(it.get("lotSz", "")),
            unsupported=_unsupported(it, ct_val, mult),
        )
    return out


def _unsupported(inst: dict, ct_val: str, mult: float) -> str:
    ccy = str(inst.get("ctValCcy") or "")
    if inst.get("ctType") == "inverse":
        return (
            f"an inverse swap (ctVal {ct_val} {ccy or '?'} a contract): base-asset sizes "
            "would need each level's price; only linear swaps are supported"
        )
    if not mult > 0:
        return f"contract value ctVal {ct_val} is not positive"
    return ""
