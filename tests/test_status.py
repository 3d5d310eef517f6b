"""Live status: table contents and rates; disabled when stdout is not a terminal."""

from __future__ import annotations

import io

import trio
from rich.console import Console
from test_metrics import diff, make_result

from cryptoflow.ops.health import check_health
from cryptoflow.ops.metrics import Freshness
from cryptoflow.ops.status import render_table, run_live_status, take_snapshot
from cryptoflow.pipeline.writer import WriterStats


def text_of(table, width: int = 140) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(table)
    return console.file.getvalue()


def row_of(text: str, symbol: str) -> list[str]:
    (line,) = [ln for ln in text.splitlines() if f" {symbol} " in f" {ln} "]
    return [cell for cell in line.split() if cell not in ("│", "┃")]


def test_render_table_rows_rates_ages_and_backlog():
    now = [0.0]
    fresh = Freshness(clock=lambda: now[0])
    result, _send = make_result()
    first = render_table(result, None, 0.0, freshness=fresh)
    text = text_of(first)
    for sym in ("BTCUSDT", "ETHUSDT", "SOLUSDT"):
        assert sym in text
    assert row_of(text, "BTCUSDT")[2:4] == ["-", "-"]  # no rates on the first frame
    assert "spool 4 files / 12.1 KB" in text and "upload failures 2" in text

    before = take_snapshot(result)
    assert before[("binance", "BTCUSDT")].messages == 5
    assert before[("binance", "BTCUSDT")].rows == 12
    normalizer = result.shards["binance/main"].normalizer
    for i in range(4):  # 4 more diffs, 20 more delta rows, within 2 s
        normalizer.feed(diff(41 + 10 * i, 50 + 10 * i, 40 + 10 * i))
    result.writer.rows_by_symbol[("deltas", "binance", "BTCUSDT")] += 20
    now[0] = 2.0
    text = text_of(render_table(result, before, 2.0, freshness=fresh))
    btc = row_of(text, "BTCUSDT")
    # the age of its oldest watched lane: the polled snapshots lane has not moved
    assert btc[:5] == ["binance", "BTCUSDT", "2.0", "10", "2.0s"]
    assert btc[5:] == ["1", "1", "synced"]  # gaps, resyncs, book
    eth = row_of(text, "ETHUSDT")
    assert eth[:4] == ["ETHUSDT", "0.0", "0.0", "2.0s"]  # venue shown once per group
    sol = row_of(text, "SOLUSDT")
    assert sol == ["SOLUSDT", "0.0", "0.0", "-", "0", "0", "no", "data"]


def test_a_dead_lane_shows_as_on_healthz_with_its_stale_after():
    """Found by an audit (repro.sh status: a dead diff stream beside a live poller):
    the age was the minimum over lanes, so the live poll lane hid the dead stream that
    /healthz reported, and the table's red line was always at 60 s whatever
    `metrics.stale_after`. Each watched lane is aged, the row shows the worst."""
    now = [0.0]
    fresh = Freshness(clock=lambda: now[0])
    result, _send = make_result()
    render_table(result, None, 0.0, freshness=fresh)  # first sight of every lane
    sync = result.shards["binance/main"].normalizer.syncs()[("binance", "BTCUSDT")]
    now[0] = 20.0
    sync.counters.snapshots += 1  # the poller keeps going; the diff stream is dead
    table = render_table(result, None, 0.0, freshness=fresh, stale_after=15.0)
    assert row_of(text_of(table), "BTCUSDT")[4:6] == ["20.0s", "deltas"]
    (btc,) = [i for i, cell in enumerate(table.columns[1].cells) if cell == "BTCUSDT"]
    assert table.rows[btc].style == "red"
    reasons = check_health(result, stale_after=15.0, freshness=fresh)
    stale = [(r["reason"], r["symbol"], r["lane"]) for r in reasons]
    assert ("stale", "BTCUSDT", "deltas") in stale
    (eth,) = [i for i, cell in enumerate(table.columns[1].cells) if cell == "ETHUSDT"]
    assert table.rows[eth].style == "red"  # its deltas are 20 s old too
    # below the default 60 s: not red, the lane not named
    table = render_table(result, None, 0.0, freshness=fresh)
    assert row_of(text_of(table), "BTCUSDT")[4:6] == ["20.0s", "1"]
    assert table.rows[btc].style == "yellow"  # it has a gap


def test_render_table_without_per_symbol_rows_and_without_result():
    result, _send = make_result(WriterStats())
    text = text_of(render_table(result, take_snapshot(result), 1.0))
    assert row_of(text, "BTCUSDT")[2:4] == ["0.0", "0.0"]  # nothing moved yet
    assert "writer: starting" in text_of(render_table(None, None, 1.0))


async def test_live_status_off_when_not_a_tty():
    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with trio.fail_after(1):
        await run_live_status(lambda: None, console=console, interval=0.01)
    assert out.getvalue() == ""


async def test_live_status_draws_on_a_terminal():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    result, _send = make_result()
    with trio.move_on_after(0.25):
        await run_live_status(lambda: result, console=console, interval=0.05)
    assert "BTCUSDT" in out.getvalue() and "spool" in out.getvalue()


async def test_live_status_leaves_the_final_counts_on_the_screen():
    """The table is redrawn once more when cancelled (after the writer's drain): the
    last one on screen used to show the spool and uploads of a second before the stop."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    result, _send = make_result()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_live_status(lambda: result, console=console, interval=60))
        await trio.sleep(0.1)  # drawn once; the next redraw would be in a minute
        result.writer.files_uploaded = 424242  # the drain uploads after the last redraw
        assert "424242" not in out.getvalue()
        nursery.cancel_scope.cancel()
    assert "424242" in out.getvalue()


async def test_live_status_marks_lanes_past_its_stale_after():
    """`run_live_status` passes `stale_after` (the run gives `metrics.stale_after`) on
    to the table: it was never passed, so the red line was always at 60 s."""
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system=None)
    result, _send = make_result()
    with trio.move_on_after(0.4):
        await run_live_status(lambda: result, console=console, interval=0.05, stale_after=0.1)
    (line,) = [ln for ln in out.getvalue().splitlines()[-12:] if " BTCUSDT " in ln]
    assert "s deltas" in line or "s snapshots" in line, line
