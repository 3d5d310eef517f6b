"""Raw capture: `storage.raw_capture: true` stores the payloads as received, and a replay
of those files gives the same delta rows as the live run: each file begins with its
symbol's instrument record, so an OKX capture replays with no instruments list and a
Bybit one under the names collect stored."""

from __future__ import annotations

from pathlib import Path

import orjson
import polars as pl
import pytest
import zstandard
from storage_support import Collector, read_local_dataset, write_config
from typer.testing import CliRunner

from cryptoflow.cli import app as cli_app
from cryptoflow.pipeline.raw import RawCapture, record_line, ws_channel
from cryptoflow.storage import layout, rawfile
from cryptoflow.tools.recording import iter_records
from cryptoflow.tools.replay import replay_summary

pytestmark = pytest.mark.slow


def test_record_line_keeps_payload_bytes():
    frame = '{"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate","b":[["1.10","2"]]}}'
    line = record_line(123, "ws", ws_channel(frame), frame)
    assert line.endswith(b',"msg":' + frame.encode() + b"}\n")
    assert b'"channel":"btcusdt@depth@100ms"' in line
    assert record_line(1, "ws", "", "pong").endswith(b'"msg":"pong"}\n')
    assert b"\n" not in record_line(1, "ws", "", '{"a":\n1}')[:-1]


def test_truncated_raw_file_is_corrupt(tmp_path):
    data = rawfile.encode([b'{"a":1}\n'] * 100)
    p = tmp_path / "x.jsonl.zst"
    p.write_bytes(data[:-7])
    with pytest.raises(Exception, match="zstd"):
        rawfile.validate_file(p)
    p.write_bytes(data)
    assert rawfile.validate_file(p) == 100


async def test_raw_capture_off_is_inert():
    cap = RawCapture()
    assert not cap.pending and cap.next_deadline(1.0) == float("inf")


def _records(lines: list[bytes]) -> list[tuple[str, object]]:
    return [(r["kind"], r["msg"]) for r in map(orjson.loads, lines)]


async def test_every_raw_file_begins_with_its_instrument_record():
    cap = RawCapture()
    cap.describe("okx", "BTCUSDT", "BTC-USDT-SWAP", "0.01", 5)
    head = {"symbol": "BTCUSDT", "venue_symbol": "BTC-USDT-SWAP", "multiplier": "0.01"}
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":1}', 10)
    [buf] = cap.take_due(0.0, 1.0, force=True)
    assert _records(buf.file_lines()) == [("instrument", head), ("ws", {"a": 1})]
    assert orjson.loads(buf.file_lines()[0])["channel"] == "BTC-USDT-SWAP"
    assert (buf.first_ns, buf.last_ns) == (10, 10)  # the file's name: payload times only
    # a refused flush goes back in front of the newer buffer: still one record at the head
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":2}', 11)
    cap.put_back(buf)
    [buf] = cap.take_due(0.0, 1.0, force=True)
    assert [k for k, _ in _records(buf.file_lines())] == ["instrument", "ws", "ws"]
    # the list read again with another size while a buffer is open: the record in line
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":3}', 12)
    cap.describe("okx", "BTCUSDT", "BTC-USDT-SWAP", "0.01", 6)  # same content: nothing new
    cap.describe("okx", "BTCUSDT", "BTC-USDT-SWAP", "0.1", 20)
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":4}', 21)
    [buf] = cap.take_due(0.0, 1.0, force=True)
    assert _records(buf.file_lines()) == [
        ("instrument", head),
        ("ws", {"a": 3}),
        ("instrument", {**head, "multiplier": "0.1"}),
        ("ws", {"a": 4}),
    ]


async def test_a_buffer_put_back_gets_the_record_described_while_it_was_out():
    """Found by review (/tmp/review-merged/raw_describe_putback.py): the instrument list
    read again with another size while a symbol's raw buffer was out for a flush that
    then failed; put back with no newer buffer open, the buffer never got the new
    record, so the payloads after it were stored under the OLD multiplier. The record
    now goes in line after the restored lines, once (not again with a newer buffer)."""
    head = {"symbol": "BTCUSDT", "venue_symbol": "BTC-USDT-SWAP", "multiplier": "0.01"}
    cap = RawCapture()
    cap.describe("okx", "BTCUSDT", "BTC-USDT-SWAP", "0.01", 1)
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":1}', 10)
    [buf] = cap.take_due(0.0, 1.0, force=True)  # out for a flush
    cap.describe("okx", "BTCUSDT", "BTC-USDT-SWAP", "0.1", 20)  # a shard restart: new size
    cap.put_back(buf)  # the flush failed
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":2}', 30)
    [buf] = cap.take_due(0.0, 1.0, force=True)
    newer = [
        ("instrument", head),
        ("ws", {"a": 1}),
        ("instrument", {**head, "multiplier": "0.1"}),
        ("ws", {"a": 2}),
    ]
    assert _records(buf.file_lines()) == newer
    cap.add("okx", "BTCUSDT", "ws", "books:BTC-USDT-SWAP", '{"a":3}', 40)
    cap.put_back(buf)  # fails again, a newer buffer (with the new record) open meanwhile
    [buf] = cap.take_due(0.0, 1.0, force=True)
    assert _records(buf.file_lines()) == [*newer, ("ws", {"a": 3})]


