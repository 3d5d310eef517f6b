"""KuCoin Futures REST: full level-2 snapshots, active contracts, bullet-public tokens.

Throttle signals: HTTP 429 / body code 429000, with `gw-ratelimit-reset` (ms until the
pool refills) as the wait: the shard's budget sends nothing before it, and the error says
that wait (`retry after 22s`), so every log line of the throttle names the wait that
applies (the retries are scheduled on it too: `supervise.retry_delay`). The public pool's
usage headers (`gw-ratelimit-limit`, `gw-ratelimit-remaining`) slow the shard down before
a 429: when the remaining share of the pool falls under `1 - safety`, nothing more is sent
until the reset (a hold, like Binance's used-weight header: not counted as a throttle,
which counts the venue's 429s).
"""

from __future__ import annotations

import httpx

from cryptoflow.errors import RateLimited
from cryptoflow.exchanges.base import Instrument
from cryptoflow.exchanges.kucoin import parse, rules
from cryptoflow.exchanges.limits import KUCOIN_LEVEL2_SNAPSHOT_WEIGHT, VENUE_LIMITS
from cryptoflow.models import MARKET_FUTURES, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.ratelimit import blocked_wait
from cryptoflow.net.rest import VenueRest

DEFAULT_REST_URL = rules.REST_BASE
WEIGHT_LIMIT_PER_MINUTE = VENUE_LIMITS["kucoin"].limit_per_minute
BULLET_WEIGHT = 10
INSTRUMENTS_WEIGHT = 3


def _header_int(resp: httpx.Response, name: str) -> int | None:
    v = resp.headers.get(name)
    return int(v) if v is not None and v.strip().isdigit() else None


def reset_seconds(resp: httpx.Response, default: float) -> float:
    ms = _header_int(resp, "gw-ratelimit-reset")
    return ms / 1000.0 if ms is not None else default


class KucoinRest(VenueRest):
    exchange = rules.EXCHANGE

    def interpret(self, resp: httpx.Response, symbol: str) -> None:
        limit = _header_int(resp, "gw-ratelimit-limit")
        remaining = _header_int(resp, "gw-ratelimit-remaining")
        if resp.status_code == 429:
            wait = blocked_wait(reset_seconds(resp, rules.RATE_LIMIT_RETRY_AFTER_S))
            self.budget.throttle(wait)
            raise RateLimited(
                f"HTTP 429, retry after {wait:g}s: {resp.text[:120]}",
                retry_after=wait,
                exchange=self.exchange,
                symbol=symbol,
            )
        if limit and remaining is not None and remaining < (1 - self.budget.safety) * limit:
            # our own early slow-down on an answered request, not the venue's 429
            self.budget.hold(reset_seconds(resp, rules.RATE_LIMIT_RETRY_AFTER_S))
        self._last_reset = reset_seconds(resp, rules.RATE_LIMIT_RETRY_AFTER_S)
        super().interpret(resp, symbol)

    def _checked(self, fn, *args):
        try:
            return fn(*args)
        except RateLimited as exc:
            wait = blocked_wait(max(exc.retry_after, getattr(self, "_last_reset", 0.0)))
            self.budget.throttle(wait)
            raise RateLimited(
                f"{exc.message}, retry after {wait:g}s",  # the place is added once, here
                retry_after=wait,
                exchange=self.exchange,
                symbol=exc.symbol,
            ) from None

    async def fetch_snapshot(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = 0,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot:
        del depth_limit  # the level-2 snapshot is always the full book
        body, receive_ns = await self._get_snapshot(symbol, venue_symbol)
        return self._parse_snapshot(body, symbol, receive_ns, source)

    async def fetch_snapshot_body(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = 0,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot | SnapshotBody:
        """The depth snapshot unparsed: the poll lane parses it later, in a batch.

        KuCoin reports errors and throttles in HTTP-200 bodies too (`code`), and those
        must act now (the budget slows down at once, the poller sees the error). So only
        a body that is certainly a success (`parse.is_plain_success`) is handed on
        unparsed; any other is parsed here as `fetch_snapshot` does: it raises what the
        body stands for, or (a success in an unusual shape) gives the DepthSnapshot."""
        del depth_limit  # the level-2 snapshot is always the full book
        body, receive_ns = await self._get_snapshot(symbol, venue_symbol)
        if not parse.is_plain_success(body):
            return self._parse_snapshot(body, symbol, receive_ns, source)
        return SnapshotBody(parse.EXCHANGE, MARKET_FUTURES, symbol, body, receive_ns, source)

    async def _get_snapshot(self, symbol: str, venue_symbol: str) -> tuple[bytes, int]:
        return await self.get(
            rules.REST_SNAPSHOT_PATH,
            {"symbol": venue_symbol},
            weight=KUCOIN_LEVEL2_SNAPSHOT_WEIGHT,
            symbol=symbol,
        )

    def _parse_snapshot(
        self, body: bytes, symbol: str, receive_ns: int, source: SnapshotSource
    ) -> DepthSnapshot:
        return self._checked(parse.parse_rest_snapshot, body, symbol, receive_ns, source)

    async def fetch_instruments(self) -> dict[str, Instrument]:
        body, _ = await self.get(rules.REST_INSTRUMENTS_PATH, {}, weight=INSTRUMENTS_WEIGHT)
        return self._checked(parse.parse_instruments, body)

    async def bullet_public(self) -> parse.Bullet:
        body, _ = await self.post(rules.REST_BULLET_PATH, weight=BULLET_WEIGHT)
        return self._checked(parse.parse_bullet, body)
