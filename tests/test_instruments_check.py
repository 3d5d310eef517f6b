"""The instruments check at a shard's start (`runtime._check_instruments`).

Where sizes are contracts (OKX, KuCoin) a row's base-asset quantity needs the contract
multiplier: without the instruments list the shard must wait and retry, never collect
with multiplier 1. Inverse contracts (sizes in USD) are skipped with an error.
"""

from __future__ import annotations

import logging
import types

import httpx
import trio

from cryptoflow import runtime
from cryptoflow.errors import ServerError
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.base import Instrument
from cryptoflow.exchanges.kucoin.rest import KucoinRest
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.normalize import Normalizer

PLAN = types.SimpleNamespace(
    exchange="okx",
    label="okx/main",
    symbols=(("BTCUSDT", "BTC-USDT-SWAP"), ("UNIUSD", "UNI-USD-SWAP")),
)
INSTRUMENTS = {
    "BTC-USDT-SWAP": Instrument("BTC-USDT-SWAP", True, 0.01, "0.01"),
    "UNI-USD-SWAP": Instrument(
        "UNI-USD-SWAP", True, 10.0, "10", unsupported="an inverse swap (test)"
    ),
}


class FlakyRest:
    """Fails `failures` times with HTTP 503, then answers; records when it was asked."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def fetch_instruments(self) -> dict[str, Instrument]:
        self.calls.append(trio.current_time())
        if len(self.calls) <= self.failures:
            raise ServerError("HTTP 503 from /api/v5/public/instruments", status=503)
        return INSTRUMENTS


def _normalizer() -> Normalizer:
    return Normalizer({"okx": registry.get_venue("okx").rules})


async def _check(rest: FlakyRest, normalizer: Normalizer, *, required: bool, stopping=None):
    return await runtime._check_instruments(
        rest,  # type: ignore[arg-type]
        PLAN,  # type: ignore[arg-type]
        normalizer,
        required=required,
        retry=lambda failures: 2.0**failures,
        stopping=trio.Event() if stopping is None else stopping,
    )


def test_only_contract_sized_venues_require_the_instruments_list() -> None:
    required = {name: registry.get_venue(name).sizes_in_contracts for name in registry.available()}
    assert required == {"binance": False, "bybit": False, "okx": True, "kucoin": True}


async def test_contract_sizes_wait_for_the_instruments_list(clock, caplog) -> None:
    rest, norm = FlakyRest(failures=3), _normalizer()
    start = trio.current_time()
    kept = await _check(rest, norm, required=True)
    assert kept == (("BTCUSDT", "BTC-USDT-SWAP"),)
    # retried after 2, 4 and 8 s (the back-off given), then read
    assert [round(t - start) for t in rest.calls] == [0, 2, 6, 14]
    assert norm.multiplier("okx", "BTCUSDT") == "0.01"
    retries = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert len(retries) == 3
    assert "okx/main: cannot read the instruments list (HTTP 503" in retries[0]
    assert "sizes are in contracts, so nothing is collected until it is read" in retries[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["okx/main: UNIUSD (UNI-USD-SWAP) not collected: an inverse swap (test)"]


async def test_the_stop_ends_the_wait_with_no_symbols(clock) -> None:
    rest, norm = FlakyRest(failures=10**6), _normalizer()
    stopping = trio.Event()
    result: list[tuple] = []

    async def check() -> None:
        result.append(await _check(rest, norm, required=True, stopping=stopping))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await trio.sleep(5.0)
        stopping.set()
        start = trio.current_time()
    assert result == [()] and trio.current_time() - start < 0.1  # at once, not after back-off
    assert norm.multiplier("okx", "BTCUSDT") == "1"  # never set


async def test_base_unit_sizes_go_on_without_the_instruments_list(clock, caplog) -> None:
    rest, norm = FlakyRest(failures=1), _normalizer()
    kept = await _check(rest, norm, required=False)
    assert kept == PLAN.symbols and len(rest.calls) == 1  # as configured, no retry
    assert "okx/main: instruments check skipped: HTTP 503" in caplog.text


async def test_a_throttled_list_is_asked_again_at_the_venue_reset_and_says_so(
    clock, caplog
) -> None:
    """KuCoin answers 429 with `gw-ratelimit-reset` (22 s): the budget holds the next
    request that long, and the retry line said the back-off (`retry in 2s`) instead."""
    calls: list[float] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(trio.current_time())
        if len(calls) == 1:
            return httpx.Response(
                429,
                json={"code": "429000", "msg": "Too Many Requests"},
                headers={"gw-ratelimit-reset": "22000"},
            )
        body = {
            "code": "200000",
            "data": [{"symbol": "XBTUSDTM", "multiplier": 0.001, "status": "Open"}],
        }
        return httpx.Response(200, json=body)

    http = httpx.AsyncClient(base_url="http://kc.test", transport=httpx.MockTransport(handler))
    plan = types.SimpleNamespace(
        exchange="kucoin", label="kucoin/main", symbols=(("BTCUSDT", "XBTUSDTM"),)
    )
    norm = Normalizer({"kucoin": registry.get_venue("kucoin").rules})
    kept = await runtime._check_instruments(
        KucoinRest(http, RateBudget(4000)),
        plan,  # type: ignore[arg-type]
        norm,
        required=True,
        retry=lambda failures: 2.0**failures,
        stopping=trio.Event(),
    )
    assert kept == (("BTCUSDT", "XBTUSDTM"),) and norm.multiplier("kucoin", "BTCUSDT") == "0.001"
    assert len(calls) == 2 and 22.0 <= calls[1] - calls[0] < 22.1
    (line,) = [r.getMessage() for r in caplog.records if "retry in" in r.getMessage()]
    assert line.startswith("kucoin/main: cannot read the instruments list (kucoin: HTTP 429, ")
    assert "retry after 22s" in line and line.endswith(": retry in 22s"), line


class BannedRest:
    """The instruments request waits on a banned budget (minutes)."""

    async def fetch_instruments(self) -> dict[str, Instrument]:
        await trio.sleep(600)
        raise AssertionError("unreachable")


async def test_the_stop_ends_a_fetch_held_by_a_ban(clock) -> None:
    stopping = trio.Event()
    result: list[tuple] = []

    async def check() -> None:
        result.append(
            await runtime._check_instruments(
                BannedRest(),  # type: ignore[arg-type]
                PLAN,  # type: ignore[arg-type]
                _normalizer(),
                required=True,
                retry=lambda failures: 1.0,
                stopping=stopping,
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await trio.sleep(3.0)
        stopping.set()
        start = trio.current_time()
    assert result == [()] and trio.current_time() - start < 0.1  # not after the ban
