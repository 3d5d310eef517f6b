"""`cryptoflow spool status` and `spool flush` on paths they cannot use.

Found by the CLI audit: `spool status` on a mistyped spool path (or a relative one from
the wrong working directory) reported an empty spool, exit 0, and created the folder;
operations.md takes an empty `spool status` as the go-ahead to move a shard. A spool
path that is a file failed with `[Errno 20] Not a directory: 'afile/.doomed'` (exit 1)
where collect names the key (exit 2).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from configtools import make_config
from typer.testing import CliRunner

from cryptoflow.cli import app

SHARDS = [{"name": "main", "source_ip": None, "symbols": {"binance": ["BTCUSDT"]}}]


def _cli(*args: str):
    return CliRunner(env={"TYPER_USE_RICH": "0"}).invoke(app, list(args))


def _config(tmp_path: Path, spool: str, local: str | None = None) -> Path:
    return make_config(
        tmp_path / "cfg",
        shards=SHARDS,
        overrides={
            "storage.spool.path": spool,
            "storage.local_path": local or str(tmp_path / "data"),
        },
    )


def _line_of(cfg: Path, text: str) -> int:
    lines = cfg.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.strip().startswith(text))


@pytest.mark.parametrize("command", ["status", "flush"])
def test_status_of_a_spool_that_does_not_exist_says_so_and_creates_nothing(tmp_path, command):
    """`flush` too: it created the folder and said "nothing to flush", exit 0, for a
    mistyped path."""
    spool = tmp_path / "spoool"  # a typo of the real spool's name
    cfg = _config(tmp_path, str(spool))
    res = _cli("spool", command, "-c", str(cfg))
    assert res.exit_code == 1, res.output
    assert res.stdout == ""  # no "total 0 files" to take for an empty spool
    where = f"{cfg}:{_line_of(cfg, 'path:')}: storage.spool.path"
    assert res.stderr == f"error: {where}: no spool at {spool}: " + (
        "nothing was ever spooled there, or the path or the working directory is wrong; "
        "nothing created\n"
    )
    assert not spool.exists()


def test_status_names_a_relative_spool_path_as_taken_from_the_working_directory(
    tmp_path, monkeypatch
):
    cfg = _config(tmp_path, "./spool")
    monkeypatch.chdir(tmp_path)  # not where the collector runs
    res = _cli("spool", "status", "-c", str(cfg))
    assert res.exit_code == 1, res.output
    said = f"no spool at {tmp_path / 'spool'} ('./spool' is from the working directory): "
    assert said in res.stderr
    assert not (tmp_path / "spool").exists()


def test_status_of_an_existing_empty_spool_is_still_exit_0(tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    res = _cli("spool", "status", "-c", str(_config(tmp_path, str(spool))))
    assert res.exit_code == 0, res.output
    assert "total             0 files" in res.stdout


@pytest.mark.parametrize("command", ["status", "flush"])
@pytest.mark.parametrize("under", [False, True])
def test_a_spool_path_that_is_a_file_is_one_line_naming_the_key_exit_2(tmp_path, command, under):
    afile = tmp_path / "afile"
    afile.write_text("x")
    spool = afile / "spool" if under else afile
    cfg = _config(tmp_path, str(spool))
    res = _cli("spool", command, "-c", str(cfg))
    assert res.exit_code == 2, res.output
    problem = (
        f"cannot be created: {afile} is not a directory"
        if under
        else ("exists but is not a directory")
    )
    where = f"{cfg}:{_line_of(cfg, 'path:')}: storage.spool.path"
    assert res.output == f"{where}: {str(spool)!r}: {problem}\n"
    assert afile.read_text() == "x"


def test_collect_words_a_spool_path_that_is_a_file_as_status_does(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = _config(tmp_path, str(afile))
    res = _cli("collect", "-c", str(cfg), "-e", "binance", "--duration", "1")
    assert res.exit_code == 2, res.output
    where = f"{cfg}:{_line_of(cfg, 'path:')}: storage.spool.path"
    assert res.output == f"{where}: {str(afile)!r}: exists but is not a directory\n"


def test_flush_to_an_output_that_is_a_file_is_one_line_exit_2_and_moves_nothing(tmp_path):
    """It printed one 'not uploaded (kept): ... Not a directory' line per spooled file
    and exited 1, where `collect --output afile` refuses the output in one line."""
    from test_spool_apart import _parquet_under, _spooled_files

    spool = tmp_path / "spool"
    _spooled_files(spool, 3)
    before = _parquet_under(spool)
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = _cli("spool", "flush", "-c", str(_config(tmp_path, str(spool))), "--output", str(afile))
    assert res.exit_code == 2, res.output
    assert res.output == f"error: --output {str(afile)!r}: cannot write there: Not a directory\n"
    assert _parquet_under(spool) == before and afile.read_text() == "x"


def test_flush_to_a_configured_local_path_that_is_a_file_names_the_key(tmp_path):
    from test_spool_apart import _parquet_under, _spooled_files

    spool = tmp_path / "spool"
    _spooled_files(spool, 2)
    before = _parquet_under(spool)
    afile = tmp_path / "afile"
    afile.write_text("x")
    cfg = _config(tmp_path, str(spool), str(afile))
    res = _cli("spool", "flush", "-c", str(cfg))
    assert res.exit_code == 2, res.output
    where = f"{cfg}:{_line_of(cfg, 'local_path:')}: storage.local_path"
    assert res.output == f"{where}: cannot write there: Not a directory\n"
    assert _parquet_under(spool) == before


def test_flush_counts_the_files_it_uploads_after_splitting_the_journals(tmp_path):
    """'flushing 7 files' was followed by '67 failed, 67 left': the count before the
    journals were split into a file per symbol-hour. Now the line counts what goes up
    and says where the number comes from."""
    from test_journal import three_journals

    from cryptoflow.storage.spool import Spool

    spool = tmp_path / "spool"
    three_journals(Spool(spool, max_bytes=10**9))  # 3 symbols x 2 hours
    out = tmp_path / "out"
    res = _cli("spool", "flush", "-c", str(_config(tmp_path, str(spool))), "--output", str(out))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("flushing 6 files (")
    # one file per symbol-hour after the split: nothing to merge, so merging is not named
    assert lines[0].endswith(" (the spool's 3 files: 3 journals split per symbol-hour)")
    assert lines[1].startswith("uploaded 6 files (") and lines[1].endswith(
        ", 0 failed, 0 left in the spool"
    )
    assert len(list(out.rglob("*.parquet"))) == 6


def test_flush_names_only_what_the_drain_did(tmp_path):
    """Found by review: with batching on and no journal in the spool, the count line
    still said "journals split per symbol-hour"; and the pre-scan output check created
    the output folder even when there was nothing to flush."""
    from test_spool_apart import _spooled_files

    spool = tmp_path / "spool"
    out = tmp_path / "out"
    cfg = _config(tmp_path, str(spool))
    spool.mkdir()
    res = _cli("spool", "flush", "-c", str(cfg), "--output", str(out))
    assert res.exit_code == 0 and "nothing to flush" in res.output
    assert not out.exists()  # checked, not created
    _spooled_files(spool, 3)  # plain files of one symbol-hour: merged, nothing split
    res = _cli("spool", "flush", "-c", str(cfg), "--output", str(out))
    assert res.exit_code == 0, res.output
    first = res.stdout.splitlines()[0]
    assert first.startswith("flushing 1 files (") and "journal" not in first
    assert first.endswith(
        " (the spool's 3 files: the files of 1 symbol-hours merged into one each)"
    )


@pytest.mark.parametrize("kind", ["name too long", "under a dangling link"])
def test_flush_with_files_refuses_an_output_a_look_alone_misjudges(tmp_path, kind):
    """Found by review: checked only without creating anything, an output under a
    dangling symbolic link passed (the journals were then split and merged, and every
    upload failed, exit 1), and a name too long raised a bare OSError (exit 1). With
    files to upload the output is made and probed as `collect` does: one line, exit 2,
    the spool untouched."""
    from test_spool_apart import _spooled_files

    spool = tmp_path / "spool"
    if kind == "name too long":
        out = tmp_path / ("x" * 300)
        why = "File name too long"
    else:
        (tmp_path / "link").symlink_to(tmp_path / "nowhere")
        out = tmp_path / "link" / "out"
        why = "No such file or directory"
    before = _spooled_files(spool, 3)
    res = _cli("spool", "flush", "-c", str(_config(tmp_path, str(spool))), "--output", str(out))
    assert res.exit_code == 2, res.output
    # (after the scan, which may log its INFO line first)
    assert res.output.splitlines()[-1] == f"error: --output {str(out)!r}: cannot write there: {why}"
    assert sorted(_spooled(spool)) == sorted(before)


def _spooled(spool: Path) -> list[str]:
    return [
        p.relative_to(spool).as_posix()
        for p in spool.rglob("*.parquet")
        if "quarantine" not in p.parts
    ]


def test_flush_counts_a_journal_it_cannot_split_as_quarantined(tmp_path):
    """Found by review: the count line named every journal as split, also one the split
    quarantined (rows without their partition columns)."""
    import polars as pl
    from test_journal import three_journals

    from cryptoflow.models import Dataset
    from cryptoflow.storage.spool import Spool

    spool = tmp_path / "spool"
    s = Spool(spool, max_bytes=10**9)
    three_journals(s)
    s.write_journal(Dataset.DELTAS, pl.DataFrame({"timestamp": [1, 2], "x": [1, 2]}))
    out = tmp_path / "out"
    res = _cli("spool", "flush", "-c", str(_config(tmp_path, str(spool))), "--output", str(out))
    assert res.exit_code == 0, res.output
    assert (
        "flushing 6 files (" in res.stdout
        and " (the spool's 4 files: 3 journals split per symbol-hour; 1 journals quarantined "
        "(cannot be split))"
        in res.stdout
    )
