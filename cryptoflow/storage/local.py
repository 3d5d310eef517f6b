"""Local output tree: "upload" = durable atomic move of a spool file into place."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path

import trio

from cryptoflow.errors import StorageRejected, StorageUnavailable, UploadVerificationFailed
from cryptoflow.storage import layout
from cryptoflow.storage.spool import TMP_MARK, fsync_dir, makedirs_durable, nearest_existing


def dir_write_problem(path: Path) -> str | None:
    """Why files could not be written under the folder `path`, seen without creating or
    writing anything (`validate-config`; `book --output` before its rebuild): it, or
    its nearest existing parent when it is missing, is not a directory or not writable.
    The words are the `strerror` the write would meet. None: it looks writable."""
    nearest = nearest_existing(Path(path))
    if not nearest.is_dir():
        return os.strerror(errno.ENOTDIR)
    if not os.access(nearest, os.W_OK | os.X_OK):
        return os.strerror(errno.EACCES)
    return None


def _move_verified(src: Path, dest: Path) -> None:
    size = src.stat().st_size
    makedirs_durable(dest.parent)
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # Different filesystem: copy to a temp name beside dest, fsync, rename, then drop src.
        tmp = dest.parent / f".{dest.name}{TMP_MARK}{secrets.token_hex(4)}"
        try:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1024 * 1024)
                fout.flush()
                os.fsync(fout.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
        src.unlink()
        fsync_dir(src.parent)
    else:
        fsync_dir(dest.parent)
        if src.parent != dest.parent:
            fsync_dir(src.parent)
    got = dest.stat().st_size
    if got != size:
        raise UploadVerificationFailed(f"{dest}: size {got} != {size}")


class LocalStore:
    def __init__(self, root: Path, limiter: trio.CapacityLimiter | None = None) -> None:
        self.root = Path(root)
        self._limiter = limiter or trio.CapacityLimiter(4)

    def describe(self) -> str:
        return f"local:{self.root.resolve()}"

    def check_writable(self, *, create: bool = True) -> str | None:
        """Why files cannot be put under the root (None: they can): it is created if
        missing, and a probe file is written and removed. `create=False`
        (validate-config): a missing root is judged by its nearest existing parent and
        nothing is created."""
        if not create:
            try:
                problem = None if self.root.is_dir() else dir_write_problem(self.root)
            except OSError as exc:  # a name too long, a loop of links: what a write meets
                problem = exc.strerror or str(exc)
            return None if problem is None else f"cannot write there: {problem}"
        try:
            makedirs_durable(self.root)
            probe = self.root / f".probe{TMP_MARK}{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return f"cannot write there: {exc.strerror or exc}"
        return None

    async def put_file(self, key: str, path: Path) -> None:
        layout.check_relative_key(key)  # nothing lands outside the output tree
        dest = self.root / key
        try:
            await trio.to_thread.run_sync(_move_verified, Path(path), dest, limiter=self._limiter)
        except UploadVerificationFailed:
            raise
        except FileNotFoundError as exc:
            if Path(path).exists():  # the destination's folder could not be made
                raise StorageRejected(f"cannot write {dest}: {exc}") from exc
            if dest.exists():
                return  # already moved by an earlier attempt that died before bookkeeping
            raise StorageRejected(f"{path}: source file missing") from None
        except PermissionError as exc:
            raise StorageRejected(f"cannot write {dest}: {exc}") from exc
        except OSError as exc:  # disk full, I/O error: may clear up
            raise StorageUnavailable(f"cannot write {dest}: {exc}") from exc
