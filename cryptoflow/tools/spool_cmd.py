"""`cryptoflow spool status` and `cryptoflow spool flush`."""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from cryptoflow.errors import ConfigError
from cryptoflow.pipeline.supervise import exit_after, unless_stopped

T = TypeVar("T")


#: after Ctrl-C, the process ends within this many seconds even if an upload thread is
#: blocked (an S3 endpoint that does not answer): nothing is lost, a spool file is only
#: deleted after its verified upload, and an upload repeated later overwrites itself
INTERRUPT_GRACE_S = 3.0


async def _until_signal(fn: Callable[[], Awaitable[T]]) -> T | None:
    """`fn()`, or None once SIGINT/SIGTERM arrives (then it is cancelled)."""
    stopping = trio.Event()

    async def watch() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping the flush", file=sys.stderr)
                stopping.set()
                exit_after(INTERRUPT_GRACE_S)
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await unless_stopped(stopping, fn)
        nursery.cancel_scope.cancel()
    return result


def _load(config_path: Path):
    from cryptoflow.config import load_settings

    return load_settings(Path(config_path))


def status(config_path: Path) -> int:
    """Print files/bytes waiting per dataset and the quarantined count. Exit 0; 1 when
    there is no spool at the configured path (nothing is created); 2 when the path can
    never be a spool (a file), as `collect` would refuse it."""
    from cryptoflow.storage.factory import build_spool

    settings = _load(config_path)
    storage = settings.app.storage
    if not _spool_there(storage, config_path):
        return 1
    spool = build_spool(storage, create=False)
    spool.load()
    print(f"spool {spool.root.resolve()} (limit {spool.max_bytes} bytes)")
    by_ds = spool.by_dataset()
    for ds in sorted(by_ds):
        files, nbytes = by_ds[ds]
        print(f"  {ds:<10} {files:>8} files {nbytes:>14} bytes")
    print(f"  {'total':<10} {spool.files:>8} files {spool.bytes:>14} bytes")
    print(f"  quarantined: {spool.quarantined()} files (in {spool.quarantine_root})")
    return 0


def _spool_there(storage, config_path: Path) -> bool:
    """Whether a spool exists at `storage.spool.path` (status and flush read it). A path
    that can never be one raises (`_check_spool_path`, exit 2); nothing there is said on
    stderr ("no spool at": `_no_spool`) and gives False (exit 1), creating nothing."""
    _check_spool_path(storage, config_path)
    if Path(storage.spool.path).exists():
        return True
    print(f"error: {_no_spool(storage.spool.path, config_path)}", file=sys.stderr)
    return False


def _check_spool_path(storage, config_path: Path) -> None:
    """A spool path that is a file (or lies under one) is refused in the words and with
    the exit code (2) `collect` has for it, without creating or writing anything: status
    only reads, and must work on a full or read-only disk."""
    from cryptoflow.config import key_location
    from cryptoflow.storage.spool import spool_dir_problem

    path = Path(storage.spool.path)
    problem = spool_dir_problem(path)
    if problem:
        where = key_location(config_path, "storage.spool.path")
        raise ConfigError([f"{where}: {str(path)!r}: {problem}"])


def _no_spool(configured: str, config_path: Path) -> str:
    """Operators take an empty `spool status` as the go-ahead to move a shard: reporting
    a mistyped path (or a relative one from the wrong working directory) as an empty
    spool gave that go-ahead for a spool never looked at."""
    from cryptoflow.config import key_location

    where = key_location(config_path, "storage.spool.path")
    root = Path(configured)
    relative = "" if root.is_absolute() else f" ({configured!r} is from the working directory)"
    return (
        f"{where}: no spool at {root.resolve()}{relative}: nothing was ever spooled there, or "
        "the path or the working directory is wrong; nothing created"
    )


def flush(config_path: Path, output: Path | None = None) -> int:
    """Scan the spool (quarantining corrupt files), upload/move everything; 0 if empty after."""
    from cryptoflow.storage.factory import (
        build_spool,
        build_store,
        check_output_writable,
        check_spool_apart,
    )

    settings = _load(config_path)
    storage = settings.app.storage
    if not _spool_there(storage, config_path):
        return 1
    # before the scan moves anything: one line (exit 2), not one failed upload per file
    check_spool_apart(storage, settings.env, output, config_path)
    check_output_writable(storage, settings.env, output, config_path, create=False)
    spool = build_spool(storage)
    report = spool.scan()
    if report.files == 0:
        print(f"spool {spool.root}: nothing to flush ({report.quarantined} quarantined)")
        return 0
    # files to upload: now the output is made and probed, as `collect` does (a look
    # without creating misses e.g. a dangling link), before any journal is split
    check_output_writable(storage, settings.env, output, config_path)

    async def main():
        store = build_store(storage, settings.env, output)
        return await _until_signal(lambda: _drain(spool, store, storage, report.files))

    result = trio.run(main)
    if result is None:
        print(f"interrupted: the files not uploaded yet stay in the spool {spool.root}")
        return 130
    print(
        f"uploaded {result.uploaded} files ({result.bytes} bytes), {result.failed} failed, "
        f"{result.remaining} left in the spool"
    )
    return 0 if result.remaining == 0 else 1


async def _drain(spool, store, storage, spool_files: int):
    """Split (and merge) first, then say how many files go up: the journals of a run
    split into a file per symbol-hour, so "flushing 7 files" was followed by "67 failed,
    67 left"."""
    from cryptoflow.pipeline.writer import prepare_drain, upload_drained

    merge = storage.upload_interval > 0  # batching on: one object per partition
    drained = await prepare_drain(spool, merge=merge)
    entries = drained.entries
    nbytes = sum(e.size for e in entries)
    how = []
    if drained.split:
        how.append(f"{drained.split} journals split per symbol-hour")
    if drained.quarantined:
        how.append(f"{drained.quarantined} journals quarantined (cannot be split)")
    if drained.merged:
        how.append(f"the files of {drained.merged} symbol-hours merged into one each")
    origin = ""
    if len(entries) != spool_files and how:
        origin = f" (the spool's {spool_files} files: {'; '.join(how)})"
    print(f"flushing {len(entries)} files ({nbytes} bytes) to {store.describe()}{origin}")
    concurrency = max(1, storage.s3.max_concurrency)
    return await upload_drained(spool, store, entries, concurrency=concurrency)
