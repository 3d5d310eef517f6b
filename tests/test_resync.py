"""The REST resync fetcher (`pipeline/resync.py`) under a MockClock: per-symbol capped
back-off on failures, reset by a success; no error of a fetch ends it or loses a symbol."""

from __future__ import annotations

import itertools
import logging
import random

import httpx
import pytest
import trio

from cryptoflow.errors import MalformedMessage, ServerError
from cryptoflow.exchanges.binance.rest import BinanceRest
from cryptoflow.models import DepthSnapshot
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.resync import ResyncQueue, run_resync_fetcher


def snapshot(symbol: str, last: int = 1) -> DepthSnapshot:
    return DepthSnapshot(
        "binance", "futures", symbol, last, None, last, [["1", "1"]], [["2", "1"]], last
    )


class Venue:
    """A fetch that fails `failures[symbol]` times (with `error()`), then answers."""

    def __init__(self, failures: dict[str, int], error=lambda s: ServerError("503", status=503)):
        self.failures = dict(failures)
        self.error = error
        self.calls: list[tuple[str, float]] = []

    async def fetch(self, symbol: str) -> DepthSnapshot:
        self.calls.append((symbol, trio.current_time()))
        if self.failures.get(symbol, 0) > 0:
            self.failures[symbol] -= 1
            raise self.error(symbol)
        return snapshot(symbol)

    def times(self, symbol: str) -> list[float]:
        return [t for s, t in self.calls if s == symbol]


async def run_fetcher(nursery, venue: Venue, queue: ResyncQueue, **kw):
    send, recv = trio.open_memory_channel(100)
    nursery.start_soon(
        lambda: run_resync_fetcher(
            queue,
            venue.fetch,
            send,
            exchange="binance",
            backoff_initial=1.0,
            backoff_max=16.0,
            rng=random.Random(7),
            **kw,
        )
    )
    return recv


async def test_failures_back_off_exponentially_capped_and_a_success_resets(autojump_clock):
    venue = Venue({"BTCUSDT": 8})
    queue = ResyncQueue()
    async with trio.open_nursery() as nursery:
        recv = await run_fetcher(nursery, venue, queue)
        queue.request("BTCUSDT")
        got = await recv.receive()
        assert got.symbol == "BTCUSDT"
        times = venue.times("BTCUSDT")
        assert len(times) == 9  # 8 failures, then the answer
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for attempt, gap in enumerate(gaps, start=1):  # jittered to 50-100 % of the cap
            ceiling = min(16.0, 2.0 ** (attempt - 1))
            assert ceiling / 2 <= gap <= ceiling, (attempt, gaps)
        assert gaps[-1] >= 8.0  # grows to the cap instead of a fixed 2 s
        # reset by the success: the next failure waits about backoff_initial again
        venue.failures["BTCUSDT"] = 1
        queue.request("BTCUSDT")
        await recv.receive()
        again = venue.times("BTCUSDT")[-2:]
        assert 0.5 <= again[1] - again[0] <= 1.0
        nursery.cancel_scope.cancel()


async def test_one_symbols_back_off_does_not_hold_the_others(autojump_clock):
    venue = Venue({"BTCUSDT": 5})
    queue = ResyncQueue()
    async with trio.open_nursery() as nursery:
        recv = await run_fetcher(nursery, venue, queue)
        queue.request("BTCUSDT")
        await trio.sleep(3.5)  # BTCUSDT has failed and waits for its retry
        t0 = trio.current_time()
        queue.request("ETHUSDT")
        assert (await recv.receive()).symbol == "ETHUSDT"
        assert venue.times("ETHUSDT") == [t0]  # fetched at once
        queue.request("BTCUSDT")  # asked again while its retry is pending: no extra fetch
        assert (await recv.receive()).symbol == "BTCUSDT"
        assert len(venue.times("BTCUSDT")) == 6
        nursery.cancel_scope.cancel()


async def test_an_error_outside_our_tree_neither_ends_the_fetcher_nor_loses_the_symbol(
    autojump_clock, caplog
):
    def decoding_error(symbol: str) -> Exception:
        return httpx.DecodingError("Error -3 while decompressing data: incorrect header check")

    venue = Venue({"BTCUSDT": 2}, error=decoding_error)
    queue = ResyncQueue()
    with caplog.at_level(logging.WARNING, logger="cryptoflow.resync"):
        async with trio.open_nursery() as nursery:
            recv = await run_fetcher(nursery, venue, queue)
            queue.request("BTCUSDT")
            with trio.fail_after(60):
                assert (await recv.receive()).symbol == "BTCUSDT"
            nursery.cancel_scope.cancel()
    assert len(venue.times("BTCUSDT")) == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "binance/BTCUSDT: DecodingError" in errors[0].getMessage()


async def test_an_undecodable_body_is_a_malformed_answer_not_a_library_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"not gzip", headers={"Content-Encoding": "gzip"})

    http = httpx.AsyncClient(base_url="http://binance.test", transport=httpx.MockTransport(handler))
    rest = BinanceRest(http, RateBudget(2400))
    with pytest.raises(MalformedMessage) as ei:
        await rest.fetch_snapshot("BTCUSDT", "BTCUSDT", depth_limit=1000)
    assert "binance/BTCUSDT" in str(ei.value) and "/fapi/v1/depth" in str(ei.value)
