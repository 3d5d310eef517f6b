"""The venues the pipeline can run, by name: the only place that lists them.

Adding a venue = a package under `cryptoflow/exchanges/` plus one entry here; the runtime
and tools look venues up here and never branch on the name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import httpx

from cryptoflow.book.sync import SyncRules
from cryptoflow.config_schema import VenueSource
from cryptoflow.errors import UsageError
from cryptoflow.exchanges.base import Instrument, SymbolMap
from cryptoflow.models import DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.bodies import SnapshotCodec
from cryptoflow.pipeline.stream import VenueStream


class VenueRestClient(Protocol):
    async def fetch_snapshot(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = ...,
        source: SnapshotSource = ...,
    ) -> DepthSnapshot: ...

    async def fetch_snapshot_body(
        self,
        symbol: str,
        venue_symbol: str,
        *,
        depth_limit: int = ...,
        source: SnapshotSource = ...,
    ) -> SnapshotBody:
        """The same request, the body left unparsed (used when the venue has a
        `snapshot_codec`: the writer reads poll bodies in batches at its flush)."""
        ...

    async def fetch_instruments(self) -> dict[str, Instrument]: ...


@attrs.frozen
class Venue:
    name: str
    default_rest_url: str
    default_ws_url: str
    weight_limit_per_minute: int
    rules: SyncRules
    make_rest: Callable[[httpx.AsyncClient, RateBudget], VenueRestClient]
    #: (cfg, ws_url, venue symbol -> normalized, the shard's REST client of this venue)
    make_stream: Callable[[VenueSource, str, SymbolMap, VenueRestClient], VenueStream]
    #: poll snapshots read in batches at the writer's flush (`pipeline/bodies.py`); venues
    #: without one parse each body on arrival (`VenueRestClient.fetch_snapshot_body` unused).
    snapshot_codec: SnapshotCodec | None = None
    #: sizes on the wire are contracts (lots): a row's base-asset quantity needs the
    #: instruments list's multiplier, so a shard collects nothing until it has read it
    sizes_in_contracts: bool = False


def _binance() -> Venue:
    from cryptoflow.exchanges.binance import parse, rest, rules, ws
    from cryptoflow.pipeline import batch

    return Venue(
        name="binance",
        default_rest_url=rest.DEFAULT_REST_URL,
        default_ws_url=ws.DEFAULT_WS_URL,
        weight_limit_per_minute=rest.WEIGHT_LIMIT_PER_MINUTE,
        rules=rules.RULES,
        make_rest=rest.BinanceRest,
        make_stream=lambda cfg, url, symbols, _rest: ws.BinanceStream(
            url, cfg.stream_speed, symbols
        ),
        snapshot_codec=SnapshotCodec(
            parse=parse.parse_rest_snapshot,
            read=batch.read_snapshot_bodies,
            count_levels=parse.count_snapshot_levels,
        ),
    )


def _bybit() -> Venue:
    from cryptoflow.exchanges.bybit import batch, parse, rest, rules, ws

    return Venue(
        name="bybit",
        default_rest_url=rest.DEFAULT_REST_URL,
        default_ws_url=ws.DEFAULT_WS_URL,
        weight_limit_per_minute=rest.WEIGHT_LIMIT_PER_MINUTE,
        rules=rules.RULES,
        make_rest=rest.BybitRest,
        make_stream=lambda cfg, url, symbols, _rest: ws.BybitStream(url, cfg.stream_depth, symbols),
        snapshot_codec=SnapshotCodec(
            parse=parse.parse_rest_snapshot,
            read=batch.read_snapshot_bodies,
            count_levels=parse.count_snapshot_levels,
        ),
    )


def _okx() -> Venue:
    from cryptoflow.exchanges.okx import batch, parse, rest, rules, ws

    return Venue(
        name="okx",
        sizes_in_contracts=True,
        default_rest_url=rest.DEFAULT_REST_URL,
        default_ws_url=ws.DEFAULT_WS_URL,
        weight_limit_per_minute=rest.WEIGHT_LIMIT_PER_MINUTE,
        rules=rules.RULES,
        make_rest=rest.OkxRest,
        make_stream=lambda cfg, url, symbols, _rest: ws.OkxStream(url, symbols),
        snapshot_codec=SnapshotCodec(
            parse=parse.parse_snapshot_body,
            read=batch.read_snapshot_bodies,
            count_levels=parse.count_snapshot_levels,
        ),
    )


def _kucoin() -> Venue:
    from cryptoflow.exchanges.kucoin import batch, parse, rest, rules, ws

    return Venue(
        name="kucoin",
        sizes_in_contracts=True,
        default_rest_url=rest.DEFAULT_REST_URL,
        default_ws_url=ws.DEFAULT_WS_URL,
        weight_limit_per_minute=rest.WEIGHT_LIMIT_PER_MINUTE,
        rules=rules.RULES,
        make_rest=rest.KucoinRest,
        # the WS endpoint comes from bullet-public on the venue's REST host
        make_stream=lambda cfg, url, symbols, rest_client: ws.KucoinStream(rest_client, symbols),
        snapshot_codec=SnapshotCodec(
            parse=parse.parse_rest_snapshot,
            read=batch.read_snapshot_bodies,
            count_levels=parse.count_snapshot_levels,
        ),
    )


_FACTORIES: dict[str, Callable[[], Venue]] = {
    "binance": _binance,
    "bybit": _bybit,
    "okx": _okx,
    "kucoin": _kucoin,
}


def available() -> list[str]:
    return list(_FACTORIES)


def get_venue(name: str) -> Venue:
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise UsageError(
            f"exchange {name!r} is not supported yet; available: {', '.join(available())}"
        ) from None


def check_exchange(name: str | None, option: str = "--exchange") -> None:
    """A usage error (exit 2) for a venue name the project does not know (None: no filter)."""
    if name is not None and name not in _FACTORIES:
        raise UsageError(
            f"{option} {name!r}: unknown exchange; expected one of {', '.join(available())}"
        )
