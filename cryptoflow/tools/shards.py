"""`cryptoflow shards list`: what each IP shard will spend per minute, per venue.

The point is to catch an over-budget shard before a venue bans the IP: the numbers come
from the config (intervals, lanes, depth) and the venues' documented per-IP limits in
`cryptoflow.exchanges.limits`, not from live traffic.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import attrs
from rich.console import Console
from rich.table import Table

from cryptoflow.config import load_settings, stale_after_warnings
from cryptoflow.config_schema import EXCHANGES, Settings
from cryptoflow.errors import UsageError
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.limits import VENUE_LIMITS, snapshot_cost

#: REST snapshots the delta lane needs to (re)sync a book on venues whose stream starts
#: without one (Binance, KuCoin): one per symbol per 10 minutes, a generous allowance for
#: gaps and reconnects. Startup snapshots are one-off and not counted.
RESYNCS_PER_SYMBOL_PER_MINUTE = 0.1

Status = Literal["OK", "NEAR", "OVER"]


@attrs.frozen
class ShardBudget:
    """One shard's REST spend on one venue, per minute, against that venue's per-IP limit."""

    shard: str
    source_ip: str  # "default" = the host's default route
    exchange: str
    symbols: tuple[str, ...]
    requests_per_minute: float
    weight_per_minute: float
    limit_per_minute: int
    safety: float
    status: Status

    @property
    def symbol_count(self) -> int:
        return len(self.symbols)

    @property
    def usage(self) -> float:
        return self.weight_per_minute / self.limit_per_minute if self.limit_per_minute else 0.0


def budget(settings: Settings, exchange: str | None = None) -> list[ShardBudget]:
    """Budgets for every shard x enabled venue (or just `exchange`) that has symbols."""
    enabled = settings.app.cryptoflow.exchanges
    venues = [exchange] if exchange is not None else [e for e in EXCHANGES if e in enabled]
    rows: list[ShardBudget] = []
    for shard in settings.shards:
        for venue in venues:
            symbols = tuple(shard.symbols.get(venue) or ())
            if symbols:
                rows.append(_venue_budget(settings, shard.name, shard.source_ip, venue, symbols))
    return rows


def _venue_budget(
    settings: Settings, shard: str, source_ip: str | None, venue: str, symbols: tuple[str, ...]
) -> ShardBudget:
    src = settings.app.source.for_exchange(venue)
    interval = src.snapshot_interval or settings.app.reader.snapshot_interval
    weight, limit = snapshot_cost(venue, src.depth_limit)
    if src.weight_limit_per_minute > 0:
        limit = src.weight_limit_per_minute
    per_symbol = 60.0 / interval if src.snapshots else 0.0
    if src.deltas and VENUE_LIMITS[venue].ws_needs_rest_snapshot:
        per_symbol += RESYNCS_PER_SYMBOL_PER_MINUTE
    requests = per_symbol * len(symbols)
    spent = requests * weight
    status: Status = "OK"
    if spent > limit:
        status = "OVER"
    elif spent > limit * src.weight_safety:
        status = "NEAR"
    return ShardBudget(
        shard=shard,
        source_ip=source_ip or "default",
        exchange=venue,
        symbols=symbols,
        requests_per_minute=round(requests, 2),
        weight_per_minute=round(spent, 2),
        limit_per_minute=limit,
        safety=src.weight_safety,
        status=status,
    )


def run(config_path: Path, exchange: str | None = None, fmt: str = "table") -> int:
    """Print the budget table, or render the manifests; 1 if any shard is over its
    venue's limit (a rendered manifest stays whole on stdout, the reason goes to stderr)."""
    registry.check_exchange(exchange)
    if fmt not in ("table", "k8s", "compose"):
        raise UsageError(f"unknown format {fmt!r}, expected table, k8s or compose")
    settings = load_settings(config_path)
    for warning in stale_after_warnings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    if fmt != "table":
        _render_deploy(settings, config_path, fmt)
        # CI deploys what it renders: an over-budget shard fails it as the table does,
        # after the manifest (stdout stays a clean manifest, the reason goes to stderr)
        over = _over_budget(budget(settings))  # every venue: the manifest runs them all
        for line in over:
            print(f"warning: over budget: {line}", file=sys.stderr)
        return 1 if over else 0
    rows = budget(settings, exchange)
    console = Console(highlight=False)
    console.width = max(console.width, 100)  # a narrow terminal must not truncate numbers
    console.print(_table(rows))
    over = _over_budget(rows)
    for line in over:
        console.print(line)
    return 1 if over else 0


def _over_budget(rows: list[ShardBudget]) -> list[str]:
    """One line per shard and venue over the venue's per-IP limit, saying what to do."""
    return [
        f"{r.shard}/{r.exchange}: {r.weight_per_minute:g} > {r.limit_per_minute}/min per IP; "
        f"raise source.{r.exchange}.snapshot_interval or move symbols to a shard with "
        "another source_ip"
        for r in rows
        if r.status == "OVER"
    ]


def _render_deploy(settings: Settings, config_path: Path, fmt: str) -> None:
    """Kubernetes manifests / compose services rendered from ip_shards.yml (no drift)."""
    from cryptoflow.deploy import render

    render.check_settings(settings, fmt, config_path)  # a refusal comes without warnings
    for warning in render.settings_warnings(settings, fmt):
        print(f"warning: {warning}", file=sys.stderr)
    if fmt == "k8s":
        sys.stdout.write(render.render_k8s_for_settings(settings, config_path=config_path))
    else:
        sys.stdout.write(render.render_compose_for_settings(settings))


def _table(rows: list[ShardBudget]) -> Table:
    table = Table(title="REST budget per shard and venue (per minute, per source IP)")
    for col in ("shard", "source ip", "exchange", "symbols", "req/min", "weight/min", "limit/min"):
        table.add_column(col, justify="right" if "/" in col else "left", no_wrap=True)
    table.add_column("use", justify="right")
    table.add_column("status")
    colors = {"OK": "green", "NEAR": "yellow", "OVER": "bold red"}
    for r in rows:
        table.add_row(
            r.shard,
            r.source_ip,
            r.exchange,
            str(r.symbol_count),
            f"{r.requests_per_minute:g}",
            f"{r.weight_per_minute:g}",
            str(r.limit_per_minute),
            f"{r.usage:.0%}",
            f"[{colors[r.status]}]{r.status}[/]",
        )
    return table
