"""inspect: coverage per hour, gaps counted, holes found, corrupt files reported."""

from __future__ import annotations

from pathlib import Path

import pytest
from datagen import generate
from rich.console import Console

from cryptoflow.errors import DataError
from cryptoflow.tools import inspect


def _console() -> Console:
    return Console(width=250)


def test_report(tmp_path: Path, capsys) -> None:
    generate(tmp_path, start="2026-01-02T00:30:00Z", minutes=60, gap_at_s=300, gap_messages=200)
    generate(tmp_path, start="2026-01-02T03:10:00Z", minutes=5, seed=3)
    assert inspect.run(str(tmp_path), console=_console()) == 0
    out = capsys.readouterr().out
    assert "2026-01-02 00" in out and "2026-01-02 03" in out
    assert "1 h (no files)" in out  # hour 02 missing in between
    assert " s" in out and "Holes" in out  # the 100 s silent stretch of deltas


def test_filters_and_empty(tmp_path: Path, capsys) -> None:
    generate(tmp_path, minutes=5)
    assert inspect.run(str(tmp_path), exchange="binance", symbol="BTCUSDT",
                       start="2026-01-02T00:31:00Z", end="2026-01-02T00:32:00Z",
                       console=_console()) == 0  # fmt: skip
    with pytest.raises(DataError, match="no data"):
        inspect.run(str(tmp_path), symbol="ETHUSDT")
    with pytest.raises(DataError):
        inspect.run(str(tmp_path / "nope"))


def test_corrupt_file_reported(tmp_path: Path, capsys) -> None:
    g = generate(tmp_path, minutes=5)
    (g.files[0].parent / "BTCUSDT-9-9-9-9.parquet").write_bytes(b"PAR1 junk")
    assert inspect.run(str(tmp_path), console=_console()) == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and "BTCUSDT-9-9-9-9.parquet" in out
