"""Bybit v5 linear REST: order-book snapshots and the (paginated) instruments list.

Throttle/ban signals: HTTP 403 is Bybit's IP rate ban (about 10 minutes: nothing may be
sent from the IP before it ends); `retCode` 10006/10018 in an HTTP-200 body is a per-API
throttle (`parse.check_ret_code` raises it, we also slow the shard's budget down).
"""

from __future__ import annotations

import httpx

from cryptoflow.errors import IPBanned, RateLimited
from cryptoflow.exchanges.base import Instrument
from cryptoflow.exchanges.bybit import parse, rules
from cryptoflow.exchanges.limits import VENUE_LIMITS
from cryptoflow.models import MARKET_FUTURES, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.rest import VenueRest, retry_after_seconds

DEFAULT_REST_URL = rules.REST_BASE
WEIGHT_LIMIT_PER_MINUTE = VENUE_LIMITS["bybit"].limit_per_minute
#: at most this many instruments pages (1000 instruments each): a loop guard
MAX_INSTRUMENT_PAGES = 20


class BybitRest(VenueRest):
    exchange = rules.EXCHANGE

    def interpret(self, resp: httpx.Response, symbol: str) -> None:
        if resp.status_code == rules.IP_BAN_STATUS:
            wait = retry_after_seconds(resp, rules.IP_BAN_RETRY_AFTER_S)
            self.budget.ban(wait)
            raise IPBanned(
                f"HTTP 403 (IP rate ban) for {wait:g}s",
                retry_after=wait,
                exchange=self.exchange,
                symbol=symbol,
            )
        super().interpret(resp, symbol)

    def _throttled(self, exc: RateLimited) -> None:
        self.budget.throttle(exc.retry_after)

    async def fetch_snapshot(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = rules.REST_DEPTH_MAX_LIMIT,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot:
        body, receive_ns = await self._get_depth(symbol, venue_symbol, depth_limit)
        return self._parse_depth(body, symbol, receive_ns, source)

    async def fetch_snapshot_body(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = rules.REST_DEPTH_MAX_LIMIT,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot | SnapshotBody:
        """The depth snapshot unparsed: the poll lane parses it later, in a batch.

        Bybit reports throttles and errors in HTTP-200 bodies (`retCode`), and those must
        act now (the budget slows down at once, the poller sees the error). So only a
        body that is certainly a success (`parse.is_plain_success`) is handed on
        unparsed; any other is parsed here as `fetch_snapshot` does: it raises what the
        body stands for, or (a success in an unusual shape) gives the DepthSnapshot."""
        body, receive_ns = await self._get_depth(symbol, venue_symbol, depth_limit)
        if not parse.is_plain_success(body):
            return self._parse_depth(body, symbol, receive_ns, source)
        return SnapshotBody(parse.EXCHANGE, MARKET_FUTURES, symbol, body, receive_ns, source)

    async def _get_depth(
        self, symbol: str, venue_symbol: str, depth_limit: int
    ) -> tuple[bytes, int]:
        limit = max(1, min(depth_limit, rules.REST_DEPTH_MAX_LIMIT))
        return await self.get(
            rules.REST_DEPTH_PATH,
            {"category": rules.CATEGORY, "symbol": venue_symbol, "limit": limit},
            weight=1,
            symbol=symbol,
        )

    def _parse_depth(
        self, body: bytes, symbol: str, receive_ns: int, source: SnapshotSource
    ) -> DepthSnapshot:
        try:
            return parse.parse_rest_snapshot(body, symbol, receive_ns, source=source)
        except RateLimited as exc:
            self._throttled(exc)
            raise

    async def fetch_instruments(self) -> dict[str, Instrument]:
        out: dict[str, Instrument] = {}
        cursor = ""
        for _ in range(MAX_INSTRUMENT_PAGES):
            params: dict[str, str | int] = {"category": rules.CATEGORY, "limit": 1000}
            if cursor:
                params["cursor"] = cursor
            body, _ = await self.get(rules.REST_INSTRUMENTS_PATH, params, weight=1)
            try:
                out.update(parse.parse_instruments(body))
            except RateLimited as exc:
                self._throttled(exc)
                raise
            cursor = parse.instruments_cursor(body)
            if not cursor:
                break
        return out
