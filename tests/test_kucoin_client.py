"""KuCoin REST client (429/429000 + gw-ratelimit headers, bullet-public) and WS stream
(new token per connect, welcome before subscribe, ping every pingInterval)."""

from __future__ import annotations

import json

import httpx
import orjson
import pytest
import trio
from wsfake import start_fake, wait_for

from cryptoflow.errors import RateLimited
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.kucoin.parse import parse_bullet
from cryptoflow.exchanges.kucoin.rest import KucoinRest
from cryptoflow.exchanges.kucoin.ws import KucoinStream
from cryptoflow.models import DepthDiff
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.resync import ResyncQueue, run_resync_fetcher
from cryptoflow.pipeline.stream import StreamStats, run_stream

SNAP = (
    b'{"code": "200000", "data": {"symbol": "XBTUSDTM", "sequence": 100,'
    b' "asks": [[5000.0, 1000], [6000.0, 1983]], "bids": [[3200.0, 800]],'
    b' "ts": 1604643655040584408}}'
)


def bullet(endpoint: str, ping_ms: int = 18000) -> dict:
    return {
        "code": "200000",
        "data": {
            "token": "tok",
            "instanceServers": [
                {
                    "endpoint": endpoint,
                    "protocol": "websocket",
                    "encrypt": False,
                    "pingInterval": ping_ms,
                    "pingTimeout": 10000,
                }
            ],
        },
    }


def client(handler) -> tuple[KucoinRest, RateBudget]:
    budget = RateBudget(4000)
    http = httpx.AsyncClient(base_url="http://kc.test", transport=httpx.MockTransport(handler))
    return KucoinRest(http, budget), budget


async def test_snapshot_full_book_numbers_exact():
    def handler(req):
        assert req.url.path == "/api/v1/level2/snapshot"
        assert req.url.params["symbol"] == "XBTUSDTM"
        return httpx.Response(
            200,
            content=SNAP,
            headers={"gw-ratelimit-remaining": "1990", "gw-ratelimit-limit": "2000"},
        )

    rest, budget = client(handler)
    snap = await rest.fetch_snapshot("BTCUSDT", "XBTUSDTM", depth_limit=1000)
    assert snap.last_update_id == 100 and snap.asks[0] == ("5000", "1000")
    assert snap.event_time == 1604643655040
    assert budget.blocked_for == 0


async def test_429_waits_for_gw_ratelimit_reset():
    rest, budget = client(
        lambda req: httpx.Response(
            429, json={"code": "429000", "msg": "too many"}, headers={"gw-ratelimit-reset": "3500"}
        )
    )
    with pytest.raises(RateLimited) as ei:
        await rest.fetch_snapshot("BTCUSDT", "XBTUSDTM")
    assert ei.value.retry_after == pytest.approx(3.5)
    assert 3.0 < budget.blocked_for <= 3.5


#: a 429 as the venue sends it: the pool refills in 22 s (`gw-ratelimit-reset`, ms)
THROTTLED = {
    "http 429": (
        429,
        'HTTP 429, retry after 22s: {"code":"429000","msg":"Too Many Requests"}',
    ),
    "code 429000": (200, "code 429000: Too Many Requests, retry after 22s"),
}


@pytest.mark.parametrize("how", list(THROTTLED))
async def test_a_throttled_resync_retries_at_the_venue_reset_and_says_so(
    autojump_clock, caplog, how
):
    """After a 429 the budget sends nothing for `gw-ratelimit-reset` (22 s here): the
    retry waited that long in it, while its log line said `retry in 0.8s` (the back-off).
    The retry is now scheduled at the venue's wait and the line names it."""
    status, said = THROTTLED[how]
    body = {"code": "429000", "msg": "Too Many Requests"}
    calls: list[float] = []

    def handler(req):
        calls.append(trio.current_time())
        if len(calls) == 1:
            return httpx.Response(status, json=body, headers={"gw-ratelimit-reset": "22000"})
        return httpx.Response(200, content=SNAP)

    rest, budget = client(handler)
    queue = ResyncQueue()
    send, recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_resync_fetcher(
                queue,
                lambda sym: rest.fetch_snapshot(sym, "XBTUSDTM"),
                send,
                exchange="kucoin",
                backoff_initial=1.0,
                backoff_max=60.0,
            )
        )
        queue.request("BTCUSDT")
        with trio.fail_after(120):
            snap = await recv.receive()
        nursery.cancel_scope.cancel()
    assert snap.last_update_id == 100 and budget.stats.throttles == 1
    assert len(calls) == 2 and 22.0 <= calls[1] - calls[0] < 22.1  # the venue's wait, no more
    (line,) = [r.getMessage() for r in caplog.records if "resync snapshot failed" in r.getMessage()]
    assert line == f"resync snapshot failed (1 in a row): kucoin/BTCUSDT: {said}; retry in 22.0s"


