"""Binance USD-M futures REST: depth snapshots and exchangeInfo, weight-accounted."""

from __future__ import annotations

import httpx

from cryptoflow.exchanges.base import Instrument
from cryptoflow.exchanges.binance import parse
from cryptoflow.models import MARKET_FUTURES, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.rest import VenueRest

DEFAULT_REST_URL = "https://fapi.binance.com"
WEIGHT_LIMIT_PER_MINUTE = 2400
VALID_DEPTH_LIMITS = (5, 10, 20, 50, 100, 500, 1000)


def depth_weight(limit: int) -> int:
    """Request weight of GET /fapi/v1/depth by `limit` (exchanges.md)."""
    if limit <= 50:
        return 2
    if limit <= 100:
        return 5
    if limit <= 500:
        return 10
    return 20


class BinanceRest(VenueRest):
    exchange = "binance"

    def interpret(self, resp: httpx.Response, symbol: str) -> None:
        used = resp.headers.get("X-MBX-USED-WEIGHT-1M")
        if used is not None and used.isdigit():
            self.budget.observe_used(int(used))
        super().interpret(resp, symbol)

    async def fetch_snapshot(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = 1000,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot:
        raw = await self.fetch_snapshot_body(
            symbol, venue_symbol, depth_limit=depth_limit, source=source
        )
        return parse.parse_rest_snapshot(raw.body, symbol, raw.receive_time, source=source)

    async def fetch_snapshot_body(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = 1000,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> SnapshotBody:
        """The depth snapshot unparsed: the poll lane parses it later, in a batch."""
        body, receive_ns = await self.get(
            "/fapi/v1/depth",
            {"symbol": venue_symbol, "limit": depth_limit},
            weight=depth_weight(depth_limit),
            symbol=symbol,
        )
        return SnapshotBody(parse.EXCHANGE, MARKET_FUTURES, symbol, bytes(body), receive_ns, source)

    async def fetch_instruments(self) -> dict[str, Instrument]:
        body, _ = await self.get("/fapi/v1/exchangeInfo", {}, weight=1)
        return parse.parse_instruments(body)
