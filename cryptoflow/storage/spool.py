"""The spool: a local journal of complete Parquet files waiting for upload.

Layout: `<spool>/<relative object key>` (the same hive tree as the destination), plus
`<spool>/quarantine/<relative key>` for files that must never be uploaded, each with a
`<file>.reason` text file beside it, and `<spool>/quarantine/unplaced/<dataset>/
exchange=../market=../symbol=../<SYMBOL>-<hash8>.parquet` for rows set aside
(`Spool.set_aside`): rows the layout cannot place (an event time outside the years
0001-9999, `layout.MIN_MS`..`MAX_MS`), or a writer buffer whose flush failed for a
reason a retry cannot fix (then `.jsonl.zst` if no frame can hold its rows). They are
kept, never uploaded, and never stop the rows of any other symbol.

Write protocol (`Spool.write`): write to `.<name>.tmp-<random>` in the final directory,
fsync the file, `os.replace` onto the final name, fsync the directory (and any directory
created on the way). A reader therefore sees either no file or a complete one; a crash
leaves at most a temp file, which the startup scan deletes.

Startup scan (`Spool.scan`): delete leftover temp files; fully read every Parquet file;
move unreadable/truncated ones to `quarantine/` (logged at ERROR with the reason) so they
are never uploaded; complete interrupted merges (below); rebuild the size accounting.

Merge (`Spool.merge`, upload batching): several files of one partition (dataset,
exchange, market, symbol, hour) become ONE file under its content-derived key, written
with the write protocol above and carrying the list of its source keys in its Parquet
metadata (`parquet.MERGED_FROM`); only then are the sources deleted. The merged file is
therefore the durable record of the merge: a crash before its rename leaves only the
sources (nothing was merged or uploaded), a crash after it leaves the merged file and
perhaps some sources, which the next scan deletes (their rows are in the merged file).
A merged file is uploaded as is (same key on every retry) and never merged again.

Journals (`Spool.write_journal`, `Spool.split`): the writer's one-second flushes of
deltas and gaps go to ONE file per dataset per flush round, `journal/<dataset>/...`,
holding the rows of every symbol (one Parquet encode + fsync a round instead of one per
symbol: ~125 files a second at the full symbol table, each ~1 ms of encode and ~0.5 ms
of fsync). Journals are never uploaded. `split` turns a group of journals into one
file per partition (the same merged files as above, each listing the whole group in
its metadata) and deletes the journals only after every one of those is durable. The
split is deterministic (journals in key order, rows kept in order, content-derived
names), so a crash in the middle is completed by the next scan: a journal named by any
merged file is split again with exactly that group, which rewrites identical files
under identical keys, and then deleted.

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
import errno
import json
import logging
import os
import secrets
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import polars as pl

from cryptoflow.errors import TRANSIENT_ERRORS, CorruptSpoolFile, SpoolFull, UnsafePartition
from cryptoflow.models import Dataset
from cryptoflow.storage import layout, parquet, rawfile

log = logging.getLogger(__name__)

QUARANTINE_DIR = "quarantine"
#: under QUARANTINE_DIR: rows set aside at a flush or split (`Spool.set_aside`)
UNPLACED_DIR = "unplaced"
JOURNAL_DIR = "journal"
TMP_MARK = ".tmp-"
DATA_SUFFIXES = (".parquet", rawfile.SUFFIX)
#: below this much free space on the spool's filesystem, collect refuses to start
MIN_FREE_BYTES = 64 * 1024**2


#: how many merged-away source keys a Spool remembers (a retried flush rewrites within
#: the writer's retry back-off, <= 60 s; this covers minutes of 125 symbols' files, ~10 MB)
MERGED_AWAY_MAX = 50_000
#: keys of merged-away sources a run could not delete (the next scan deletes them)
DOOMED_FILE = ".doomed"
#: merged rows are sorted by these columns (those present), stably
SORT_COLUMNS = ("timestamp", "first_update_id", "last_update_id")
#: a read failing with one of these says nothing of the file: the process or the
#: machine is short of something for a moment (file descriptors, memory, kernel
#: buffers) or the call was interrupted. Any other (EIO: the disk cannot read the
#: file's blocks; EACCES) is the file's, which is then quarantined like a corrupt one.
MACHINE_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR}
)


def merged_sources(path: Path) -> list[str] | None:
    """The source keys a merged Parquet spool file replaces, or None for a plain file."""
    if not path.name.endswith(".parquet"):
        return None
    raw = parquet.read_metadata(path).get(parquet.MERGED_FROM)
    if raw is None:
        return None
    try:
        keys = json.loads(raw)
    except ValueError:
        return None
    return [str(k) for k in keys] if isinstance(keys, list) else None


def is_journal(key: str) -> bool:
    """A journal spool file (rows of many partitions; split, never uploaded)."""
    return key.startswith(JOURNAL_DIR + "/")


def journal_key(dataset: Dataset | str, frame: pl.DataFrame, data: bytes) -> str:
    """`journal/<dataset>/<first ts ms>-<last ts ms>-<hash>.parquet`: ordered by time
    (a group is split in key order), unique by content."""
    ds = Dataset(dataset).value
    ms = frame.get_column("timestamp").cast(pl.Int64, strict=False)
    first, last = ms.min() or 0, ms.max() or 0
    return f"{JOURNAL_DIR}/{ds}/{first:013d}-{last:013d}-{layout.content_hash(data)}.parquet"


def dataset_of(key: str) -> str:
    """The dataset a spool key holds rows of (a journal's is its second component)."""
    head, _, rest = key.partition("/")
    return rest.split("/", 1)[0] if head == JOURNAL_DIR else head


PARTITION_COLUMNS = ("exchange", "market", "symbol")


def _partition_runs(frame: pl.DataFrame) -> list[tuple[tuple[str, str, str], pl.DataFrame]]:
    """(partition, rows without the partition columns) in order of first appearance:
    zero-copy slices when each partition is one contiguous run (as the writer makes
    journals), else gathered."""
    cols = list(PARTITION_COLUMNS)
    ids = frame.select(pl.struct(cols).rle_id().alias("run")).get_column("run")
    groups = frame.group_by(cols, maintain_order=True).agg(pl.len().alias("n"))
    if frame.height and ids[-1] + 1 != groups.height:  # a partition in several runs
        return [
            (tuple(part.get_column(c)[0] for c in cols), part.drop(cols))  # type: ignore[misc]
            for part in frame.partition_by(cols, maintain_order=True)
        ]
    rows = frame.drop(cols)  # once, not per slice
    out, start = [], 0
    for exchange, market, symbol, n in groups.iter_rows():
        out.append(((exchange, market, symbol), rows.slice(start, n)))
        start += n
    return out


def concat_frames(frames: list[pl.DataFrame], *, rechunk: bool = True) -> pl.DataFrame:
    """Rows of several files or buffers of one dataset; a column that older files lack
    (or type differently) falls back to a relaxed diagonal concat."""
    try:
        return pl.concat(frames, how="vertical", rechunk=rechunk)
    except Exception:
        return pl.concat(frames, how="diagonal_relaxed")


def is_data_file(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES)


def validate_file(path: Path) -> int:
    """Fully read one spool file (Parquet or raw capture); rows/lines or CorruptSpoolFile.

    A read error of the machine (`MACHINE_ERRNOS`) or of a file gone since it was listed
    (FileNotFoundError) is raised as it is, like a MemoryError: the start-up scan took
    every OSError for a corrupt file and quarantined healthy files (never uploaded) when
    the process was out of file descriptors or memory for a moment."""
    with _read_errors_sorted(path):
        if path.name.endswith(rawfile.SUFFIX):
            return rawfile.validate_file(path)
        return parquet.validate_file(path)


def read_journal(path: Path) -> bytes:
    """A journal's bytes for its split. A read error of the machine (`MACHINE_ERRNOS`, a
    file gone) is raised as it is, and the split is retried; any other (EIO: the disk
    cannot read its blocks) is the journal's, as at the start-up scan (`validate_file`):
    CorruptSpoolFile, so the split quarantines that journal alone. Taken for the
    machine's, one unreadable journal failed every later split (a group is always the
    oldest journals): no delta or gap row of any symbol was uploaded until a restart."""
    with _read_errors_sorted(path):
        return path.read_bytes()


@contextlib.contextmanager
def _read_errors_sorted(path: Path) -> Iterator[None]:
    """A file gone or a read error of the machine (`MACHINE_ERRNOS`) goes up as it is;
    any other OSError reading `path` is the file's own: CorruptSpoolFile."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in MACHINE_ERRNOS:
            raise
        raise CorruptSpoolFile(f"{path}: cannot read: {exc}") from exc


def nearest_existing(path: Path) -> Path:
    """`path` itself, or its nearest parent that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def spool_dir_problem(path: Path) -> str | None:
    """Why `path` can never be a spool directory, seen without creating or writing
    anything: it exists and is not a directory, or its nearest existing parent is not
    one. None when it is a directory or could be made. The same words `check_spool_dir`
    uses, for commands that only read the spool (`spool status`)."""
    path = Path(path)
    if path.exists():
        return None if path.is_dir() else "exists but is not a directory"
    parent = nearest_existing(path)
    return None if parent.is_dir() else f"cannot be created: {parent} is not a directory"


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
        problem = spool_dir_problem(path)
        if problem:
            return [f"{where}: {problem}"], []
        parent = nearest_existing(path)
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
        return errors, warnings  # its free space says nothing then
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
    merged: bool = False  # a merged file (upload as is, never a merge source)


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
    """temp in the same dir -> write -> fsync -> rename -> fsync dir.

    If it raises, no new file is left at `path`: a failed directory fsync takes the
    renamed file back. The caller keeps the rows and retries them, possibly in a file
    of another name (a journal of a later round), so a file left in place would be
    found by the next start's scan and uploaded beside the retry: rows twice."""
    makedirs_durable(path.parent)
    tmp = path.parent / f".{path.name}{TMP_MARK}{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        existed = os.path.lexists(path)  # same name = same content (content-derived)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fsync_dir(path.parent)
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):  # a failing disk may refuse this too
                path.unlink()
        raise


