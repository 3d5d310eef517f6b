"""RateBudget under a MockClock: throttles, bans, usage header and own pacing; RequestCap's
sliding hour (OKX subscribe requests per connection); ConnectPacer (OKX new connections
per second per IP)."""

import trio
import trio.testing

from cryptoflow.net.ratelimit import ConnectPacer, RateBudget, RequestCap


async def test_paces_own_window_before_the_limit(autojump_clock):
    budget = RateBudget(100, safety=0.8)
    sent_at = []
    for _ in range(6):  # 6 x 20 = 120 > 80 allowed per 60 s
        await budget.acquire(20)
        sent_at.append(trio.current_time())
    assert sent_at[:4] == [sent_at[0]] * 4  # 80 weight goes at once
    assert sent_at[4] >= sent_at[0] + 60  # the 5th waits for the window to roll
    assert budget.stats.paced_waits >= 1


async def test_never_sends_while_throttled_or_banned(autojump_clock):
    budget = RateBudget(2400)
    t0 = trio.current_time()
    budget.throttle(5)
    await budget.acquire(1)
    assert trio.current_time() >= t0 + 5
    t1 = trio.current_time()
    budget.ban(120)
    await budget.acquire(1)
    assert trio.current_time() >= t1 + 120
    assert budget.stats.throttles == 1 and budget.stats.bans == 1


async def test_usage_header_near_limit_waits_for_minute_rollover(autojump_clock):
    wall = [1_000_000 * 60 + 42.0]  # 42 s into a wall-clock minute
    budget = RateBudget(2400, safety=0.8, wall_clock=lambda: wall[0])
    budget.observe_used(1000)  # below 80 %: no pause
    t0 = trio.current_time()
    await budget.acquire(20)
    assert trio.current_time() == t0
    budget.observe_used(2000)  # above 80 % of 2400
    await budget.acquire(20)
    waited = trio.current_time() - t0
    assert 18 <= waited <= 19  # until the venue's minute rolls over


async def test_concurrent_waiters_are_serialized(autojump_clock):
    budget = RateBudget(10, safety=1.0)
    times = []

    async def one():
        await budget.acquire(10)
        times.append(trio.current_time())

    async with trio.open_nursery() as n:
        for _ in range(3):
            n.start_soon(one)
    times.sort()
    assert times[1] - times[0] >= 60 and times[2] - times[1] >= 60


async def test_paces_within_the_venues_short_window(autojump_clock):
    # OKX books-full: 10 requests per 2 s = 300/min; a start-up burst of 27 symbols must be
    # spread over 2 s windows, not sent at once because the minute still has room
    budget = RateBudget(300, safety=0.8, window=2.0)
    sent = []
    for _ in range(27):
        await budget.acquire(1)
        sent.append(trio.current_time())
    t0 = sent[0]
    for start in range(27):
        in_window = [t for t in sent[start:] if t < sent[start] + 2.0]
        assert len(in_window) <= 8  # 80 % of 10 per 2 s
    assert sent[-1] - t0 >= 6.0


async def test_request_cap_counts_a_sliding_hour(autojump_clock):
    cap = RequestCap(480, 3600.0)
    assert cap.usable == 432 and cap.room() == 432  # 90 % of OKX's 480 per hour
    cap.note(400)
    await trio.sleep(1800)
    cap.note(30)
    assert cap.room() == 2
    await trio.sleep(1800)  # the first 400 are an hour old
    assert cap.used() == 30 and cap.room() == 402
    await trio.sleep(1800)
    assert cap.used() == 0


async def test_hold_blocks_without_counting_a_throttle(autojump_clock):
    budget = RateBudget(2400)
    t0 = trio.current_time()
    budget.hold(8)
    await budget.acquire(1)
    assert trio.current_time() >= t0 + 8 and budget.stats.throttles == 0


async def test_windows_stay_bounded_without_a_metrics_scrape(autojump_clock):
    """Was (review of 6212b54): the 60 s sum behind the weight metric was trimmed only
    when /metrics read it, so with metrics off every request stayed in memory."""
    b = RateBudget(2400, window=60.0)
    for _ in range(2000):  # a 1000-level Binance poll every 0.76 s: ~25 min
        await b.acquire(20)
        await trio.sleep(0.76)
    assert len(b._minute.sent) <= 80 and len(b._sent.sent) <= 80
    assert b.used_last_minute() == 20 * len(b._minute.sent)


async def test_connect_pacer_spaces_openings_past_the_cap(autojump_clock):
    """OKX takes 3 new connections per second per IP: a shard opening 7 at its start
    opens 3, then 3 more a window (1 s + 0.1 s slack) later, then the last."""
    pacer = ConnectPacer(3)
    t0 = trio.current_time()
    opened: list[float] = []

    async def connect() -> None:
        await pacer.wait()
        opened.append(round(trio.current_time() - t0, 3))

    async with trio.open_nursery() as nursery:
        for _ in range(7):
            nursery.start_soon(connect)
    assert sorted(opened) == [0, 0, 0, 1.1, 1.1, 1.1, 2.2]
    for i in range(len(opened) - 3):  # never more than 3 in any 1.1 s
        assert sorted(opened)[i + 3] - sorted(opened)[i] >= 1.1
    await trio.sleep(5)
    before = trio.current_time()
    await pacer.wait()  # the window has passed: no wait
    assert trio.current_time() == before
