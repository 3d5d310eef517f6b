"""The shipped symbol table lists the original service's instruments, and the name helpers.

The original table put Binance/Bybit `1000PEPEUSDT` (priced per 1000 PEPE) and OKX/KuCoin
per-PEPE contracts under one name, `PEPEUSDT`: stored prices and sizes 1000x apart under
one symbol. Now the 1000-coin contracts have their own rows (`unit_scale`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptoflow.config import load_settings
from cryptoflow.config_schema import EXCHANGES, SymbolEntry
from cryptoflow.symbols import (
    listed_on,
    normalize_venue_symbol,
    unit_scale,
    venue_map,
    venue_symbol,
)

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "AAVEUSDT",
    "ADAUSDT",
    "ARBUSDT",
    "AVAXUSDT",
    "BCHUSDT",
    "BNBUSDT",
    "BTCUSDT",
    "DOGEUSDT",
    "DOTUSDT",
    "ETHUSDT",
    "HYPEUSDT",
    "INJUSDT",
    "LINKUSDT",
    "LTCUSDT",
    "NEARUSDT",
    "ONDOUSDT",
    "OPUSDT",
    "SOLUSDT",
    "SUIUSDT",
    "TRXUSDT",
    "UNIUSDT",
    "WIFUSDT",
    "XLMUSDT",
    "XRPUSDT",
]
USDC = ["BTCUSDC", "ETHUSDC", "SOLUSDC", "SUIUSDC", "XRPUSDC"]
#: the original table's BONK, PEPE and SHIB rows, split by quote scale
PER_1000 = ["1000BONKUSDT", "1000PEPEUSDT", "1000SHIBUSDT"]
PER_COIN = ["BONKUSDT", "PEPEUSDT", "SHIBUSDT"]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SymbolEntry]:
    env_file = tmp_path_factory.mktemp("env") / ".env"
    env_file.touch()
    settings = load_settings(REPO / "configs" / "config.yml", env={}, env_file=env_file)
    return settings.symbols


def test_table_has_the_original_34_coins(table: dict[str, SymbolEntry]) -> None:
    assert len(COMMON) == 24
    assert set(table) == {*COMMON, *USDC, *PER_1000, *PER_COIN, "FARTCOINUSDT", "FTMUSDT"}
    assert len(table) == 37


def test_no_row_mixes_quote_scales(table: dict[str, SymbolEntry]) -> None:
    for name, entry in table.items():
        for venue_sym in filter(None, entry.venues.values()):
            assert unit_scale(venue_sym) == unit_scale(name), (name, venue_sym)


def test_listing_matrix(table: dict[str, SymbolEntry]) -> None:
    for name in COMMON:
        assert all(venue_symbol(table, ex, name) for ex in EXCHANGES), name
    for name in USDC:
        assert venue_symbol(table, "okx", name) is None
        assert all(venue_symbol(table, ex, name) for ex in ("binance", "bybit", "kucoin"))
    assert venue_symbol(table, "binance", "FARTCOINUSDT") == "FARTCOINUSDT"
    assert venue_symbol(table, "bybit", "FARTCOINUSDT") == "FARTCOINUSDT"
    assert venue_symbol(table, "kucoin", "FARTCOINUSDT") is None
    assert venue_symbol(table, "okx", "FARTCOINUSDT") is None
    per_1000 = {
        name: [ex for ex in EXCHANGES if venue_symbol(table, ex, name)] for name in PER_1000
    }
    assert per_1000 == {
        "1000BONKUSDT": ["binance", "bybit", "kucoin"],
        "1000PEPEUSDT": ["binance", "bybit"],
        "1000SHIBUSDT": ["binance", "bybit"],
    }
    per_coin = {
        name: [ex for ex in EXCHANGES if venue_symbol(table, ex, name)] for name in PER_COIN
    }
    assert per_coin == {
        "BONKUSDT": ["okx"],
        "PEPEUSDT": ["okx", "kucoin"],
        "SHIBUSDT": ["okx", "kucoin"],
    }
    assert not table["FTMUSDT"].enabled
    assert all(venue_symbol(table, ex, "FTMUSDT") is None for ex in EXCHANGES)
    assert all(v is None for v in table["FTMUSDT"].venues.values())
    counts = {ex: len(listed_on(table, ex)) for ex in EXCHANGES}
    assert counts == {"binance": 33, "bybit": 33, "okx": 27, "kucoin": 32}


def test_venue_specific_names(table: dict[str, SymbolEntry]) -> None:
    assert table["1000PEPEUSDT"].venues["binance"] == "1000PEPEUSDT"
    assert table["1000SHIBUSDT"].venues["binance"] == "1000SHIBUSDT"
    assert table["1000BONKUSDT"].venues["binance"] == "1000BONKUSDT"
    assert table["1000PEPEUSDT"].venues["bybit"] == "1000PEPEUSDT"
    assert table["1000BONKUSDT"].venues["bybit"] == "1000BONKUSDT"
    assert table["1000SHIBUSDT"].venues["bybit"] == "SHIB1000USDT"
    assert table["1000BONKUSDT"].venues["kucoin"] == "1000BONKUSDTM"
    assert table["PEPEUSDT"].venues["kucoin"] == "PEPEUSDTM"
    assert table["BTCUSDT"].venues["kucoin"] == "XBTUSDTM"
    assert table["BTCUSDC"].venues["kucoin"] == "XBTUSDCM"
    assert table["ETHUSDC"].venues["kucoin"] == "ETHUSDCM"
    for name in [*COMMON, *PER_COIN]:
        assert table[name].venues["okx"] == f"{name[:-4]}-USDT-SWAP"


def test_reverse_map(table: dict[str, SymbolEntry]) -> None:
    kucoin = venue_map(table, "kucoin")
    assert kucoin["XBTUSDTM"] == "BTCUSDT"
    assert venue_map(table, "binance")["1000PEPEUSDT"] == "1000PEPEUSDT"
    assert len(venue_map(table, "okx")) == 27


@pytest.mark.parametrize(
    ("exchange", "venue", "expected"),
    [
        ("okx", "XMR-USDT-SWAP", "XMRUSDT"),
        ("kucoin", "XBTUSDTM", "BTCUSDT"),
        ("kucoin", "ETHUSDCM", "ETHUSDC"),
        ("kucoin", "SUSHIUSDTM", "SUSHIUSDT"),
        ("binance", "SUSHIUSDT", "SUSHIUSDT"),
        ("bybit", "1000FLOKIUSDT", "1000FLOKIUSDT"),
    ],
)
def test_normalize_by_rule(exchange: str, venue: str, expected: str) -> None:
    assert normalize_venue_symbol(exchange, venue) == expected


def test_normalize_prefers_table(table: dict[str, SymbolEntry]) -> None:
    assert normalize_venue_symbol("bybit", "SHIB1000USDT", table) == "1000SHIBUSDT"
    assert normalize_venue_symbol("kucoin", "PEPEUSDTM", table) == "PEPEUSDT"
    assert normalize_venue_symbol("okx", "SUSHI-USDT-SWAP", table) == "SUSHIUSDT"


@pytest.mark.parametrize(
    ("symbol", "scale"),
    [
        ("1000PEPEUSDT", 1000),
        ("SHIB1000USDT", 1000),
        ("1000BONKUSDTM", 1000),
        ("10000LADYSUSDT", 10000),
        ("1000000MOGUSDT", 1000000),
        ("1INCHUSDT", 1),
        ("BTCUSDT", 1),
        ("BONK-USDT-SWAP", 1),
        ("XBTUSDTM", 1),
        ("BTCPERP", 1),
    ],
)
def test_unit_scale(symbol: str, scale: int) -> None:
    assert unit_scale(symbol) == scale
