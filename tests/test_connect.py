"""Connect failures name their cause and the shard's source IP (`net/connect.py`), for the
REST client and the WebSocket client alike, on real sockets. 192.0.2.1 (TEST-NET-1,
RFC 5737) is never an address of the test host, so binding it fails with EADDRNOTAVAIL."""

from __future__ import annotations

import pytest
import trio

from cryptoflow.errors import TransportError
from cryptoflow.exchanges.binance.rest import BinanceRest
from cryptoflow.net.http import make_http_client
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.net.ws import open_ws
from cryptoflow.pipeline.stream import StreamStats, run_stream

NOT_HERE = "192.0.2.1"


async def closed_port() -> int:
    with trio.socket.socket() as probe:
        await probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_rest_from_a_source_ip_not_on_this_host_names_it_and_the_cause():
    port = await closed_port()
    async with make_http_client(f"http://127.0.0.1:{port}", source_ip=NOT_HERE, timeout=5) as http:
        rest = BinanceRest(http, RateBudget(2400))
        with pytest.raises(TransportError) as ei:
            await rest.fetch_snapshot("BTCUSDT", "BTCUSDT", depth_limit=1000)
    text = str(ei.value)
    assert text.startswith("binance/BTCUSDT: ConnectError on /fapi/v1/depth")
    assert f"source IP {NOT_HERE} is not an address of this host" in text
    assert "EADDRNOTAVAIL" in text


async def test_websocket_from_a_source_ip_not_on_this_host_names_it_and_the_cause():
    port = await closed_port()
    with pytest.raises(OSError) as ei:
        async with open_ws(f"ws://127.0.0.1:{port}/", source_ip=NOT_HERE):
            pass
    assert f"source IP {NOT_HERE} is not an address of this host" in str(ei.value)
    assert "EADDRNOTAVAIL" in str(ei.value)


async def test_the_stream_runner_reports_the_cause(autojump_clock):
    class Venue:
        exchange = "binance"
        keepalive_interval = None
        streams_per_connection = 1

        async def url(self, venue_symbols):
            return f"ws://127.0.0.1:{port}/"

        async def on_open(self, ws, venue_symbols):  # pragma: no cover - never connects
            pass

    port = await closed_port()
    stats = StreamStats()
    send, _recv = trio.open_memory_channel(10)
    with trio.move_on_after(0.5):
        await run_stream(Venue(), ["BTCUSDT"], {}, send, source_ip=NOT_HERE, stats=stats)
    assert stats.disconnects >= 1
    assert NOT_HERE in stats.last_error and "EADDRNOTAVAIL" in stats.last_error


async def test_a_refused_connect_names_the_errno_without_a_source_ip():
    port = await closed_port()
    async with make_http_client(f"http://127.0.0.1:{port}", source_ip=None, timeout=5) as http:
        with pytest.raises(TransportError) as ei:
            await BinanceRest(http, RateBudget(2400)).fetch_snapshot(
                "BTCUSDT", "BTCUSDT", depth_limit=1000
            )
    assert "ECONNREFUSED" in str(ei.value) and "source IP" not in str(ei.value)