class Spool:
    def __init__(
        self, root: Path, max_bytes: int, *, warn_ratio: float = 0.8, create: bool = True
    ) -> None:
        """`create=False`: a reader of an existing spool (`spool status`), which must not
        make a directory at a mistyped path and then report it empty."""
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.warn_ratio = warn_ratio
        self._lock = threading.Lock()
        self._entries: dict[str, SpoolEntry] = {}
        self._bytes = 0
        self._warned = False
        self.warnings = 0  # "spool filling" warnings issued (counter)
        self.refusals = 0  # writes refused because of max_bytes (counter)
        #: keys recently merged away: a retried flush that rewrites one (same key = same
        #: rows, names are content hashes) must not bring those rows back a second time
        self._merged_away: dict[str, None] = {}
        #: files written by a split still running: not pending until `release`d, so no
        #: uploader takes one before the splitting one does (or a failed split drops it)
        self._held: set[str] = set()
        #: rows set aside in quarantine by this process, per dataset (`set_aside_counts`)
        self._set_aside_rows: Counter[str] = Counter()
        if create:
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
                ds = dataset_of(e.key)
                f, b = out.get(ds, (0, 0))
                out[ds] = (f + 1, b + e.size)
        return out

    def set_aside_counts(self) -> Counter[str]:
        """Rows this process set aside (`set_aside`), per dataset."""
        with self._lock:
            return Counter(self._set_aside_rows)

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
        self._pop_entry(entry.key)
        self._entries[entry.key] = entry
        self._bytes += entry.size

    def _pop_entry(self, key: str) -> SpoolEntry | None:
        """Forget `key` in the index and its bytes (the caller holds `_lock`)."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        return old

    # --- startup ---------------------------------------------------------------------

    def load(self) -> ScanReport:
        """Index what is on disk without reading file contents (status, fast start)."""
        return self._scan(validate=False)

    def scan(self) -> ScanReport:
        """Startup scan: delete temp files, quarantine unreadable Parquet, rebuild index."""
        return self._scan(validate=True)

    def _scan(self, *, validate: bool) -> ScanReport:
        found: list[SpoolEntry] = []
        temp_removed = quarantined = merges_completed = 0
        replaced: set[str] = set()
        split_groups: set[tuple[str, ...]] = set()  # journal groups of split outputs
        # keys listed as already stored: deleted now (scan) or left out (load)
        buried, doomed = self._bury_doomed() if validate else (0, set(self._doomed()))
        for path in self._walk():
            if TMP_MARK in path.name:
                if validate:
                    temp_removed += self._remove_temp(path)
                continue
            if not is_data_file(path.name):
                continue
            key = self._key_of(path)
            if key in doomed:
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                # gone since the walk listed it: a running collector uploaded it (`spool
                # status` is safe while collect runs) or a merge replaced it
                continue
            entry = SpoolEntry(key, path, st.st_size, st.st_mtime_ns)
            if validate:
                try:
                    rows = validate_file(path)
                except FileNotFoundError:
                    continue  # gone since the walk listed it, as above
                except CorruptSpoolFile as exc:
                    self._quarantine_path(entry, str(exc))
                    quarantined += 1
                    continue
                sources = merged_sources(path)
                entry = attrs.evolve(entry, rows=rows, merged=sources is not None)
                replaced.update(sources or ())
                if sources and all(is_journal(k) for k in sources):
                    split_groups.add(tuple(sources))
            found.append(entry)
        present = {e.key for e in found}
        groups = {g for g in split_groups if any(k in present for k in g)}
        if replaced:
            # interrupted merges: the merged file is complete (atomic rename), so its
            # sources still here are duplicates of its rows; finish the merge now (a
            # source that cannot be deleted is doomed: never indexed, never uploaded).
            # Journals are different: a merged file holds only ONE partition of their
            # rows, so an interrupted split is redone below, not assumed done.
            done = {
                e.key for e in found if e.key in replaced and not e.merged and not is_journal(e.key)
            }
            for k in sorted(done):
                log.warning("spool: completing an interrupted merge: removing %s", k)
            self._forget_sources(sorted(done))
            merges_completed += len(done)
            found = [e for e in found if e.key not in done]
        found.sort(key=lambda e: (e.mtime_ns, e.key))
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            for e in found:
                self._add(e)
            total = self._bytes
        for group in sorted(groups):
            merges_completed += self._complete_split(group)
        if temp_removed or merges_completed or buried:
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

    def _remove_temp(self, path: Path) -> int:
        """Startup: delete a temp file a crash left (1), or leave one that cannot be
        deleted with a WARNING (0): a temp file is never indexed nor uploaded, so it is
        no reason to fail the start (the next one tries again)."""
        log.warning("spool: removing leftover temp file %s", path)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("spool: cannot remove leftover temp file %s (left there): %s", path, exc)
            return 0
        return 1

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
                "(data kept in memory, input paused at the writer's memory cap; nothing "
                "dropped)",
                self.root,
                used,
                self.files,
                self.max_bytes,
                nbytes,
            )
            raise SpoolFull(
                f"spool {self.root} full: {used} + {nbytes} bytes > max_bytes {self.max_bytes}",
                nbytes,
            )

    def write(
        self,
        key: str,
        data: bytes,
        *,
        rows: int | None = None,
        enforce_limit: bool = True,
        merged: bool = False,
        hold: bool = False,
    ) -> SpoolEntry:
        """Durably store one complete file under `key`. Raises SpoolFull past max_bytes
        (unless `enforce_limit` is False: a merge, which frees its sources right after).
        `hold`: not listed by `pending` until `release` (see `split`). A key that is not
        a plain relative path is refused (UnsafePartition): nothing lands outside `root`."""
        layout.check_relative_key(key)
        with self._lock:
            existing = self._entries.get(key)
            if key in self._merged_away:
                log.info("spool: %s is already in a merged file; not written again", key)
                return SpoolEntry(key, self.root / key, len(data), 0, rows)
        if enforce_limit:
            self.check_capacity(len(data) - (existing.size if existing else 0))
        path = self.root / key
        write_atomic(path, data)
        st = path.stat()
        entry = SpoolEntry(key, path, st.st_size, st.st_mtime_ns, rows, merged)
        with self._lock:
            if hold:
                self._held.add(key)
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
        """Files waiting, oldest first (held files of a running split excluded)."""
        with self._lock:
            waiting = [e for e in self._entries.values() if e.key not in self._held]
        return sorted(waiting, key=lambda e: (e.mtime_ns, e.key))

    def release(self, keys: Iterable[str]) -> None:
        """Make held files pending (the caller has claimed them)."""
        with self._lock:
            self._held.difference_update(keys)

    def remove(self, entry: SpoolEntry) -> None:
        """Forget and delete a file after its verified upload (tolerates it being moved).

        If the same key was rewritten since `entry` was taken (a retried flush, same
        content by construction), the newer file is kept and stays pending.

        Never fails for the disk: its rows are stored, so a file that cannot be deleted
        (EIO, a read-only remount) is listed in `DOOMED_FILE` with an ERROR and deleted
        by the next scan. Raising here once ended the writer (and the collector) after
        every verified upload of that file, at every start."""
        with self._lock:
            self._held.discard(entry.key)
            cur = self._entries.get(entry.key)
            if cur is not None and cur.mtime_ns != entry.mtime_ns:
                return
            self._pop_entry(entry.key)
            try:
                entry.path.unlink(missing_ok=True)
                return
            except OSError as exc:
                error = exc
        log.error(
            "spool: cannot delete %s after it was stored (the next start will): %s",
            entry.key,
            error,
        )
        self._doom([entry.key])

    def _discard(self, entry: SpoolEntry) -> None:
        """Forget and try to delete an output of a failed split: never uploaded, its rows
        still in the journals. Unlike `remove` it is never listed in `DOOMED_FILE`: the
        same group split again gives the same key, and the next start would then delete
        that good file before its upload (a file left here is found by the scan as the
        output of an interrupted split, and redone)."""
        with self._lock:
            self._held.discard(entry.key)
            self._pop_entry(entry.key)
        with contextlib.suppress(OSError):
            entry.path.unlink(missing_ok=True)

    def merge(self, entries: list[SpoolEntry]) -> SpoolEntry:
        """Replace several Parquet files of ONE partition by one merged file (see the
        module doc): rows concatenated and sorted by timestamp then update ids, zstd,
        content-derived key, source keys in the metadata; sources deleted after the
        merged file is durable. Blocking; the caller keeps the entries from uploaders."""
        if len(entries) < 2:
            raise ValueError("merge needs at least two files")
        parts = [layout.parse_key(e.key) for e in entries]
        part0 = parts[0]
        for kp in parts[1:]:
            if (kp.dataset, kp.exchange, kp.market, kp.symbol, kp.hour) != (
                part0.dataset,
                part0.exchange,
                part0.market,
                part0.symbol,
                part0.hour,
            ):
                raise ValueError("merge sources span more than one partition")
        if part0.dataset == Dataset.RAW.value:
            raise ValueError("raw-capture files are not merged")
        ordered = sorted(entries, key=lambda e: e.key)
        frame = concat_frames([parquet.decode(e.path.read_bytes()) for e in ordered])
        by = [c for c in SORT_COLUMNS if c in frame.columns]
        if by:
            frame = frame.sort(by, maintain_order=True, nulls_last=True)
        sources = json.dumps([e.key for e in ordered])
        data = parquet.encode(frame, metadata={parquet.MERGED_FROM: sources})
        key = layout.object_key(
            part0.dataset,
            part0.exchange,
            part0.market,
            part0.symbol,
            part0.hour,
            frame,
            digest=layout.content_hash(data),
        )
        merged = self.write(key, data, rows=frame.height, enforce_limit=False, merged=True)
        # from here on the merge must not fail (the caller would then upload the sources
        # too): a source that cannot be deleted now is deleted by the next scan
        self._forget_sources([e.key for e in ordered])
        return merged

    def write_journal(self, dataset: Dataset | str, frame: pl.DataFrame) -> SpoolEntry:
        """Durably store one flush round's rows of many partitions (see the module doc).
        Raises SpoolFull like `write`."""
        data = parquet.encode(frame)
        return self.write(journal_key(dataset, frame, data), data, rows=frame.height)

    def split(self, entries: list[SpoolEntry], *, hold: bool = False) -> list[SpoolEntry]:
        """Replace a group of journals of ONE dataset by one merged file per partition
        (dataset, exchange, market, symbol, hour); the journals are deleted after all of
        them are durable. Blocking; the caller keeps the entries from uploaders, and with
        `hold` the outputs too, until it `release`s them.

        A split that fails deletes the outputs it wrote (never uploaded: held), so the
        journals, which stay, are split later with whatever group they are in then. A
        failure that is not the machine's (`errors.TRANSIENT_ERRORS`: not an OSError, not
        a MemoryError; a journal the disk cannot read, EIO, is the journal's:
        `read_journal`) would come back on every try, and a group is always the oldest
        journals: the journals that cannot be split on their own are quarantined (ERROR)
        and the others split without them (`_split_around`), so one journal never blocks
        every later one. Rows the layout cannot place are
        set aside (`set_aside_unplaceable`), never a reason to fail."""
        keys = sorted(e.key for e in entries)
        if not keys or not all(is_journal(k) for k in keys):
            raise ValueError("split takes journal files only")
        if len({dataset_of(k) for k in keys}) != 1:
            raise ValueError("split sources span more than one dataset")
        try:
            return self._split_group(keys, hold=hold)
        except TRANSIENT_ERRORS:
            raise  # the disk, the memory: the same group may work later
        except Exception as exc:
            return self._split_around(keys, exc, hold=hold)

    def _split_group(self, keys: list[str], *, hold: bool) -> list[SpoolEntry]:
        outputs: list[SpoolEntry] = []
        try:
            self._split_files(keys, outputs, hold=True)
        except BaseException:
            for e in outputs:
                self._discard(e)
            raise
        if not hold:
            self.release(e.key for e in outputs)
        self._forget_sources(keys)
        return outputs

    def _split_around(self, keys: list[str], exc: Exception, *, hold: bool) -> list[SpoolEntry]:
        """The split of `keys` failed with `exc`, not for the disk: find the journals that
        fail on their own (a dry run each: nothing written), quarantine them like a
        corrupt file, and split the others. If none fails alone, only the oldest is split
        (alone), so the spool still moves on."""
        bad: dict[str, Exception] = {}
        for k in keys:
            try:
                self._split_files([k], [], hold=True, dry_run=True)
            except TRANSIENT_ERRORS:
                raise  # says nothing of the journal: quarantined, a good one was lost
            except Exception as why:
                bad[k] = why
        if not bad:
            log.error(
                "spool: %d journals cannot be split together (%s); splitting %s alone",
                len(keys),
                exc,
                keys[0],
            )
            return self._split_group(keys[:1], hold=hold)
        for k, why in bad.items():
            with self._lock:
                entry = self._entries.get(k) or SpoolEntry(k, self.root / k, 0, 0)
            self.quarantine(entry, f"journal cannot be split: {type(why).__name__}: {why}")
        rest = [k for k in keys if k not in bad]
        return self._split_group(rest, hold=hold) if rest else []

    def _split_files(
        self, keys: list[str], outputs: list[SpoolEntry], *, hold: bool, dry_run: bool = False
    ) -> None:
        """Write the group's per-partition files, appending each to `outputs` once it
        is durable (on an error `outputs` is what to undo). Rows the layout cannot place
        are set aside once the outputs are durable. `dry_run`: everything but the writes
        (does this group split?)."""
        dataset = dataset_of(keys[0])
        sources = json.dumps(keys)
        unplaceable: list[pl.DataFrame] = []
        # Zero-copy slices: the writer puts each partition's rows of a round together, so
        # a journal is one run per partition. Gathering rows instead (partition_by or a
        # sort over the whole group) held ~3-5x the group's size at the peak (a minute of
        # the full table is ~0.5 M rows: +240 MB).
        # The pieces leave out the partition columns (constant per partition: put back
        # as literals below), so the decoded journals' string columns are freed at once:
        # ~40 % of what a group holds decoded, the collector's memory peak each minute.
        pieces: dict[tuple[str, str, str], list[pl.DataFrame]] = {}
        order: dict[tuple[str, str, str], list[str]] = {}
        for k in keys:
            frame = parquet.decode(read_journal(self.root / k))
            for name, piece in _partition_runs(frame):
                order.setdefault(name, frame.columns)
                pieces.setdefault(name, []).append(piece)
            del frame
        for (exchange, market, symbol), frames in list(pieces.items()):
            del pieces[(exchange, market, symbol)]  # in order of first appearance
            names = order.pop((exchange, market, symbol))
            part = concat_frames(frames).with_columns(
                pl.lit(exchange, pl.String).alias("exchange"),
                pl.lit(market, pl.String).alias("market"),
                pl.lit(symbol, pl.String).alias("symbol"),
            )
            part = part.select(
                [
                    *(c for c in names if c in part.columns),
                    *(c for c in part.columns if c not in names),
                ]
            )
            by = [c for c in SORT_COLUMNS if c in part.columns]
            if by:
                part = part.sort(by, maintain_order=True, nulls_last=True)
            part, bad = layout.split_placeable(part)
            if bad.height:
                unplaceable.append(bad)
            for hour, rows in layout.split_by_hour(part):
                data = parquet.encode(rows, metadata={parquet.MERGED_FROM: sources})
                key = layout.object_key(
                    dataset, exchange, market, symbol, hour, rows, digest=layout.content_hash(data)
                )
                if dry_run:
                    continue
                outputs.append(
                    self.write(
                        key, data, rows=rows.height, enforce_limit=False, merged=True, hold=hold
                    )
                )
        if unplaceable and not dry_run:
            # after the outputs: a split that fails before this leaves nothing behind
            self.set_aside_unplaceable(dataset, concat_frames(unplaceable))

    def _forget_sources(self, keys: list[str]) -> None:
        """Delete merged-away sources (their rows are durable elsewhere); must not fail:
        a source that cannot be deleted now is listed in `DOOMED_FILE` and deleted by the
        next scan (its outputs may be uploaded and gone by then, so nothing else would
        tell the scan that its rows are stored: it would be uploaded again)."""
        with self._lock:
            for k in keys:
                self._merged_away[k] = None
            while len(self._merged_away) > MERGED_AWAY_MAX:
                del self._merged_away[next(iter(self._merged_away))]
            entries = [self._entries.get(k) for k in keys]
        dirs = set()
        doomed: list[str] = []
        for k, e in zip(keys, entries, strict=True):
            dirs.add((self.root / k).parent)
            if e is not None:
                self.remove(e)  # never fails: an undeletable file is doomed there
                continue
            try:  # not indexed: found by the start-up scan, or doomed and still there
                (self.root / k).unlink(missing_ok=True)
            except OSError as exc:
                log.error("spool: cannot delete merged source %s (next scan will): %s", k, exc)
                doomed.append(k)
        for d in dirs:
            with contextlib.suppress(OSError):
                fsync_dir(d)
        if doomed:
            self._doom(doomed)

    def _doom(self, keys: list[str]) -> None:
        path = self.root / DOOMED_FILE
        try:
            with open(path, "a") as fh:
                fh.write("".join(f"{k}\n" for k in keys))
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(self.root)
        except OSError as exc:
            log.error(
                "spool: cannot record %d undeleted merged sources (%s): after a restart "
                "their rows may be uploaded a second time",
                len(keys),
                exc,
            )

    def _doomed(self) -> list[str]:
        """Keys listed in `DOOMED_FILE` (stored elsewhere; to be deleted)."""
        try:
            return [k for k in (self.root / DOOMED_FILE).read_text().splitlines() if k]
        except FileNotFoundError:
            return []

    def _bury_doomed(self) -> tuple[int, set[str]]:
        """Startup: delete the files a run could not delete (their rows are stored). The
        count, and the keys that still cannot be deleted: they stay listed and are left
        out of the index (never uploaded again, never a reason the start fails)."""
        keys = self._doomed()
        path = self.root / DOOMED_FILE
        if not keys:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)  # an empty list
            return 0, set()
        stuck: list[str] = []
        for k in keys:
            try:
                if (self.root / k).exists():
                    log.warning("spool: deleting %s (already stored)", k)
                (self.root / k).unlink(missing_ok=True)
            except OSError as exc:
                log.error("spool: cannot delete %s (stored; not uploaded again): %s", k, exc)
                stuck.append(k)
        with contextlib.suppress(OSError):  # if it cannot be rewritten, the next start retries
            if stuck:
                write_atomic(path, "".join(f"{k}\n" for k in stuck).encode())
            else:
                path.unlink()
        return len(keys), set(stuck)

    def _complete_split(self, group: tuple[str, ...]) -> int:
        """Startup: finish a split a crash interrupted. All journals of the group still
        here: split again (identical files, identical keys); some gone: the deletions
        had begun, so every output was durable: delete the rest. Journals deleted."""
        present = [k for k in group if (self.root / k).exists()]
        if any((self.quarantine_root / k).exists() for k in group):
            # a journal of the group was unreadable: the split cannot be redone and its
            # outputs may be partial; keep the others for a split of their own (rows that
            # made it into the partial outputs may then appear twice, never zero times)
            log.error(
                "spool: an interrupted split lost a quarantined journal; %d journals kept "
                "for a new split (some of their rows may be stored twice)",
                len(present),
            )
            return 0
        log.warning(
            "spool: completing an interrupted split of %d journal files (%d left)",
            len(group),
            len(present),
        )
        if len(present) == len(group):
            try:
                self._split_files(list(group), [], hold=False)
            except TRANSIENT_ERRORS:
                raise  # the next start redoes it exactly (the group is still whole)
            except Exception as exc:
                # not for the disk: it would fail at every start; the journals stay for
                # the uploaders' split, which quarantines one that cannot be split
                log.error(
                    "spool: cannot complete the interrupted split of %d journals (%s); "
                    "they are kept for a new split (some of their rows may be stored twice)",
                    len(group),
                    exc,
                )
                return 0
        self._forget_sources(present)
        return len(present)

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
            self._pop_entry(entry.key)
        return dest

    def set_aside(
        self,
        dataset: Dataset | str,
        partition: tuple[str, str, str],
        frame: pl.DataFrame,
        reason: str,
    ) -> Path | None:
        """Durably keep rows of one (exchange, market, symbol) that must not be stored in
        the layout (see the module doc) under `quarantine/unplaced/`, with an ERROR naming
        them: never uploaded, never dropped. The name is content-derived, so setting the
        same rows aside again (a retried flush, a redone split) is a no-op: None."""
        data = parquet.encode(frame)
        return self._set_aside(dataset, partition, data, ".parquet", frame.height, reason)

    def set_aside_lines(
        self,
        dataset: Dataset | str,
        partition: tuple[str, str, str],
        lines: list[bytes],
        reason: str,
    ) -> Path | None:
        """`set_aside` for rows that cannot even become a frame: one JSON object a line
        (zstd, like raw capture)."""
        data = rawfile.encode(lines)
        return self._set_aside(dataset, partition, data, rawfile.SUFFIX, len(lines), reason)

    def _set_aside(
        self,
        dataset: Dataset | str,
        partition: tuple[str, str, str],
        data: bytes,
        suffix: str,
        rows: int,
        reason: str,
    ) -> Path | None:
        ds = Dataset(dataset).value
        exchange, market, symbol = partition
        digest = layout.content_hash(data)
        try:
            layout.check_partition(exchange, market, symbol)
            folder = Path(f"exchange={exchange}", f"market={market}", f"symbol={symbol}")
            name = symbol
        except UnsafePartition:
            # names from an old journal that never passed the check: the rows are kept,
            # under a name that cannot leave the quarantine (the reason file says whose)
            folder, name = Path("unsafe-names"), "unsafe"
            reason = f"{reason}; partition {partition!r:.300}"
        dest = self.quarantine_root / UNPLACED_DIR / ds / folder / f"{name}-{digest}{suffix}"
        if dest.exists():
            return None
        write_atomic(dest.with_name(dest.name + ".reason"), (reason + "\n").encode())
        write_atomic(dest, data)
        with self._lock:
            self._set_aside_rows[ds] += rows
        log.error(
            "spool: SET ASIDE %d %s rows of %s/%s/%s -> %s (never uploaded): %s",
            rows,
            ds,
            exchange,
            market,
            symbol,
            dest,
            reason,
        )
        return dest

    def set_aside_unplaceable(
        self, dataset: Dataset | str, frame: pl.DataFrame
    ) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(rows of `frame` the layout can place, rows it cannot); the latter are set
        aside, one file per (exchange, market, symbol). `frame` has partition columns."""
        ok, bad = layout.split_placeable(frame)
        if bad.height:
            for name, rows in bad.partition_by(
                list(PARTITION_COLUMNS), as_dict=True, maintain_order=True
            ).items():
                ms = rows.get_column("timestamp").cast(pl.Int64, strict=False)
                self.set_aside(
                    dataset,
                    tuple(str(v) for v in name),  # type: ignore[arg-type]
                    rows,
                    f"event time outside the years 0001-9999 the layout can partition "
                    f"(timestamp {ms.min()}..{ms.max()} ms)",
                )
        return ok, bad