def _concat_raw(root: Path, symbol: str, dest: Path) -> int:
    files = sorted(
        (root / "raw").rglob(f"{symbol}-*.jsonl.zst"),
        key=lambda p: layout.parse_key(p.relative_to(root).as_posix()).first_ts_ms or 0,
    )
    assert files, f"no raw files for {symbol}"
    body = b"".join(zstandard.ZstdDecompressor().decompress(p.read_bytes()) for p in files)
    dest.write_bytes(zstandard.ZstdCompressor().compress(body))
    return len(files)


def test_collect_with_raw_capture_replays_to_same_deltas(tmp_path):
    symbols = ["BTCUSDT", "ETHUSDT"]
    cfg = write_config(
        tmp_path / "cfg",
        sim=None,
        spool=tmp_path / "spool",
        raw_capture=True,
        snapshot_interval=3.0,
        symbols=symbols,
    )
    out = tmp_path / "out"
    col = Collector(cfg, tmp_path / "collect.log", duration=6, output=out, simulate=True)
    try:
        assert col.wait(60) == 0, col.text()
    finally:
        col.kill()
    live = read_local_dataset(out, "deltas")
    assert live.height > 0
    # every raw file is a complete zstd frame of records in the shared recording format,
    # after its instrument record
    for p in (out / "raw").rglob("*.jsonl.zst"):
        recs = list(iter_records(p))
        assert recs[0].kind == "instrument" and recs[0].msg["multiplier"] == "1"
        assert {r.kind for r in recs[1:]} <= {"ws", "rest_snapshot"}
    cols = ["symbol", "first_update_id", "last_update_id", "prev_update_id", "side", "price"]
    cols += ["quantity", "receive_time"]
    for sym in symbols:
        joined = tmp_path / f"{sym}.jsonl.zst"
        _concat_raw(out, sym, joined)
        replay_out = tmp_path / f"replay-{sym}"
        summary = replay_summary("binance", joined, replay_out)
        assert summary.bad_records == 0
        replayed = read_local_dataset(replay_out, "deltas").select(cols).sort(cols)
        mine = live.filter(pl.col("symbol") == sym).select(cols).sort(cols)
        assert replayed.height == mine.height > 0
        assert replayed.equals(mine), (replayed.head(), mine.head())


#: what the simulator's instruments endpoints say: (venue name, multiplier) per symbol
CAPTURED = {
    "okx": {"BTCUSDT": ("BTC-USDT-SWAP", "0.01"), "ETHUSDT": ("ETH-USDT-SWAP", "0.1")},
    "bybit": {"1000SHIBUSDT": ("SHIB1000USDT", "1")},
}


@pytest.mark.parametrize("exchange", ["okx", "bybit"])
def test_capture_replays_with_no_flags_to_the_stored_rows(tmp_path, monkeypatch, exchange):
    """Was: the capture kept no instruments list, so an OKX (or KuCoin) capture replayed
    only with --instruments/--multiplier (exit 2 without); and replay named Bybit's
    `SHIB1000USDT` by the venue where collect stores the table's `1000SHIBUSDT`. Now the
    replay of a capture, with no flags and no symbol table at hand, gives the rows the live
    run stored, under the same partitions."""
    symbols = list(CAPTURED[exchange])
    cfg = write_config(
        tmp_path / "cfg",
        sim=None,
        spool=tmp_path / "spool",
        raw_capture=True,
        snapshot_interval=2.0,
        symbols=symbols,
        exchange=exchange,
    )
    out = tmp_path / "out"
    col = Collector(
        cfg, tmp_path / "collect.log", duration=6, output=out, simulate=True, exchange=exchange
    )
    try:
        assert col.wait(60) == 0, col.text()
    finally:
        col.kill()
    monkeypatch.chdir(tmp_path)  # no configs/symbols.yml here: the capture must say it all
    for sym in symbols:
        joined = tmp_path / f"{sym}.jsonl.zst"
        _concat_raw(out, sym, joined)
        replay_out = tmp_path / f"replay-{sym}"
        res = CliRunner().invoke(
            cli_app, ["replay", "-e", exchange, "-i", str(joined), "--output", str(replay_out)]
        )
        assert res.exit_code == 0, res.output
        for dataset in ("deltas", "snapshots"):
            live = read_local_dataset(out, dataset).filter(pl.col("symbol") == sym)
            replayed = read_local_dataset(replay_out, dataset)
            assert live.height > 0 and set(replayed["symbol"]) == {sym}
            assert {p.split("/symbol=")[1].split("/")[0] for p in replayed["_key"]} == {sym}
            cols = [c for c in live.columns if c not in ("_key", "source")]
            mine = live.select(cols).sort(cols)
            assert replayed.select(cols).sort(cols).equals(mine), dataset
        if exchange == "okx":  # sizes in base units: raw contracts x ctVal
            deltas = read_local_dataset(replay_out, "deltas").drop_nulls("raw_quantity")
            assert (deltas["quantity"] != deltas["raw_quantity"]).any()
        # what made it so: each of the symbol's raw files begins with its instrument record
        venue_sym, multiplier = CAPTURED[exchange][sym]
        for p in (out / "raw").rglob(f"symbol={sym}/**/*.jsonl.zst"):
            head = next(iter_records(p))
            assert (head.kind, head.channel) == ("instrument", venue_sym)
            assert head.msg == {"symbol": sym, "venue_symbol": venue_sym, "multiplier": multiplier}
