"""Raw capture: `storage.raw_capture: true` stores the payloads as received, and a replay
of those files gives the same delta rows as the live run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import zstandard
from storage_support import Collector, read_local_dataset, write_config

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
    # every raw file is a complete zstd frame of records in the shared recording format
    for p in (out / "raw").rglob("*.jsonl.zst"):
        recs = list(iter_records(p))
        assert recs and {r.kind for r in recs} <= {"ws", "rest_snapshot"}
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
