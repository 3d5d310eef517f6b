"""The spool and the local output tree must be two separate folders.

Uploaded files land in the output tree with the spool's own layout, so an overlap loses
data: `collect --output ./spool` reported 2,469 rows uploaded and left no file (each
upload was a file the spool then deleted as uploaded); a spool `.` holding `./data` took
the stored files for waiting ones at the next start and moved them a level deeper.
validate-config, collect and spool flush refuse it (exit 2) before touching a file.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from configtools import make_config
from typer.testing import CliRunner

from cryptoflow.cli import app
from cryptoflow.models import Dataset
from cryptoflow.storage import layout
from cryptoflow.storage.spool import Spool

SHARDS = [{"name": "main", "source_ip": None, "symbols": {"binance": ["BTCUSDT"]}}]


def _cli(*args: str):
    return CliRunner(env={"TYPER_USE_RICH": "0"}).invoke(app, list(args))


def _config(tmp_path: Path, spool: str, local: str) -> Path:
    return make_config(
        tmp_path / "cfg",
        shards=SHARDS,
        overrides={"storage.spool.path": spool, "storage.local_path": local},
    )


def _spool_line(cfg: Path) -> int:
    lines = cfg.read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.strip().startswith("path:"))


def _spooled_files(spool: Path, n: int = 2) -> list[str]:
    """`n` complete delta files waiting in the spool, as the writer leaves them."""
    from conftest import tiny_frame_from_columns

    s = Spool(spool, max_bytes=10**9)
    keys = []
    for i in range(n):
        ids = list(range(i * 10, i * 10 + 10))
        ts = [1_741_082_400_000 + j for j in ids]
        columns = {
            "timestamp": ts,
            "receive_time": [t * 1_000_000 for t in ts],
            "first_update_id": ids,
            "last_update_id": ids,
            "prev_update_id": [j - 1 for j in ids],
            "side": ["bid"] * 10,
            "price": [str(100 + j) for j in ids],
            "quantity": ["1"] * 10,
            "raw_quantity": ["1"] * 10,
        }
        frame = tiny_frame_from_columns(Dataset.DELTAS, "binance", "futures", "BTCUSDT", columns)
        [(key, _, data)] = layout.files_for_frame(
            Dataset.DELTAS, "binance", "futures", "BTCUSDT", frame
        )
        s.write(key, data)
        keys.append(key)
    return keys


def _parquet_under(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet"))


@pytest.mark.parametrize(
    ("spool", "local", "relation"),
    [
        ("{t}/same", "{t}/same", "is the same folder as"),
        ("{t}/data/spool", "{t}/data", "is inside"),
        ("{t}", "{t}/data", "contains"),
        ("{t}/a/../data", "{t}/data", "is the same folder as"),  # resolved, not compared as text
    ],
)
def test_validate_config_refuses_overlapping_spool_and_local_path(
    tmp_path: Path, spool: str, local: str, relation: str
) -> None:
    spool, local = spool.format(t=tmp_path), local.format(t=tmp_path)
    cfg = _config(tmp_path, spool, local)
    res = _cli("validate-config", "-c", str(cfg))
    assert res.exit_code == 2, res.output
    assert (
        f"{cfg}:{_spool_line(cfg)}: storage.spool.path: {spool!r} {relation} "
        f"storage.local_path {local!r}; expected two folders apart"
    ) in res.output


def test_a_spool_dot_holding_the_default_data_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """spool `.` (relative, resolved against the CWD like the collector does)."""
    cfg = _config(tmp_path, ".", "./data")
    monkeypatch.chdir(tmp_path)
    res = _cli("validate-config", "-c", str(cfg))
    assert res.exit_code == 2, res.output
    assert "storage.spool.path: '.' contains storage.local_path './data'" in res.output


def test_separate_folders_and_s3_pass(tmp_path: Path) -> None:
    cfg = _config(tmp_path, str(tmp_path / "spool"), str(tmp_path / "spool-data"))
    assert _cli("validate-config", "-c", str(cfg)).exit_code == 0
    # with S3 the local tree is not used: the same folder is no conflict there
    from cryptoflow.config import load_settings
    from cryptoflow.storage.factory import check_spool_apart

    cfg = _config(tmp_path, str(tmp_path / "same"), str(tmp_path / "same"))
    settings = load_settings(cfg, env={"S3_BUCKET": "b"}, env_file=cfg.parent / ".env")
    storage = settings.app.storage
    s3_on = attrs.evolve(storage, s3=attrs.evolve(storage.s3, enabled=True))
    check_spool_apart(s3_on, settings.env, None, cfg)  # no error


def test_collect_refuses_output_equal_to_the_spool(tmp_path: Path) -> None:
    """It used to run, report every row uploaded and leave no file."""
    spool = tmp_path / "spool"
    cfg = _config(tmp_path, str(spool), str(tmp_path / "data"))
    res = _cli(
        "collect", "-c", str(cfg), "-e", "binance", "--simulate", "--duration", "2",
        "--no-status", "--output", str(spool),
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (
        f"error: --output {str(spool)!r}: is the spool folder "
        f"({cfg}:{_spool_line(cfg)}: storage.spool.path {str(spool)!r}); "
        "expected an output folder apart from the spool"
    )
    assert not spool.exists()  # refused before anything was created


def test_collect_refuses_a_configured_overlap(tmp_path: Path) -> None:
    cfg = _config(tmp_path, str(tmp_path / "data"), str(tmp_path / "data"))
    # refused before any venue is reached (--simulate would use neither folder)
    res = _cli("collect", "-c", str(cfg), "-e", "binance", "--duration", "2")
    assert res.exit_code == 2, res.output
    assert f"{cfg}:{_spool_line(cfg)}: storage.spool.path: " in res.output


@pytest.mark.parametrize("where", ["spool", "parent"])
def test_spool_flush_refuses_an_output_overlapping_the_spool(tmp_path: Path, where: str) -> None:
    """`spool flush --output ./spool` deleted every waiting file as uploaded."""
    spool = tmp_path / "spool"
    keys = _spooled_files(spool)
    before = _parquet_under(spool)
    assert len(before) == len(keys)
    cfg = _config(tmp_path, str(spool), str(tmp_path / "data"))
    out = spool if where == "spool" else tmp_path
    res = _cli("spool", "flush", "-c", str(cfg), "--output", str(out))
    assert res.exit_code == 2, res.output
    relation = "is the spool folder" if where == "spool" else "contains the spool"
    assert res.output.startswith(f"error: --output {str(out)!r}: {relation} ")
    assert _parquet_under(spool) == before  # nothing moved, nothing deleted


def test_spool_flush_to_a_separate_output_still_moves_everything(tmp_path: Path) -> None:
    spool, out = tmp_path / "spool", tmp_path / "out"
    keys = _spooled_files(spool)
    cfg = _config(tmp_path, str(spool), str(tmp_path / "data"))
    res = _cli("spool", "flush", "-c", str(cfg), "--output", str(out))
    assert res.exit_code == 0, res.output
    import polars as pl

    stored = pl.read_parquet(_parquet_under(out))
    assert sorted(stored["last_update_id"].to_list()) == list(range(10 * len(keys)))
    assert _parquet_under(spool) == []
