"""compact: merges closed hours, never the open one, and resumes an interrupted run."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
from datagen import generate

from cryptoflow.tools import compact

NOW = datetime(2026, 1, 2, 3, 30, tzinfo=UTC)  # hour 02 is still open (margin 1 h)


def _rows(root: Path, ds: str) -> pl.DataFrame:
    files = sorted((root / ds).rglob("*.parquet"))
    return pl.concat([pl.read_parquet(f, hive_partitioning=False) for f in files])


def _files(root: Path, ds: str, hour: str) -> list[Path]:
    return sorted((root / ds).rglob(f"hour={hour}/*.parquet"))


def test_compacts_closed_hours_only(tmp_path: Path, capsys) -> None:
    g = generate(tmp_path, start="2026-01-02T01:30:00Z", minutes=75, gap_at_s=600)
    before = _rows(tmp_path, "deltas")
    assert len(_files(tmp_path, "deltas", "01")) > 1
    assert compact.run(str(tmp_path), now=NOW) == 0
    (only,) = _files(tmp_path, "deltas", "01")
    assert only.name.startswith("compacted-")
    assert compact.manifest(only)
    assert len(_files(tmp_path, "deltas", "02")) > 1  # open hour untouched
    after = _rows(tmp_path, "deltas")
    assert after.height == before.height == g.delta_rows
    assert after.sort(after.columns).equals(before.sort(before.columns))
    hour = pl.read_parquet(only)
    assert hour["timestamp"].is_sorted()
    # idempotent
    assert compact.run(str(tmp_path), now=NOW) == 0
    assert _files(tmp_path, "deltas", "01") == [only]
    assert "compacted 0 hour(s)" in capsys.readouterr().out


def test_interrupted_then_resumed(tmp_path: Path) -> None:
    g = generate(tmp_path, start="2026-01-02T01:00:00Z", minutes=60)
    smalls = _files(tmp_path, "snapshots", "01")
    keep = tmp_path / "keep"
    keep.mkdir()
    for p in smalls[:3]:
        shutil.copy(p, keep / p.name)
    assert compact.run(str(tmp_path), now=NOW) == 0
    # simulate a crash after the rename, before all deletes: put 3 sources back
    for p in smalls[:3]:
        shutil.copy(keep / p.name, p)
    (smalls[0].parent / ".compacting-deadbeef.tmp").write_bytes(b"partial")
    assert compact.run(str(tmp_path), now=NOW) == 0
    files = _files(tmp_path, "snapshots", "01")
    assert len(files) == 1 and files[0].name.startswith("compacted-")
    df = _rows(tmp_path, "snapshots")
    assert df.height == g.snapshot_rows
    assert not df.is_duplicated().any()
    assert not list(smalls[0].parent.glob(".compacting-*"))


def test_late_file_merges_into_existing(tmp_path: Path) -> None:
    g = generate(tmp_path, start="2026-01-02T01:00:00Z", minutes=30)
    late = tmp_path / "late"
    generate(late, start="2026-01-02T01:40:00Z", minutes=5, seed=9)
    assert compact.run(str(tmp_path), now=NOW) == 0
    for p in (late / "deltas").rglob("*.parquet"):
        dest = tmp_path / p.relative_to(late)
        shutil.copy(p, dest)
    n_late = _rows(late, "deltas").height
    assert compact.run(str(tmp_path), now=NOW) == 0
    files = _files(tmp_path, "deltas", "01")
    assert len(files) == 1
    assert _rows(tmp_path, "deltas").height == g.delta_rows + n_late


def test_before_hour_and_corrupt(tmp_path: Path) -> None:
    generate(tmp_path, start="2026-01-02T00:00:00Z", minutes=120)
    bad = _files(tmp_path, "deltas", "01")[0].parent / "BTCUSDT-1-1-1-1.parquet"
    bad.write_bytes(b"junk")
    assert compact.run(str(tmp_path), before_hour="2026-01-02T01:00:00Z", now=NOW) == 0
    assert len(_files(tmp_path, "deltas", "00")) == 1
    assert len(_files(tmp_path, "deltas", "01")) > 2
    assert compact.run(str(tmp_path), now=NOW) == 1  # hour 01 has a corrupt file: kept
    assert bad.exists() and len(_files(tmp_path, "deltas", "01")) > 2
