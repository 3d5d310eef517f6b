"""verify: clean data passes, recorded gaps are known, injected faults are problems."""

from __future__ import annotations

from pathlib import Path

import pytest
from datagen import delta_rows, generate, snapshot_rows, write

from cryptoflow.errors import DataError
from cryptoflow.models import Dataset
from cryptoflow.tools import verify


def test_clean_data_with_recorded_gap_passes(tmp_path: Path, capsys) -> None:
    generate(tmp_path, minutes=20, gap_at_s=300)
    assert verify.run(str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "known gap" in out and "OK" in out


def test_unrecorded_break_and_unsorted_snapshot(tmp_path: Path, capsys) -> None:
    generate(tmp_path, minutes=5)
    t = 1767314000000  # 2026-01-02T00:33:20Z, inside the generated range
    write(tmp_path, Dataset.DELTAS, delta_rows(t, 900_001, 900_002, 900_000, [("bid", 99.0, 1.0)]))
    bad = snapshot_rows(t, 900_002, [(99.0, 1.0), (99.5, 1.0)], [(100.5, 1.0), (100.4, 2.0)])
    write(tmp_path, Dataset.SNAPSHOTS, bad)
    assert verify.run(str(tmp_path), exchange="binance", symbol="BTCUSDT") == 1
    out = capsys.readouterr().out
    assert "continuity break" in out and "unsorted snapshot" in out


def test_crossed_and_negative(tmp_path: Path, capsys) -> None:
    rows = snapshot_rows(1767314000000, 5, [(101.0, 1.0)], [(100.0, -1.0)])
    write(tmp_path, Dataset.SNAPSHOTS, rows)
    assert verify.run(str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "crossed book" in out and "negative value" in out


def test_corrupt_file_is_a_problem(tmp_path: Path, capsys) -> None:
    g = generate(tmp_path, minutes=3)
    folder = g.files[0].parent
    (folder / "BTCUSDT-1-2-3-4.parquet").write_bytes(b"not parquet at all")
    assert verify.run(str(tmp_path)) == 1
    assert "unreadable file" in capsys.readouterr().out


def test_empty_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no snapshots or deltas"):
        verify.run(str(tmp_path))
    with pytest.raises(DataError, match="no such folder"):
        verify.run(str(tmp_path / "missing"))
