"""Live status: table contents and rates; disabled when stdout is not a terminal."""

from __future__ import annotations

import io

import trio
from rich.console import Console
from test_metrics import diff, make_result

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
    assert btc[:5] == ["binance", "BTCUSDT", "2.0", "10", "0.0s"]
    assert btc[5:] == ["1", "1", "synced"]  # gaps, resyncs, book
    eth = row_of(text, "ETHUSDT")
    assert eth[:4] == ["ETHUSDT", "0.0", "0.0", "2.0s"]  # venue shown once per group
    sol = row_of(text, "SOLUSDT")
    assert sol == ["SOLUSDT", "0.0", "0.0", "-", "0", "0", "no", "data"]


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
