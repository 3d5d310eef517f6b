"""What every venue package provides, so the pipeline never branches on the venue.

Each `cryptoflow/exchanges/<venue>/` has:
- `parse.py`  pure functions, bytes -> records (no I/O), tested on recorded real data:
    parse_rest_snapshot(body: bytes, symbol: str, receive_ns: int, **venue_args) -> DepthSnapshot
    parse_ws_message(raw: bytes | str, receive_ns: int, symbols: SymbolMap) -> WsItem
    parse_instruments(body: bytes) -> dict[str, Instrument]
- `rules.py`  the venue's sequence rules for the shared book-sync machine (`book/sync.py`)
- `rest.py`   HTTP: snapshot + instruments requests, throttle/ban signals -> `errors`
- `ws.py`     WebSocket: connect (bound to the shard's IP), subscribe, keepalive, reconnect
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from cryptoflow.models import DepthDiff

#: venue instrument id -> normalized symbol (e.g. "XBTUSDTM" -> "BTCUSDT")
SymbolMap = Mapping[str, str]


@attrs.frozen(slots=True)
class Control:
    """A WebSocket frame that carries no book data (ack, pong, welcome, notice, error)."""

    kind: str  # "ack" | "pong" | "ping" | "welcome" | "notice" | "error" | "other"
    detail: str = ""
    reconnect: bool = False  # the venue announced it will close this connection soon


#: what `parse_ws_message` returns: book updates (a frame may carry several), or control
WsItem = list[DepthDiff] | Control


@attrs.frozen(slots=True)
class Instrument:
    """What the instruments endpoint says about one contract."""

    venue_symbol: str
    status_ok: bool  # trading / live / open
    multiplier: float = 1.0  # base-asset units per venue size unit (OKX ctVal, KuCoin lots)
    multiplier_text: str = "1"  # as the venue wrote it, for exact decimal scaling
    tick_size: str = ""
    step_size: str = ""
    #: why its sizes cannot be stored in base-asset units ("" = they can): an inverse
    #: contract's size unit is quote currency, so base size would need each level's price
    unsupported: str = ""
