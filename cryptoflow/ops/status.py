"""Live status: a compact rich table, refreshed about once a second, when stdout is a TTY.

One row per (venue, symbol): messages/s and rows/s over the last refresh, the age of
its oldest lane among those /healthz watches (red, and the lane named, past
`metrics.stale_after`), gaps, resyncs, book state. The caption gives the writer's
side: buffered rows, spool backlog (files/bytes), uploads and upload failures. Rows/s
needs the writer's per-symbol row counter (`WriterStats.rows_by_symbol`); without it the
column shows "-".

`render_table` is pure (tests call it); `run_live_status` is the trio task. It returns at
once when the console is not a terminal, so `collect` under systemd/docker/k8s or piped
output prints nothing extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cryptoflow.ops.metrics import Freshness, SymbolView, iter_symbols, watched_lanes


@attrs.frozen
class SymbolCounts:
    messages: int
    rows: int | None


#: (exchange, symbol) -> counts summed over lanes (and over shards, if a symbol is in two)
Snapshot = dict[tuple[str, str], SymbolCounts]


def take_snapshot(result: Any) -> Snapshot:
    out: dict[tuple[str, str], SymbolCounts] = {}
    for v in iter_symbols(result):
        key = (v.exchange, v.symbol)
        msgs = sum(v.messages.values())
        rows = None if v.rows is None else sum(v.rows.values())
        prev = out.get(key)
        if prev is not None:  # the symbol is in two shards: messages add up, rows do not
            msgs += prev.messages  # (the writer's row counts are per symbol already)
            rows = prev.rows if prev.rows is not None else rows
        out[key] = SymbolCounts(msgs, rows)
    return out


def _rate(now: int | None, before: int | None, dt: float) -> float | None:
    if now is None or before is None or dt <= 0:
        return None
    return max(0, now - before) / dt


def _fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}"


def _fmt_age(age: float | None) -> str:
    if age is None:
        return "-"
    if age < 60:
        return f"{age:.1f}s"
    if age < 3600:
        return f"{age / 60:.1f}m"
    return f"{age / 3600:.1f}h"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


#: (age in seconds, lane) of a row's oldest watched lane
LaneAge = tuple[float, str]


def _worst_age(view: SymbolView, freshness: Freshness) -> LaneAge | None:
    """The oldest of the lanes /healthz watches (`watched_lanes`) that have received
    data: a live poll lane must not hide a dead diff stream (the minimum over lanes did),
    nor a resync-only snapshots lane make a symbol without a poller look stale."""
    ages = [
        (a, lane) for lane in watched_lanes(view) if (a := freshness.age(view, lane)) is not None
    ]
    return max(ages) if ages else None


def _fmt_lane_age(worst: LaneAge | None, stale_after: float) -> str:
    """The age; the lane named when it is past `stale_after` (what /healthz reports)."""
    if worst is None:
        return "-"
    age, lane = worst
    return f"{_fmt_age(age)} {lane}" if age > stale_after else _fmt_age(age)


def render_table(
    result: Any,
    previous_snapshot: Snapshot | None,
    dt: float,
    *,
    freshness: Freshness | None = None,
    stale_after: float = 60.0,
) -> Table:
    """The status table for `result`; rates are (now - previous_snapshot) / dt."""
    freshness = freshness or Freshness()
    current = take_snapshot(result)
    table = Table(title="cryptoflow", expand=False, pad_edge=False, show_edge=False)
    for name, justify in (
        ("venue", "left"),
        ("symbol", "left"),
        ("msg/s", "right"),
        ("rows/s", "right"),
        ("age", "right"),
        ("gaps", "right"),
        ("resyncs", "right"),
        ("book", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    seen: dict[tuple[str, str], SymbolView] = {}
    ages: dict[tuple[str, str], LaneAge | None] = {}
    gaps: dict[tuple[str, str], int] = {}
    resyncs: dict[tuple[str, str], int] = {}
    synced: dict[tuple[str, str], bool] = {}
    for v in iter_symbols(result):
        key = (v.exchange, v.symbol)
        seen.setdefault(key, v)
        a = _worst_age(v, freshness)
        old = ages.get(key)
        # in two shards: each runs its own connections, and /healthz judges each
        ages[key] = a if old is None else (old if a is None else max(a, old))
        gaps[key] = gaps.get(key, 0) + v.gaps
        resyncs[key] = resyncs.get(key, 0) + v.resyncs
        synced[key] = synced.get(key, False) or v.synced
    last_venue = None
    for key in sorted(seen):
        exchange, symbol = key
        now_c = current[key]
        if previous_snapshot is None:  # first frame: no rates yet
            msg_rate = row_rate = None
        else:
            before = previous_snapshot.get(key, SymbolCounts(0, 0))
            msg_rate = _rate(now_c.messages, before.messages, dt)
            row_rate = _rate(now_c.rows, before.rows if before.rows is not None else 0, dt)
        worst = ages.get(key)
        style = "red" if worst is not None and worst[0] > stale_after else None
        if gaps[key]:
            style = style or "yellow"
        has_data = now_c.messages > 0
        book = "synced" if synced[key] else ("waiting" if has_data else "no data")
        table.add_row(
            exchange if exchange != last_venue else "",
            symbol,
            _fmt_rate(msg_rate),
            _fmt_rate(row_rate),
            _fmt_lane_age(worst, stale_after),
            str(gaps[key]),
            str(resyncs[key]),
            book,
            style=style,
        )
        last_venue = exchange
    table.caption = _caption(result)
    return table


def _caption(result: Any) -> str:
    ws = getattr(result, "writer", None) if result is not None else None
    if ws is None:
        return "writer: starting"
    parts = [
        f"buffered {getattr(ws, 'buffered_rows', 0):,} rows",
        f"spool {getattr(ws, 'spool_files', 0)} files / "
        f"{_fmt_bytes(getattr(ws, 'spool_bytes', 0))}",
        f"uploaded {getattr(ws, 'files_uploaded', 0)} files",
        f"upload failures {getattr(ws, 'upload_failures', 0)}",
    ]
    if getattr(ws, "backpressure", False):
        parts.append("BACK-PRESSURE (spool full)")
    return " · ".join(parts)


def live_status_enabled(console: Console) -> bool:
    return bool(console.is_terminal) and not console.is_dumb_terminal


async def run_live_status(
    result_getter: Callable[[], Any],
    *,
    console: Console | None = None,
    interval: float = 1.0,
    stale_after: float = 60.0,
) -> None:
    """Show the live table until cancelled; returns at once when not on a terminal.
    A row turns red past `stale_after` (`metrics.stale_after`, as /healthz)."""
    console = console or Console()
    if not live_status_enabled(console):
        return
    freshness = Freshness(clock=trio.current_time)
    previous: Snapshot | None = None
    last = time.monotonic()
    with Live(
        render_table(result_getter(), None, 0.0, freshness=freshness, stale_after=stale_after),
        console=console,
        auto_refresh=False,  # no refresh thread: the trio task below drives it
        transient=False,
        redirect_stdout=False,
        redirect_stderr=False,
    ) as live:
        try:
            while True:
                result = result_getter()
                now = time.monotonic()
                table = render_table(
                    result, previous, now - last, freshness=freshness, stale_after=stale_after
                )
                live.update(table, refresh=True)
                previous, last = take_snapshot(result), now
                await trio.sleep(interval)
        finally:
            # cancelled once the writer has stopped: the table left on the screen shows
            # the final counts (uploads of the drain, an empty spool), not those of a
            # second before the stop; rates are not shown for it
            live.update(
                render_table(
                    result_getter(), None, 0.0, freshness=freshness, stale_after=stale_after
                ),
                refresh=True,
            )
