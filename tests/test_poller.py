"""Snapshot poller: fixed schedule, failures counted, back-pressure delays (not piles) polls."""

import itertools
import random

import trio

from cryptoflow.errors import MalformedMessage, ServerError
from cryptoflow.pipeline.poller import PollStats, poll_snapshots


async def test_schedule_does_not_drift_and_errors_keep_polling(autojump_clock):
    calls = []

    async def fetch():
        calls.append(trio.current_time())
        n = len(calls)
        await trio.sleep(0.3)  # the request takes time: must not shift the schedule
        if n == 2:
            raise ServerError("HTTP 503", status=503, exchange="binance", symbol="BTCUSDT")
        if n == 3:
            raise MalformedMessage("missing field 'bids'", exchange="binance", symbol="BTCUSDT")
        return n

    send, recv = trio.open_memory_channel(100)
    stats = PollStats()
    with trio.move_on_after(10.5):
        await poll_snapshots(
            fetch, send, exchange="binance", symbol="BTCUSDT", interval=1.0, stats=stats
        )
    start = calls[0]
    assert [round(t - start, 6) for t in calls] == [float(i) for i in range(len(calls))]
    in_flight = 1 if calls[-1] + 0.3 > 10.5 else 0  # cut off by the move_on_after
    # the 503 failed; the malformed body is a response (`ok`) counted `malformed`
    assert stats.failed == 1 and stats.malformed == 1
    assert stats.ok == len(calls) - 1 - in_flight
    received = []
    while True:
        try:
            received.append(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert 2 not in received and 3 not in received


async def test_back_pressure_skips_slots_instead_of_piling_up(autojump_clock):
    calls = []

    async def fetch():
        calls.append(trio.current_time())
        return len(calls)

    send, recv = trio.open_memory_channel(1)
    stats = PollStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: poll_snapshots(
                fetch,
                send,
                exchange="binance",
                symbol="X",
                interval=1.0,
                jitter=0.2,
                rng=random.Random(1),
                stats=stats,
            )
        )
        await trio.sleep(10)  # nobody reads: the 2nd send blocks
        assert len(calls) == 2  # polls wait for room; they do not queue up
        async for _ in recv:  # a slow consumer: one item per 5 s
            await trio.sleep(5)
            if trio.current_time() > 40:
                break
        nursery.cancel_scope.cancel()
    assert stats.skipped_slots > 0
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert all(g >= 0.5 for g in gaps)  # never a burst of catch-up polls


async def test_graceful_stop_finishes_the_poll_in_flight_and_starts_no_other(autojump_clock):
    """A stop while the venue is answering: that snapshot is still handed on (the venue
    sent it), then the poller ends; a stop between polls ends it at once."""
    calls = []
    stopping = trio.Event()

    async def fetch():
        calls.append(trio.current_time())
        if len(calls) == 3:
            stopping.set()  # the stop arrives while this request is in flight
        await trio.sleep(0.4)
        return len(calls)

    send, recv = trio.open_memory_channel(100)
    with trio.fail_after(60):
        await poll_snapshots(
            fetch, send, exchange="binance", symbol="X", interval=1.0, stopping=stopping
        )
    assert len(calls) == 3
    assert [item async for item in recv] == [1, 2, 3]  # the in-flight poll was kept; closed

    idle = trio.Event()
    calls.clear()
    send, recv = trio.open_memory_channel(100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: poll_snapshots(
                fetch, send, exchange="binance", symbol="X", interval=10.0, stopping=idle
            )
        )
        while not calls:  # the first poll comes at the poller's phase (< 10 s)
            await trio.sleep(0.1)
        await trio.sleep(1)  # first poll done, waiting for the next slot
        idle.set()
        stopped_at = trio.current_time()
    assert trio.current_time() - stopped_at < 0.01 and len(calls) == 1


async def test_symbols_started_together_poll_spread_over_the_interval(autojump_clock):
    """Each poller starts at its own phase of the interval: 20 symbols started at once
    must not fire their snapshots in one burst (every 10 s, all together, they held the
    event loop and delta flushes back), and each polls within its first interval."""
    first: dict[str, float] = {}

    def fetcher(sym: str):
        async def fetch():
            first.setdefault(sym, trio.current_time())
            return sym

        return fetch

    send, _recv = trio.open_memory_channel(1000)
    rng = random.Random(7)
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(
                lambda i=i: poll_snapshots(
                    fetcher(f"S{i}"),
                    send.clone(),
                    exchange="binance",
                    symbol=f"S{i}",
                    interval=10.0,
                    jitter=0.5,
                    rng=rng,
                )
            )
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    assert len(first) == 20  # every symbol polled within its first interval
    in_first_second = sum(1 for t in first.values() if t < 1.0)
    assert in_first_second <= 6  # not a burst (they all fired within 0.5 s before)
    assert max(first.values()) - min(first.values()) > 5.0
