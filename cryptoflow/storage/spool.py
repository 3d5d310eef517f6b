"""The spool: a local journal of complete Parquet files waiting for upload.

Layout: `<spool>/<relative object key>` (the same hive tree as the destination), plus
`<spool>/quarantine/<relative key>` for files that must never be uploaded, each with a
`<file>.reason` text file beside it.

Write protocol (`Spool.write`): write to `.<name>.tmp-<random>` in the final directory,
fsync the file, `os.replace` onto the final name, fsync the directory (and any directory
created on the way). A reader therefore sees either no file or a complete one; a crash
leaves at most a temp file, which the startup scan deletes.

Startup scan (`Spool.scan`): delete leftover temp files; fully read every Parquet file;
move unreadable/truncated ones to `quarantine/` (logged at ERROR with the reason) so they
are never uploaded; rebuild the size accounting.

Size policy (`max_bytes`, documented contract):
- above `warn_ratio` (80 %) of `max_bytes`: one WARNING per crossing ("spool filling").
- a write that would take the spool past `max_bytes` is refused: an ERROR is logged and
  `SpoolFull` is raised. Nothing is deleted or dropped. The writer keeps those rows in
  memory (up to its buffer cap), retries the flush with back-off, and once its buffer
  cap is reached it stops reading its input channel, so back-pressure propagates
  upstream (REST polls are delayed; WS lanes record a consumer-overload gap and resync).
  As uploads drain the spool, writes are accepted again.

One process owns a spool directory at a time. All methods are blocking and thread-safe
(the pipeline calls them from `trio.to_thread.run_sync`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs

from cryptoflow.errors import CorruptSpoolFile, SpoolFull
from cryptoflow.storage import parquet, rawfile

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
TMP_MARK = ".tmp-"
DATA_SUFFIXES = (".parquet", rawfile.SUFFIX)
#: below this much free space on the spool's filesystem, collect refuses to start
MIN_FREE_BYTES = 64 * 1024**2


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES)


def validate_file(path: Path) -> int:
    """Fully read one spool file (Parquet or raw capture); rows/lines or CorruptSpoolFile."""
    if path.name.endswith(rawfile.SUFFIX):
        return rawfile.validate_file(path)
    return parquet.validate_file(path)


def check_spool_dir(
    path: Path, max_bytes: int, *, create: bool = True
) -> tuple[list[str], list[str]]:
    """(errors, warnings) about using `path` as the spool: creatable, writable (a probe
    file is written, fsynced and removed), and enough free space. Used at `collect`
    start (create=True) and by `cryptoflow validate-config` (create=False: a missing
    directory is checked through its nearest existing parent, nothing is created)."""
    errors: list[str] = []
    warnings: list[str] = []
    path = Path(path)
    where = f"storage.spool.path {str(path)!r}"
    if not create and not path.exists():
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return [f"{where}: cannot be created: {parent} is not a directory"], []
        if not os.access(parent, os.W_OK | os.X_OK):
            return [f"{where}: cannot be created: {parent} is not writable"], []
        path = parent
    try:
        makedirs_durable(path)
    except OSError as exc:
        return [f"{where}: cannot create the directory: {exc}"], []
    if not path.is_dir():
        return [f"{where}: exists but is not a directory"], []
    probe = path / f".probe{TMP_MARK}{secrets.token_hex(4)}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"cryptoflow spool probe\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        errors.append(f"{where}: not writable: {exc}")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    try:
        st = os.statvfs(path)
    except OSError as exc:
        errors.append(f"{where}: cannot read free space: {exc}")
        return errors, warnings
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        errors.append(
            f"{where}: only {free} bytes free on its filesystem; "
            f"at least {MIN_FREE_BYTES} needed (disk full?)"
        )
    elif free < max_bytes:
        warnings.append(
            f"{where}: {free} bytes free, less than "
            f"storage.spool.max_bytes {max_bytes}: during a long outage the disk fills "
            "before the spool limit (writes then fail and input is back-pressured)"
        )
    return errors, warnings


@attrs.frozen
class SpoolEntry:
    """One complete file waiting for upload."""

    key: str  # relative object key, '/'-separated
    path: Path
    size: int
    mtime_ns: int
    rows: int | None = None  # known when written by this process or validated at scan


@attrs.frozen
class ScanReport:
    files: int
    bytes: int
    temp_removed: int
    quarantined: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every directory created, so the entries survive."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """temp in the same dir -> write -> fsync -> rename -> fsync dir."""
    makedirs_durable(path.parent)
    tmp = path.parent / f".{path.name}{TMP_MARK}{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Spool:
    def __init__(self, root: Path, max_bytes: int, *, warn_ratio: float = 0.8) -> None:
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.warn_ratio = warn_ratio
        self._lock = threading.Lock()
        self._entries: dict[str, SpoolEntry] = {}
        self._bytes = 0
        self._warned = False
        self.warnings = 0  # "spool filling" warnings issued (counter)
        self.refusals = 0  # writes refused because of max_bytes (counter)
        makedirs_durable(self.root)

    # --- accounting ----------------------------------------------------------------

    @property
    def quarantine_root(self) -> Path:
        return self.root / QUARANTINE_DIR

    @property
    def files(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def by_dataset(self) -> dict[str, tuple[int, int]]:
        """dataset -> (files, bytes) waiting."""
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for e in self._entries.values():
                ds = e.key.split("/", 1)[0]
                f, b = out.get(ds, (0, 0))
                out[ds] = (f + 1, b + e.size)
        return out

    def quarantined(self) -> int:
        if not self.quarantine_root.exists():
            return 0
        return sum(
            1 for p in self.quarantine_root.rglob("*") if p.is_file() and is_data_file(p.name)
        )

    def _walk(self) -> Iterator[Path]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            d = Path(dirpath)
            if d == self.root and QUARANTINE_DIR in dirnames:
                dirnames.remove(QUARANTINE_DIR)
            for name in filenames:
                yield d / name

    def _key_of(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _add(self, entry: SpoolEntry) -> None:
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self._bytes -= old.size
        self._entries[entry.key] = entry
        self._bytes += entry.size

    # --- startup ---------------------------------------------------------------------

    def load(self) -> ScanReport:
        """Index what is on disk without reading file contents (status, fast start)."""
        return self._scan(validate=False)

    def scan(self) -> ScanReport:
        """Startup scan: delete temp files, quarantine unreadable Parquet, rebuild index."""
        return self._scan(validate=True)

    def _scan(self, *, validate: bool) -> ScanReport:
        found: list[SpoolEntry] = []
        temp_removed = quarantined = 0
        for path in self._walk():
            if TMP_MARK in path.name:
                if validate:
                    log.warning("spool: removing leftover temp file %s", path)
                    path.unlink(missing_ok=True)
                    temp_removed += 1
                continue
            if not is_data_file(path.name):
                continue
            st = path.stat()
            entry = SpoolEntry(self._key_of(path), path, st.st_size, st.st_mtime_ns)
            if validate:
                try:
                    rows = validate_file(path)
                except CorruptSpoolFile as exc:
                    self._quarantine_path(entry, str(exc))
                    quarantined += 1
                    continue
                entry = attrs.evolve(entry, rows=rows)
            found.append(entry)
        found.sort(key=lambda e: (e.mtime_ns, e.key))
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            for e in found:
                self._add(e)
            total = self._bytes
        if temp_removed:
            fsync_dir(self.root)
        report = ScanReport(len(found), total, temp_removed, quarantined)
        if validate:
            log.info(
                "spool %s: %d files (%d bytes) waiting, %d temp files removed, %d quarantined",
                self.root,
                report.files,
                report.bytes,
                temp_removed,
                quarantined,
            )
        return report

    # --- write / remove ------------------------------------------------------------

    def check_capacity(self, nbytes: int) -> None:
        """Raise SpoolFull (with an ERROR log) if `nbytes` more would pass `max_bytes`."""
        with self._lock:
            used = self._bytes
        if used + nbytes > self.max_bytes:
            with self._lock:
                self.refusals += 1
            log.error(
                "SPOOL FULL: %s holds %d bytes in %d files, limit %d; refusing %d new bytes "
                "(data kept in memory, input back-pressured; nothing dropped)",
                self.root,
                used,
                self.files,
                self.max_bytes,
                nbytes,
            )
            raise SpoolFull(
                f"spool {self.root} full: {used} + {nbytes} bytes > max_bytes {self.max_bytes}"
            )

    def write(self, key: str, data: bytes, *, rows: int | None = None) -> SpoolEntry:
        """Durably store one complete file under `key`. Raises SpoolFull past max_bytes."""
        with self._lock:
            existing = self._entries.get(key)
        self.check_capacity(len(data) - (existing.size if existing else 0))
        path = self.root / key
        write_atomic(path, data)
        st = path.stat()
        entry = SpoolEntry(key, path, st.st_size, st.st_mtime_ns, rows)
        with self._lock:
            self._add(entry)
            used = self._bytes
        if used > self.warn_ratio * self.max_bytes:
            if not self._warned:
                self._warned = True
                self.warnings += 1
                log.warning(
                    "spool filling: %s holds %d bytes (%.0f%% of max_bytes %d)",
                    self.root,
                    used,
                    100.0 * used / self.max_bytes,
                    self.max_bytes,
                )
        else:
            self._warned = False
        return entry

    def pending(self) -> list[SpoolEntry]:
        """Files waiting, oldest first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: (e.mtime_ns, e.key))

    def remove(self, entry: SpoolEntry) -> None:
        """Forget and delete a file after its verified upload (tolerates it being moved).

        If the same key was rewritten since `entry` was taken (a retried flush, same
        content by construction), the newer file is kept and stays pending."""
        with self._lock:
            cur = self._entries.get(entry.key)
            if cur is not None and cur.mtime_ns != entry.mtime_ns:
                return
            if cur is not None:
                del self._entries[entry.key]
                self._bytes -= cur.size
            entry.path.unlink(missing_ok=True)

    def _quarantine_path(self, entry: SpoolEntry, reason: str) -> Path:
        dest = self.quarantine_root / entry.key
        makedirs_durable(dest.parent)
        os.replace(entry.path, dest)
        dest.with_name(dest.name + ".reason").write_text(reason + "\n")
        fsync_dir(dest.parent)
        log.error("spool: QUARANTINED %s -> %s (not uploaded): %s", entry.key, dest, reason)
        return dest

    def quarantine(self, entry: SpoolEntry, reason: str) -> Path:
        """Move a bad file to `<spool>/quarantine/` so it is never uploaded."""
        dest = self._quarantine_path(entry, reason)
        with self._lock:
            cur = self._entries.pop(entry.key, None)
            if cur is not None:
                self._bytes -= cur.size
        return dest
