from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import polars as pl
import pytest

from cryptoflow.errors import CorruptSpoolFile, SpoolFull
from cryptoflow.storage import layout, parquet, rawfile
from cryptoflow.storage.spool import Spool

KEY = (
    "deltas/exchange=binance/market=futures/symbol=BTCUSDT/"
    "year=2025/month=03/day=04/hour=10/BTCUSDT-1-2-3-4.parquet"
)


def pq_bytes(n: int = 100) -> bytes:
    return parquet.encode(pl.DataFrame({"a": list(range(n)), "b": [str(i) for i in range(n)]}))


def test_roundtrip_and_accounting(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    data = pq_bytes()
    entry = spool.write(KEY, data, rows=100)
    assert entry.path.read_bytes() == data and entry.rows == 100
    assert (spool.files, spool.bytes) == (1, len(data))
    assert spool.by_dataset() == {"deltas": (1, len(data))}
    assert parquet.decode(entry.path.read_bytes()).height == 100
    # same key again (a retried flush) replaces, does not double count
    newer = spool.write(KEY, data)
    assert (spool.files, spool.bytes) == (1, len(data))
    assert [e.key for e in spool.pending()] == [KEY]
    spool.remove(newer)
    assert (spool.files, spool.bytes) == (0, 0)
    assert not entry.path.exists()


def test_atomic_write_never_shows_partial_file(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    final = spool.root / KEY

    def boom(fd):
        # at fsync time the data lives only under a temp name
        assert not final.exists()
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        spool.write(KEY, pq_bytes())
    monkeypatch.undo()
    assert not final.exists()
    assert not [p for p in spool.root.rglob("*") if p.is_file()]  # temp cleaned up
    assert spool.files == 0


def test_startup_removes_temp_and_quarantines_truncated(tmp_path, caplog):
    root = tmp_path / "spool"
    spool = Spool(root, max_bytes=10**9)
    good = spool.write(KEY, pq_bytes())
    bad_key = KEY.replace("1-2-3-4", "5-6-7-8")
    data = pq_bytes()
    (root / bad_key).write_bytes(data[: len(data) // 2])  # truncated
    tmp = root / KEY.rsplit("/", 1)[0] / ".x.parquet.tmp-abcd"
    tmp.write_bytes(b"partial")

    caplog.set_level(logging.INFO)
    spool2 = Spool(root, max_bytes=10**9)
    report = spool2.scan()
    assert (report.files, report.temp_removed, report.quarantined) == (1, 1, 1)
    assert [e.key for e in spool2.pending()] == [good.key]
    assert not tmp.exists() and not (root / bad_key).exists()
    assert (root / "quarantine" / bad_key).exists()
    assert spool2.quarantined() == 1
    assert "QUARANTINED" in caplog.text and bad_key in caplog.text
    with pytest.raises(CorruptSpoolFile):
        parquet.validate_file(root / "quarantine" / bad_key)


def test_spool_full_raises_and_logs(tmp_path, caplog):
    data = pq_bytes()
    spool = Spool(tmp_path / "spool", max_bytes=int(len(data) * 1.5))
    spool.write(KEY, data)
    caplog.set_level(logging.ERROR)
    with pytest.raises(SpoolFull):
        spool.write(KEY.replace("1-2-3-4", "9-9-9-9"), data)
    assert "SPOOL FULL" in caplog.text
    assert spool.files == 1  # nothing half-written, nothing dropped
    spool.remove(spool.pending()[0])
    spool.write(KEY.replace("1-2-3-4", "9-9-9-9"), data)  # accepted again after draining


def test_quarantine_entry(tmp_path):
    spool = Spool(tmp_path / "spool", max_bytes=10**9)
    e = spool.write(KEY, pq_bytes())
    dest = spool.quarantine(e, "manual")
    assert dest.exists() and spool.files == 0
    assert dest.with_name(dest.name + ".reason").read_text().strip() == "manual"


async def test_local_put_names_the_destination_when_it_cannot_be_made(
    tmp_path, monkeypatch
) -> None:
    """A destination folder that cannot be created (FileNotFoundError, e.g. under /proc)
    was reported as the *source* file missing."""
    from cryptoflow.errors import StorageRejected
    from cryptoflow.storage import local

    src = tmp_path / "spool" / "a.parquet"
    src.parent.mkdir()
    src.write_bytes(b"x")

    def no_dirs(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(local, "makedirs_durable", no_dirs)
    with pytest.raises(StorageRejected, match=r"cannot write .*deltas/k\.parquet"):
        await local.LocalStore(tmp_path / "out").put_file("deltas/k.parquet", src)
    assert src.exists()
    monkeypatch.undo()
    with pytest.raises(StorageRejected, match="source file missing"):
        await local.LocalStore(tmp_path / "out").put_file("deltas/k.parquet", tmp_path / "gone")
    (tmp_path / "afile").write_text("x")
    assert "Not a directory" in local.LocalStore(tmp_path / "afile" / "o").check_writable()
    assert local.LocalStore(tmp_path / "out2").check_writable() is None


@pytest.mark.parametrize("validate", [False, True])
def test_a_file_deleted_between_the_walk_and_its_stat_is_skipped(tmp_path, validate):
    """`spool status` runs while collect uploads and deletes spool files: one listed by
    the directory walk and gone before its stat made status fail with exit 1."""
    root = tmp_path / "spool"
    Spool(root, max_bytes=10**9).write(KEY, pq_bytes())
    gone = Spool(root, max_bytes=10**9).write(KEY.replace("1-2-3-4", "5-6-7-8"), pq_bytes())
    spool = Spool(root, max_bytes=10**9)
    walk = spool._walk

    def racing_walk():
        for path in walk():
            if path == gone.path:
                path.unlink()  # the collector's upload, just after the listing
            yield path

    spool._walk = racing_walk
    report = spool.scan() if validate else spool.load()
    assert report.files == 1 and [e.key for e in spool.pending()] == [KEY]


RAW_KEY = layout.raw_key("binance", "futures", "BTCUSDT", 10**18, 10**18, b"x")


def spool_with_a_file_of_each_kind(root: Path) -> list[Path]:
    """A spool holding one Parquet and one raw-capture file, both healthy."""
    spool = Spool(root, max_bytes=10**9)
    parquet_file = spool.write(KEY, pq_bytes())
    raw_file = spool.write(RAW_KEY, rawfile.encode([b'{"a":1}\n'] * 3))
    return [parquet_file.path, raw_file.path]


def failing_reads(monkeypatch, paths: list[Path], code: int) -> None:
    """Reading any of `paths` fails with OSError `code` (what `validate_file` meets)."""
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self in paths:
            raise OSError(code, os.strerror(code), str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN])
def test_a_read_error_of_the_machine_at_the_scan_quarantines_no_file(tmp_path, monkeypatch, code):
    """Found by review: the start-up scan took every OSError reading a spool file for a
    corrupt file, so a healthy file met while the process was out of file descriptors
    or memory for a moment was quarantined: never uploaded. Such an error says nothing
    of the file: the scan fails (the start with it) and moves nothing; the next scan
    indexes both files."""
    root = tmp_path / "spool"
    paths = spool_with_a_file_of_each_kind(root)
    failing_reads(monkeypatch, paths, code)
    with pytest.raises(OSError) as info:
        Spool(root, max_bytes=10**9).scan()
    assert info.value.errno == code and info.value.filename in {str(p) for p in paths}
    monkeypatch.undo()
    assert all(p.exists() for p in paths)
    again = Spool(root, max_bytes=10**9)
    report = again.scan()
    assert (report.files, report.quarantined, again.quarantined()) == (2, 0, 0)
    assert sorted(e.key for e in again.pending()) == sorted([KEY, RAW_KEY])


def test_a_disk_error_reading_a_spool_file_still_quarantines_it(tmp_path, monkeypatch, caplog):
    """EIO is the disk failing to read the file's own blocks: the file is taken for
    unreadable (quarantined, its reason kept), and the scan goes on with the others."""
    root = tmp_path / "spool"
    paths = spool_with_a_file_of_each_kind(root)
    failing_reads(monkeypatch, paths[:1], errno.EIO)
    spool = Spool(root, max_bytes=10**9)
    report = spool.scan()
    assert (report.files, report.quarantined) == (1, 1)
    assert [e.key for e in spool.pending()] == [RAW_KEY]
    reason = (root / "quarantine" / (KEY + ".reason")).read_text()
    assert "cannot read" in reason and "Input/output error" in reason
    assert f"QUARANTINED {KEY}" in caplog.text


def test_a_file_gone_before_the_scan_reads_it_is_skipped_not_quarantined(tmp_path, monkeypatch):
    """Like one gone before its stat (above): not a corrupt file, and a quarantine of a
    file that is no longer there failed the start."""
    root = tmp_path / "spool"
    paths = spool_with_a_file_of_each_kind(root)
    failing_reads(monkeypatch, paths[:1], errno.ENOENT)
    spool = Spool(root, max_bytes=10**9)
    report = spool.scan()
    assert (report.files, report.quarantined, spool.quarantined()) == (1, 0, 0)
    assert [e.key for e in spool.pending()] == [RAW_KEY]
