"""OKX v5 public order-book stream: channel `books` per instId on one socket.

Subscribe after connecting, send the text `ping` every 20 s (OKX closes sockets idle for
30 s; the answer is the text `pong`). A notice 64008 (service upgrade) makes the parser
return `Control(reconnect=True)` and the runner reconnects. A break is healed by
`resubscribe` (unsubscribe + subscribe -> fresh `action: snapshot`; the symbols asked for
at once share one request of each, and OKX's 480 such requests per hour per connection
are kept by the runner); OKX announced
dropping the in-stream snapshot, so when none comes within `snapshot_timeout` the runner
falls back to a REST `books` snapshot (anchored on its `seqId`).
Frames without seqId/prevSeqId (old captures, or a venue that drops them) get synthetic
ids from one `LegacySequencer` per stream, and only the checksum can check them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import orjson

from cryptoflow.exchanges.base import SymbolMap, WsItem
from cryptoflow.exchanges.bybit.ws import ws_url_with_path
from cryptoflow.exchanges.okx import parse, rules
from cryptoflow.net.ratelimit import ConnectPacer
from cryptoflow.net.ws import WsConnection

DEFAULT_WS_URL = rules.WS_URL
WS_PATH = urlsplit(rules.WS_URL).path  # /ws/v5/public
STREAMS_PER_CONNECTION = 100
ARGS_PER_SUBSCRIBE = 20
CHANNEL = "books"
PING_INTERVAL_S = 20.0


class OkxStream:
    exchange = rules.EXCHANGE
    keepalive_interval: float | None = PING_INTERVAL_S
    streams_per_connection = STREAMS_PER_CONNECTION
    snapshot_timeout = 5.0
    #: on_open and resubscribe put this many symbols in one request; the runner keeps
    #: the requests of each connection under OKX's hourly cap (see `pipeline/stream.py`)
    args_per_request = ARGS_PER_SUBSCRIBE
    subscribe_requests_per_hour: int | None = rules.SUBSCRIBE_REQUESTS_PER_HOUR

    def __init__(self, ws_url: str, symbols: SymbolMap, channel: str = CHANNEL) -> None:
        self.ws_url = ws_url_with_path(ws_url, DEFAULT_WS_URL)
        self.symbols = symbols
        self.channel = channel
        self.legacy = rules.LegacySequencer()
        #: one stream object per shard, i.e. per source IP: OKX takes 3 new connections
        #: per second per IP (`pipeline/stream.py` waits on it before each connect)
        self.connect_pacer = ConnectPacer(rules.NEW_CONNECTIONS_PER_S)

    @property
    def can_hand_over(self) -> bool:
        """Frames without seqId get synthetic ids per connection (`legacy`), which two
        connections cannot compare: once any came, a planned reconnect closes the old
        connection first instead of overlapping (see `pipeline/stream.py`)."""
        return not self.legacy.last

    async def url(self, venue_symbols: list[str]) -> str:
        return self.ws_url

    def _request(self, op: str, inst_ids: list[str]) -> str:
        args = [{"channel": self.channel, "instId": i} for i in inst_ids]
        return orjson.dumps({"op": op, "args": args}).decode()

    async def on_open(self, ws: WsConnection, venue_symbols: list[str]) -> None:
        for inst_id in venue_symbols:  # a new connection restarts every legacy chain
            self.legacy.last.pop(inst_id, None)
        for i in range(0, len(venue_symbols), ARGS_PER_SUBSCRIBE):
            await ws.send_message(
                self._request("subscribe", venue_symbols[i : i + ARGS_PER_SUBSCRIBE])
            )

    async def resubscribe(self, ws: WsConnection, venue_symbols: list[str]) -> None:
        """One unsubscribe and one subscribe per `ARGS_PER_SUBSCRIBE` symbols: OKX counts
        requests (messages), not args, against its hourly cap."""
        for i in range(0, len(venue_symbols), ARGS_PER_SUBSCRIBE):
            chunk = venue_symbols[i : i + ARGS_PER_SUBSCRIBE]
            await ws.send_message(self._request("unsubscribe", chunk))
            await ws.send_message(self._request("subscribe", chunk))

    async def keepalive(self, ws: WsConnection) -> None:
        await ws.send_message("ping")

    def parse(self, raw: str | bytes, receive_ns: int) -> WsItem:
        return parse.parse_ws_message(raw, receive_ns, self.symbols, self.legacy)
