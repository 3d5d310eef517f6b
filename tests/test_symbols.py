"""The shipped symbol table equals the original service's, and the name helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptoflow.config import load_settings
from cryptoflow.config_schema import EXCHANGES, SymbolEntry
from cryptoflow.symbols import listed_on, normalize_venue_symbol, venue_map, venue_symbol

REPO = Path(__file__).resolve().parents[1]

COMMON = [
    "AAVEUSDT",
    "ADAUSDT",
    "ARBUSDT",
    "AVAXUSDT",
    "BCHUSDT",
    "BNBUSDT",
    "BONKUSDT",
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
    "PEPEUSDT",
    "SHIBUSDT",
    "SOLUSDT",
    "SUIUSDT",
    "TRXUSDT",
    "UNIUSDT",
    "WIFUSDT",
    "XLMUSDT",
    "XRPUSDT",
]
USDC = ["BTCUSDC", "ETHUSDC", "SOLUSDC", "SUIUSDC", "XRPUSDC"]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SymbolEntry]:
    env_file = tmp_path_factory.mktemp("env") / ".env"
    env_file.touch()
    settings = load_settings(REPO / "configs" / "config.yml", env={}, env_file=env_file)
    return settings.symbols


def test_table_has_the_original_34(table: dict[str, SymbolEntry]) -> None:
    assert len(COMMON) == 27
    assert set(table) == {*COMMON, *USDC, "FARTCOINUSDT", "FTMUSDT"}
    assert len(table) == 34


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
    assert not table["FTMUSDT"].enabled
    assert all(venue_symbol(table, ex, "FTMUSDT") is None for ex in EXCHANGES)
    assert all(v is None for v in table["FTMUSDT"].venues.values())
    counts = {ex: len(listed_on(table, ex)) for ex in EXCHANGES}
    assert counts == {"binance": 33, "bybit": 33, "okx": 27, "kucoin": 32}


def test_venue_specific_names(table: dict[str, SymbolEntry]) -> None:
    assert table["PEPEUSDT"].venues["binance"] == "1000PEPEUSDT"
    assert table["SHIBUSDT"].venues["binance"] == "1000SHIBUSDT"
    assert table["BONKUSDT"].venues["binance"] == "1000BONKUSDT"
    assert table["PEPEUSDT"].venues["bybit"] == "1000PEPEUSDT"
    assert table["BONKUSDT"].venues["bybit"] == "1000BONKUSDT"
    assert table["SHIBUSDT"].venues["bybit"] == "SHIB1000USDT"
    assert table["BTCUSDT"].venues["kucoin"] == "XBTUSDTM"
    assert table["BTCUSDC"].venues["kucoin"] == "XBTUSDCM"
    assert table["ETHUSDC"].venues["kucoin"] == "ETHUSDCM"
    for name in COMMON:
        assert table[name].venues["okx"] == f"{name[:-4]}-USDT-SWAP"


def test_reverse_map(table: dict[str, SymbolEntry]) -> None:
    kucoin = venue_map(table, "kucoin")
    assert kucoin["XBTUSDTM"] == "BTCUSDT"
    assert venue_map(table, "binance")["1000PEPEUSDT"] == "PEPEUSDT"
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
    assert normalize_venue_symbol("binance", "1000PEPEUSDT", table) == "PEPEUSDT"
    assert normalize_venue_symbol("bybit", "SHIB1000USDT", table) == "SHIBUSDT"
    assert normalize_venue_symbol("okx", "SUSHI-USDT-SWAP", table) == "SUSHIUSDT"
