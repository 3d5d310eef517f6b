"""Bybit v5 linear order-book stream: `orderbook.<depth>.<symbol>` topics on one socket.

Subscribe after connecting (at most `MAX_TOPICS_PER_SUBSCRIBE` args per request), send
`{"op": "ping"}` every 20 s. Each subscribe is answered by a `snapshot` push, so a broken
book is healed by `resubscribe` (unsubscribe + subscribe): the runner calls it on the
live connection when the sync machine asks (`SyncRules.resync_by == "resubscribe"`).
"""

from __future__ import annotations

import itertools
from urllib.parse import urlsplit

import orjson

from cryptoflow.exchanges.base import SymbolMap, WsItem
from cryptoflow.exchanges.bybit import parse, rules
from cryptoflow.net.ws import WsConnection

DEFAULT_WS_URL = rules.WS_URL
WS_PATH = urlsplit(rules.WS_URL).path  # /v5/public/linear
STREAMS_PER_CONNECTION = 100
DEFAULT_DEPTH = 200


def ws_url_with_path(base: str, default_url: str) -> str:
    """`ws://host:port` (no path, e.g. the simulator) -> the venue's path on that host."""
    base = (base or default_url).rstrip("/")
    if urlsplit(base).path in ("", "/"):
        return base + urlsplit(default_url).path
    return base


class BybitStream:
    exchange = rules.EXCHANGE
    keepalive_interval: float | None = rules.PING_INTERVAL_S
    streams_per_connection = STREAMS_PER_CONNECTION
    snapshot_timeout = 5.0  # resubscribe answered by no snapshot: REST fallback
    args_per_request = rules.MAX_TOPICS_PER_SUBSCRIBE
    #: exchanges.md gives Bybit no cap on subscribe requests per connection
    subscribe_requests_per_hour: int | None = None

    def __init__(self, ws_url: str, depth: int, symbols: SymbolMap) -> None:
        self.ws_url = ws_url_with_path(ws_url, DEFAULT_WS_URL)
        self.depth = depth if depth in rules.WS_DEPTHS else DEFAULT_DEPTH
        self.symbols = symbols
        self._req_ids = itertools.count(1)

    def topic(self, venue_symbol: str) -> str:
        return f"orderbook.{self.depth}.{venue_symbol}"

    async def url(self, venue_symbols: list[str]) -> str:
        return self.ws_url

    def _request(self, op: str, topics: list[str]) -> str:
        return orjson.dumps({"op": op, "args": topics, "req_id": str(next(self._req_ids))}).decode()

    async def on_open(self, ws: WsConnection, venue_symbols: list[str]) -> None:
        topics = [self.topic(s) for s in venue_symbols]
        step = rules.MAX_TOPICS_PER_SUBSCRIBE
        for i in range(0, len(topics), step):
            await ws.send_message(self._request("subscribe", topics[i : i + step]))

    async def resubscribe(self, ws: WsConnection, venue_symbols: list[str]) -> None:
        """One unsubscribe and one subscribe per `MAX_TOPICS_PER_SUBSCRIBE` symbols."""
        topics = [self.topic(s) for s in venue_symbols]
        step = rules.MAX_TOPICS_PER_SUBSCRIBE
        for i in range(0, len(topics), step):
            await ws.send_message(self._request("unsubscribe", topics[i : i + step]))
            await ws.send_message(self._request("subscribe", topics[i : i + step]))

    async def keepalive(self, ws: WsConnection) -> None:
        await ws.send_message(orjson.dumps({"op": "ping", "req_id": "ping"}).decode())

    def parse(self, raw: str | bytes, receive_ns: int) -> WsItem:
        return parse.parse_ws_message(raw, receive_ns, self.symbols)
