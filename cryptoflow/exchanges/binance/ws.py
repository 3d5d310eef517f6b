"""Binance USD-M diff-depth streams: combined-stream URL per connection, no subscribe step.

Streams are named in the URL (`/public/stream?streams=a@depth@100ms/b@depth@100ms`), so a
reconnect re-subscribes by construction. Keepalive is the server's ping, which our
WebSocket client (`net/ws.py`) answers; Binance cuts connections after 24 h, so the
stream runner reconnects earlier (`reader.ws_reconnect_after`).
"""

from __future__ import annotations

from cryptoflow.exchanges.base import SymbolMap, WsItem
from cryptoflow.exchanges.binance import parse
from cryptoflow.net.ws import WsConnection

DEFAULT_WS_URL = "wss://fstream.binance.com"
STREAMS_PER_CONNECTION = 200  # venue allows 1024; smaller groups limit the blast radius


class BinanceStream:
    exchange = "binance"
    keepalive_interval: float | None = None  # server pings; answered automatically
    streams_per_connection = STREAMS_PER_CONNECTION

    def __init__(self, ws_base_url: str, speed: str, symbols: SymbolMap) -> None:
        self.ws_base_url = (ws_base_url or DEFAULT_WS_URL).rstrip("/")
        self.speed = speed
        self.symbols = symbols  # venue symbol -> normalized

    def stream_name(self, venue_symbol: str) -> str:
        suffix = "" if self.speed in ("", "250ms") else f"@{self.speed}"
        return f"{venue_symbol.lower()}@depth{suffix}"

    async def url(self, venue_symbols: list[str]) -> str:
        streams = "/".join(self.stream_name(s) for s in venue_symbols)
        return f"{self.ws_base_url}/public/stream?streams={streams}"

    async def on_open(self, ws: WsConnection, venue_symbols: list[str]) -> None:
        return None

    async def keepalive(self, ws: WsConnection) -> None:
        return None

    def parse(self, raw: str | bytes, receive_ns: int) -> WsItem:
        return parse.parse_ws_message(raw, receive_ns, self.symbols)
