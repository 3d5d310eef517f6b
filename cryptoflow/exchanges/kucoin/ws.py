"""KuCoin Futures level-2 stream: `/contractMarket/level2:<symbols>` via a bullet token.

Every (re)connect first asks `POST /api/v1/bullet-public` for a new token, endpoint and
ping interval (tokens expire), connects to `<endpoint>?token=..&connectId=..`, waits for
the `welcome` message, then subscribes (up to 100 symbols per subscribe message, joined
with commas in one topic). Keepalive: `{"id", "type": "ping"}` every `pingInterval`.
The stream has no snapshot: a broken book is healed by a REST snapshot
(`SyncRules.resync_by == "rest"`), so there is no `resubscribe`.
"""

from __future__ import annotations

import itertools
import uuid

import orjson
import trio

from cryptoflow.errors import ExchangeError, MalformedMessage
from cryptoflow.exchanges.base import Control, SymbolMap, WsItem
from cryptoflow.exchanges.kucoin import parse, rules
from cryptoflow.exchanges.kucoin.rest import KucoinRest
from cryptoflow.net.ws import WsConnection

DEFAULT_WS_URL = "wss://ws-api-futures.kucoin.com/"  # informative: the bullet names it
STREAMS_PER_CONNECTION = 100
WELCOME_TIMEOUT_S = 10.0


class KucoinStream:
    exchange = rules.EXCHANGE
    keepalive_interval: float | None = rules.DEFAULT_PING_INTERVAL_S
    streams_per_connection = STREAMS_PER_CONNECTION

    def __init__(self, rest: KucoinRest, symbols: SymbolMap) -> None:
        self.rest = rest
        self.symbols = symbols
        self._ids = itertools.count(1)
        self.connect_id = ""

    async def url(self, venue_symbols: list[str]) -> str:
        bullet = await self.rest.bullet_public()  # a new token on every (re)connect
        self.keepalive_interval = bullet.ping_interval_s
        self.connect_id = uuid.uuid4().hex
        return bullet.url(self.connect_id)

    async def on_open(self, ws: WsConnection, venue_symbols: list[str]) -> None:
        with trio.fail_after(WELCOME_TIMEOUT_S):
            while True:
                raw = await ws.get_message()
                try:
                    item = parse.parse_ws_message(raw, 0, self.symbols)
                except MalformedMessage:
                    continue
                if isinstance(item, Control) and item.kind == "welcome":
                    break
                if isinstance(item, Control) and item.kind == "error":
                    raise ExchangeError(
                        f"KuCoin refused the connection: {item.detail}", exchange=self.exchange
                    )
        step = rules.MAX_TOPICS_PER_SUBSCRIBE
        for i in range(0, len(venue_symbols), step):
            topic = rules.LEVEL2_TOPIC_PREFIX + ",".join(venue_symbols[i : i + step])
            await ws.send_message(
                orjson.dumps(
                    {
                        "id": str(next(self._ids)),
                        "type": "subscribe",
                        "topic": topic,
                        "privateChannel": False,
                        "response": True,
                    }
                ).decode()
            )

    async def keepalive(self, ws: WsConnection) -> None:
        await ws.send_message(orjson.dumps({"id": str(next(self._ids)), "type": "ping"}).decode())

    def parse(self, raw: str | bytes, receive_ns: int) -> WsItem:
        return parse.parse_ws_message(raw, receive_ns, self.symbols)
