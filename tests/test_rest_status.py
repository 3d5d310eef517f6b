"""`net/rest.VenueRest._send`: the status decides before the body is read.

Found by review: an answer whose body cannot be decoded (a wrong `Content-Encoding`)
raised while httpx read it, before the status was looked at, so a 429 or 503 with such
a body was reported as a malformed body (`ok` + `malformed` in the poll counts) and a
429 did not make the budget wait. Only a 2xx body that cannot be decoded is malformed.
"""

from __future__ import annotations

import httpx
import pytest

from cryptoflow.errors import MalformedMessage, RateLimited, ServerError, TransportError
from cryptoflow.exchanges.binance.rest import BinanceRest
from cryptoflow.net.ratelimit import RateBudget

NOT_GZIP = {"Content-Encoding": "gzip"}


def client(status: int, headers: dict[str, str]) -> tuple[BinanceRest, RateBudget]:
    def handler(req: httpx.Request) -> httpx.Response:
        # a stream, as a real transport gives: bytes `content` would be decoded right here
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(b"not gzip"))

    budget = RateBudget(2400)
    http = httpx.AsyncClient(base_url="http://binance.test", transport=httpx.MockTransport(handler))
    return BinanceRest(http, budget), budget


async def test_a_throttle_with_an_undecodable_body_is_a_throttle(autojump_clock):
    rest, budget = client(429, {**NOT_GZIP, "Retry-After": "7"})
    with pytest.raises(RateLimited) as ei:
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")
    assert ei.value.retry_after == 7
    assert budget.stats.throttles == 1 and budget.blocked_for > 6


async def test_a_server_error_with_an_undecodable_body_is_a_server_error(autojump_clock):
    rest, _ = client(503, NOT_GZIP)
    with pytest.raises(ServerError, match="HTTP 503"):
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")


async def test_a_success_with_an_undecodable_body_is_malformed(autojump_clock):
    rest, budget = client(200, NOT_GZIP)
    with pytest.raises(MalformedMessage, match="undecodable response body"):
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")
    assert budget.stats.throttles == 0


class _CutShort(httpx.AsyncByteStream):
    """A body that times out after its first bytes, as a stalled connection does."""

    async def __aiter__(self):
        yield b"{"
        raise httpx.ReadTimeout("timed out reading the body")


def cut_client(status: int, headers: dict[str, str]) -> tuple[BinanceRest, RateBudget]:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, stream=_CutShort())

    budget = RateBudget(2400)
    http = httpx.AsyncClient(base_url="http://binance.test", transport=httpx.MockTransport(handler))
    return BinanceRest(http, budget), budget


async def test_a_throttle_whose_body_times_out_is_a_throttle(autojump_clock):
    """It was a TransportError ("timeout on ..."): the budget was not told to wait."""
    rest, budget = cut_client(429, {"Retry-After": "9"})
    with pytest.raises(RateLimited) as ei:
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")
    assert ei.value.retry_after == 9
    assert budget.stats.throttles == 1 and budget.blocked_for > 8


async def test_a_success_whose_body_times_out_is_a_transport_failure(autojump_clock):
    rest, budget = cut_client(200, {})
    with pytest.raises(TransportError, match="timeout on /fapi/v1/depth"):
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT")
    assert budget.stats.throttles == 0
