"""OKX v5 REST: swap order-book snapshots (`books` <= 400 levels, `books-full` deeper) and
the SWAP instruments list (ctVal = base units per contract).

Throttle signals: HTTP 429 and body code 50011/50061 (limits are per 2 s windows).
"""

from __future__ import annotations

import httpx

from cryptoflow.errors import RateLimited
from cryptoflow.exchanges.base import Instrument
from cryptoflow.exchanges.fields import plain_success
from cryptoflow.exchanges.limits import OKX_BOOKS_FULL_MAX, OKX_BOOKS_MAX, VENUE_LIMITS
from cryptoflow.exchanges.okx import parse, rules
from cryptoflow.models import MARKET_FUTURES, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.rest import VenueRest, retry_after_seconds

DEFAULT_REST_URL = rules.REST_BASE
WEIGHT_LIMIT_PER_MINUTE = VENUE_LIMITS["okx"].limit_per_minute
#: books-full has its own per-IP limit (10 / 2 s), and a shard that asks for more than
#: 400 levels gets a budget of exactly that limit (`limits.snapshot_cost`): one request
#: is one unit of it. (Charging 4, as if it shared `books`' 40 / 2 s, cut OKX polling
#: to a quarter of the allowed rate: 2 requests / 2 s, 27 symbols every ~27 s.)
BOOKS_FULL_WEIGHT = 1
#: how every success body of `books[-full]` starts (`code` first, as a JSON string);
#: `fetch_snapshot_body` keeps only such bodies unparsed
SUCCESS_PREFIX = b'{"code":"0",'


def depth_request(depth_limit: int) -> tuple[str, int, int]:
    """(path, sz, weight) for a snapshot of `depth_limit` levels."""
    if depth_limit > OKX_BOOKS_MAX:
        return rules.REST_BOOKS_FULL_PATH, min(depth_limit, OKX_BOOKS_FULL_MAX), BOOKS_FULL_WEIGHT
    return rules.REST_BOOKS_PATH, max(1, depth_limit), 1


class OkxRest(VenueRest):
    exchange = rules.EXCHANGE

    def interpret(self, resp: httpx.Response, symbol: str) -> None:
        if resp.status_code == 429:
            wait = retry_after_seconds(resp, rules.RATE_LIMIT_RETRY_AFTER_S)
            self.budget.throttle(wait)
            raise RateLimited(
                f"HTTP 429 {resp.text[:120]}",
                retry_after=wait,
                exchange=self.exchange,
                symbol=symbol,
            )
        super().interpret(resp, symbol)

    async def fetch_snapshot(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = OKX_BOOKS_MAX,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot:
        """A parsed snapshot. A RESYNC one (the stream's fallback when no in-stream snapshot
        came) always reads `books` (<= 400 levels, the stream's own depth): that is the
        endpoint OKX documents with the `seqId` the book anchors on, served live, where
        `books-full` is a cache refreshed once a second whose body may carry no `seqId`
        at all; a snapshot that cannot anchor left the book waiting, asking again and
        again (found by an audit with a `seqId`-less deep body)."""
        if source is SnapshotSource.RESYNC:
            depth_limit = OKX_BOOKS_MAX  # the stream's 400 levels, also under shallow polls
        body, receive_ns = await self._get_books(symbol, venue_symbol, depth_limit)
        return self._parse(body, symbol, receive_ns, source)

    async def fetch_snapshot_body(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = OKX_BOOKS_MAX,
        source: SnapshotSource = SnapshotSource.POLL,
    ) -> DepthSnapshot | SnapshotBody:
        """The depth snapshot unparsed, for the poll lane to read later in a batch.

        OKX reports throttles and errors in the body (`code`), and the rate budget must
        throttle now, not at the writer's flush: a body that is not certainly a success
        (`fields.plain_success`) is parsed at once, which raises what its code stands for
        (or returns the snapshot, e.g. for a success body in another layout)."""
        body, receive_ns = await self._get_books(symbol, venue_symbol, depth_limit)
        if not plain_success(body, SUCCESS_PREFIX, b'"code"'):
            return self._parse(body, symbol, receive_ns, source)
        return SnapshotBody(parse.EXCHANGE, MARKET_FUTURES, symbol, bytes(body), receive_ns, source)

    async def _get_books(
        self, symbol: str, venue_symbol: str, depth_limit: int
    ) -> tuple[bytes, int]:
        path, sz, weight = depth_request(depth_limit)
        return await self.get(
            path, {"instId": venue_symbol, "sz": sz}, weight=weight, symbol=symbol
        )

    def _parse(
        self, body: bytes, symbol: str, receive_ns: int, source: SnapshotSource
    ) -> DepthSnapshot:
        try:
            return parse.parse_rest_snapshot(body, symbol, receive_ns, source=source)
        except RateLimited as exc:
            self.budget.throttle(exc.retry_after)
            raise

    async def fetch_instruments(self) -> dict[str, Instrument]:
        body, _ = await self.get(rules.REST_INSTRUMENTS_PATH, {"instType": "SWAP"}, weight=1)
        try:
            return parse.parse_instruments(body)
        except RateLimited as exc:
            self.budget.throttle(exc.retry_after)
            raise
