"""Symbol table helpers: normalized names <-> each venue's instrument ids.

The table (`configs/symbols.yml`, loaded by `cryptoflow.config`) is the only place venue
names are decided; adapters look names up here instead of guessing. The fallback
`normalize_venue_symbol` exists for replaying recordings of instruments outside the table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cryptoflow.config_schema import SymbolEntry

SymbolTable = Mapping[str, SymbolEntry]

#: a contract quoted per 10**k coins: a `1000` prefix (Binance/Bybit `1000PEPEUSDT`,
#: KuCoin `1000BONKUSDTM`) or a suffix before the quote (Bybit `SHIB1000USDT`); a token
#: named with a lone 1 (`1INCHUSDT`) is no scale
_SCALE = re.compile(r"^(10{3,})(?=[A-Z])|^[A-Z]+?(10{3,})(?=USDT|USDC|USD|PERP)")


def unit_scale(symbol: str) -> int:
    """How many coins one quoted unit is (price per that many, sizes in them): 1000 for
    `1000PEPEUSDT` and `SHIB1000USDT`, 1 otherwise. Rows of one normalized name must
    share it: stored prices and sizes carry no unit of their own."""
    m = _SCALE.match(symbol)
    return int(m.group(1) or m.group(2)) if m else 1


def listed_on(table: SymbolTable, exchange: str) -> list[str]:
    """Normalized names enabled and listed on `exchange`, in table order."""
    return [name for name, entry in table.items() if entry.venue_symbol(exchange) is not None]


def venue_symbol(table: SymbolTable, exchange: str, name: str) -> str | None:
    """The venue's id for a normalized name; None if unknown, disabled or not listed."""
    entry = table.get(name)
    return entry.venue_symbol(exchange) if entry is not None else None


def venue_map(table: SymbolTable, exchange: str) -> dict[str, str]:
    """Venue id -> normalized name for one exchange (the adapters' `SymbolMap`).

    Disabled rows are included when they still name a venue id, so old recordings of a
    symbol switched off later still parse to the same normalized name.
    """
    out: dict[str, str] = {}
    for name, entry in table.items():
        venue = entry.venues.get(exchange)
        if venue is not None:
            out[venue] = name
    return out


def normalize_venue_symbol(exchange: str, venue_sym: str, table: SymbolTable | None = None) -> str:
    """Normalized name for a venue id: the table's answer first, else the naming rule.

    The rule only undoes the venue's syntax (OKX `XMR-USDT-SWAP` -> `XMRUSDT`, KuCoin
    `XBTUSDTM` -> `BTCUSDT`); unit prefixes like `1000` are kept, because which venues
    share a contract size cannot be derived from the name alone.
    """
    if table is not None:
        found = venue_map(table, exchange).get(venue_sym)
        if found is not None:
            return found
    sym = venue_sym.strip().upper()
    if exchange == "okx":
        parts = sym.split("-")
        if len(parts) >= 2:
            return parts[0] + parts[1]
        return sym
    if exchange == "kucoin":
        if sym.endswith(("USDTM", "USDCM")):
            sym = sym[:-1]
        if sym.startswith("XBT"):
            sym = "BTC" + sym[3:]
        return sym
    return sym