async def test_a_throttled_token_request_reconnects_at_the_venue_reset_and_says_so(
    autojump_clock, caplog
):
    """A connect needs a bullet token, a REST call: refused with a 429, the next one
    waited `gw-ratelimit-reset` in the budget while the line said `reconnecting in 0.0s`."""
    calls: list[float] = []

    def handler(req):
        calls.append(trio.current_time())
        return httpx.Response(
            429,
            json={"code": "429000", "msg": "Too Many Requests"},
            headers={"gw-ratelimit-reset": "22000"},
        )

    rest, _ = client(handler)
    stream = KucoinStream(rest, {"XBTUSDTM": "BTCUSDT"})
    send, _recv = trio.open_memory_channel(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: run_stream(
                stream, ["XBTUSDTM"], {}, send, backoff_initial=0.01, backoff_max=60.0
            )
        )
        with trio.fail_after(120):
            while len(calls) < 2:
                await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert 22.0 <= calls[1] - calls[0] < 22.1
    lines = [r.getMessage() for r in caplog.records if "stream lost" in r.getMessage()]
    said = "kucoin: stream lost (RateLimited: kucoin: HTTP 429, retry after 22s: "
    assert lines[0].startswith(said)
    assert lines[0].endswith("; reconnecting in 22.0s"), lines[0]


async def test_low_remaining_slows_down_before_a_429():
    rest, budget = client(
        lambda req: httpx.Response(
            200,
            content=SNAP,
            headers={
                "gw-ratelimit-limit": "2000",
                "gw-ratelimit-remaining": "100",
                "gw-ratelimit-reset": "8000",
            },
        )
    )
    await rest.fetch_snapshot("BTCUSDT", "XBTUSDTM")
    assert 7.0 < budget.blocked_for <= 8.0
    # our own early slow-down: not a 429 (cryptoflow_rest_throttles_total counts those)
    assert budget.stats.throttles == 0


async def test_instruments_multiplier_text():
    body = (
        b'{"code": "200000", "data": [{"symbol": "XBTUSDTM", "multiplier": 0.001,'
        b' "status": "Open", "tickSize": 0.1, "lotSize": 1}]}'
    )
    rest, _ = client(lambda req: httpx.Response(200, content=body))
    inst = await rest.fetch_instruments()
    assert inst["XBTUSDTM"].multiplier_text == "0.001" and inst["XBTUSDTM"].status_ok


def test_parse_bullet():
    b = parse_bullet(orjson.dumps(bullet("wss://ws-api-futures.kucoin.com/")))
    assert b.ping_interval_s == 18.0 and b.ping_timeout_s == 10.0
    assert b.url("c1") == "wss://ws-api-futures.kucoin.com/?token=tok&connectId=c1"


async def test_stream_token_per_connect_welcome_subscribe_ping():
    symbols = [f"S{i}USDTM" for i in range(150)]

    async def script(ws, conn, fake):
        await ws.send_message(json.dumps({"id": "x", "type": "welcome"}))
        while len([t for t in fake.texts(conn) if "subscribe" in t]) < 2:
            await fake.recv(ws, conn)
        msg = {
            "type": "message",
            "topic": "/contractMarket/level2:S1USDTM",
            "subject": "level2",
            "data": {"sequence": 18, "change": "5000.0,sell,83", "timestamp": 1551770400000},
        }
        await ws.send_message(json.dumps(msg))
        while not any('"ping"' in t for t in fake.texts(conn)):
            await fake.recv(ws, conn)
        if conn == 1:
            await ws.aclose()  # drop: the client must fetch a new token
            return
        await fake.drain(ws, conn)

    bullets = []
    async with trio.open_nursery() as nursery:
        fake = await start_fake(nursery, script)

        def handler(req):
            assert req.method == "POST" and req.url.path == "/api/v1/bullet-public"
            bullets.append(1)
            return httpx.Response(200, json=bullet(fake.url + "/endpoint", ping_ms=50))

        rest, _ = client(handler)
        stream = KucoinStream(rest, {s: s for s in symbols})
        send, recv = trio.open_memory_channel(100)
        stats = StreamStats()
        nursery.start_soon(
            lambda: run_stream(
                stream, symbols, {}, send, stats=stats, backoff_initial=0.01, backoff_max=0.02
            )
        )
        await wait_for(lambda: stats.connects == 2)
        await wait_for(lambda: any('"ping"' in t for t in fake.texts(2)))
        nursery.cancel_scope.cancel()
    assert len(bullets) == 2 and stream.keepalive_interval == 0.05
    assert all(p.startswith("/endpoint?token=tok&connectId=") for p in fake.paths)
    subs = [orjson.loads(t) for t in fake.texts(1) if "subscribe" in t]
    assert [len(s["topic"].split(":", 1)[1].split(",")) for s in subs] == [100, 50]
    assert subs[0]["privateChannel"] is False and subs[0]["response"] is True
    first = recv.receive_nowait()
    assert isinstance(first, DepthDiff) and first.last_update_id == 18


def test_registry_entry():
    v = registry.get_venue("kucoin")
    assert v.rules.resync_by == "rest" and v.weight_limit_per_minute == 4000
