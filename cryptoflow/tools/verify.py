"""`cryptoflow verify`: re-check what landed, so a study never starts on silently bad data.

Checks, per exchange/market/symbol:
- deltas: messages (rows with the same first/last/prev update ids and receive time), in
  the order they were received (receive time; ties by id), continue each other
  (`prev_update_id` == previous `last_update_id`; where a venue gives no prev id,
  `first_update_id` == previous last + 1). Not in id order: ids can go backwards (Bybit
  restarts at `u == 1` with a new book, OKX `seqId` after maintenance), and the
  collector checked them in arrival order too. An in-stream snapshot (`snapshots`,
  source `stream`: Bybit, OKX) is a full book that restarts the chain: the next message
  must continue *it*; a message that continues with a lower id (an OKX reset) starts a
  new chain as well. A break that a `gaps` record covers is *known* (listed, not a
  problem); any other break is a problem. The same update id stored with different
  ranges within one chain (between restarts), and rows stored twice (a message in more
  than one file, or with more than one row for a (side, price)), are problems. A row
  whose side is null is a message's marker (it changed no level) and is no duplicate.
- snapshots: each snapshot's bids strictly descending and asks strictly ascending by
  `level`, levels 0..n-1 without holes, prices > 0 and quantities >= 0, and best bid <
  best ask (a crossed book means the snapshot or its flattening is wrong).
- unreadable files are problems.
Exit 0 when clean, 1 with the list of problems.

PATH may be `s3://bucket/prefix` (files listed on S3, downloaded into a temporary cache
and checked with the same code; see `cryptoflow.tools.remote`).
"""

from __future__ import annotations

import attrs
import polars as pl
from rich.console import Console
from rich.table import Table

from cryptoflow.exchanges import registry
from cryptoflow.models import Dataset, GapKind, SnapshotSource
from cryptoflow.tools.datasets import (
    FILE_COL,
    collect_per_file,
    epoch_ms,
    fmt_ms,
    list_files,
    open_root,
    receive_us,
    report_console,
)

MSG_KEYS = ["exchange", "market", "symbol", "first_update_id", "last_update_id", "prev_update_id"]
#: one stored message: its ids and its receive time (µs) as `rt`. Ids alone do not name a
#: message: they repeat after a venue restarts its ids.
MSG_ID = [*MSG_KEYS, "rt"]
#: arrival order: receive time, ties by id
ARRIVAL = ["rt", "last_update_id", "first_update_id"]
#: Print at most this many problems of one kind per symbol; the count is always exact.
MAX_LISTED = 50


@attrs.frozen(slots=True)
class Finding:
    exchange: str
    market: str
    symbol: str
    kind: str
    detail: str


@attrs.frozen(slots=True)
class Break:
    """Two consecutive stored messages that do not continue each other."""

    prev_last: int  # last_update_id of the earlier message
    prev_time: int  # ms
    first: int  # first_update_id of the later message
    prev_id: int | None  # its prev_update_id
    last: int
    time: int


@attrs.frozen(slots=True)
class Restart:
    """An in-stream snapshot: a full book at `last_id` that restarts the id chain."""

    rt: int  # receive time, µs
    last_id: int
    time: int  # event time, ms


def load_messages(files: list, label: str = "deltas") -> tuple[pl.DataFrame, list]:
    """Distinct messages (`MSG_ID`) with their event time, in arrival order per symbol;
    `files` holding each, and `twice`: its rows that repeat a (side, price) of it within
    one file (marker rows, side null, left out)."""
    level = pl.col("side").is_not_null()

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return lf.group_by([*MSG_KEYS, receive_us(), FILE_COL]).agg(
            ts=epoch_ms("timestamp").min(),
            rows=pl.len(),
            twice=level.sum() - pl.struct("side", "price").filter(level).n_unique(),
        )

    df, bad = collect_per_file(files, build, label=label)
    if df.is_empty():
        return df, bad
    df = df.group_by(MSG_ID).agg(
        ts=pl.col("ts").min(),
        rows=pl.col("rows").sum(),
        files=pl.len(),
        twice=pl.col("twice").sum(),
    )
    return df.sort("exchange", "market", "symbol", *ARRIVAL), bad


def load_restarts(files: list) -> dict[tuple[str, str, str], list[Restart]]:
    """In-stream snapshots per (exchange, market, symbol), in arrival order."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.filter(pl.col("source") == SnapshotSource.STREAM.value)
            .group_by("exchange", "market", "symbol", "last_update_id", receive_us())
            .agg(ts=epoch_ms("timestamp").min())
        )

    df, _ = collect_per_file(files, build, label="snapshots")  # bad files: check_snapshots
    out: dict[tuple[str, str, str], list[Restart]] = {}
    if df.is_empty():
        return out
    for ex, mkt, sym, lid, rt, ts in df.sort("rt", "last_update_id").iter_rows():
        out.setdefault((ex, mkt, sym), []).append(Restart(rt, lid, ts))
    return out


def conflicting(msgs: pl.DataFrame, *within: str) -> pl.DataFrame:
    """Messages whose update id (last_update_id) is stored with another id range, per
    `within` group. A message that does not advance the chain (prev == last: an OKX
    heartbeat, seqId == prevSeqId, stored as a marker row) repeats the previous message's
    last id without being that update: never a conflict."""
    updates = msgs.filter(pl.col("prev_update_id").ne_missing(pl.col("last_update_id")))
    ranges = pl.struct("first_update_id", "prev_update_id").n_unique()
    return updates.filter(ranges.over(*within, "last_update_id") > 1)


def continues(last: int, first: int, pid: int | None) -> bool:
    """Does a message (first id, prev id) continue one ending at `last`? Where a venue
    gives no prev id, by `first == last + 1`."""
    return pid == last if pid is not None else first == last + 1


def walk_chain(
    msgs: pl.DataFrame, restarts: list[Restart] | None = None
) -> tuple[list[Break], list[int]]:
    """(breaks, chain number of each message) for one symbol's messages in arrival order.

    Each in-stream snapshot in `restarts` received before a message starts a new chain
    there: that message must continue the snapshot, not the message before it. At the
    same receive time the snapshot comes first only if the message continues it.
    A message that continues the previous one with a lower last id (a reset: OKX seqId
    going back after maintenance, prevSeqId matching; book/sync.py follows it) starts a
    new chain too: its ids may run through values the chain before it already used.
    """
    out: list[Break] = []
    chains: list[int] = []
    rs = restarts or []
    j = resets = 0
    prev: tuple[int, int] | None = None
    for first, last, pid, ts, rt in msgs.select(
        "first_update_id", "last_update_id", "prev_update_id", "ts", "rt"
    ).iter_rows():
        while j < len(rs) and (
            rs[j].rt < rt or (rs[j].rt == rt and continues(rs[j].last_id, first, pid))
        ):
            prev = (rs[j].last_id, rs[j].time)
            j += 1
        if prev is not None and not continues(prev[0], first, pid):
            out.append(Break(prev[0], prev[1], first, pid, last, ts))
        elif prev is not None and last < prev[0]:
            resets += 1
        prev = (last, ts)
        chains.append(j + resets)
    return out, chains


def load_gaps(root, exchange=None, market=None, symbol=None) -> tuple[pl.DataFrame, list]:  # type: ignore[no-untyped-def]
    """(gap records as plain ints (ids, ms; `detected` in µs), empty frame when there are
    none; the gaps files that could not be read). The caller must act on the unreadable
    ones: a gap row lost with its file would make a known break look like a problem, or
    worse, let `book` serve a book the row would refuse."""
    files = list_files(root, Dataset.GAPS, exchange=exchange, market=market, symbol=symbol)

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return lf.select(
            "exchange", "market", "symbol", "kind", "last_good_id", "first_id_after",
            start=epoch_ms("start_time"), end=epoch_ms("end_time"), ts=epoch_ms("timestamp"),
            detected=pl.col("detected_at").dt.epoch("us"),
        )  # fmt: skip

    return collect_per_file(files, build, label="gaps")


def covering_gap(brk: Break, gaps: list[dict]) -> dict | None:
    """The gap record that explains `brk`, if any.

    A record with both ids reads "good up to last_good_id, not trustworthy until
    first_id_after": it explains a break only when it *contains* it, i.e. the stored data
    stops at or after its last good id (`last_good_id <= prev_last`) and resumes no later
    than its first id after (`first_id_after >= min(first, prev_id)`). An overlap is not
    enough: a row for a break at 100 -> 120 explained 100 -> 600, so files lost just after
    a recorded gap went unseen. A record with one id only (a stream that stopped: no id
    after; a checksum mismatch on a snapshot: no id before) bounds nothing on its open
    side and explains no break. Without ids: its time range must contain the break's.
    """
    for g in gaps:
        lg, fa = g["last_good_id"], g["first_id_after"]
        if g["kind"] == GapKind.START.value:
            # a (re)start explains exactly the break into its first message: not every
            # break before it (a lost file of an earlier run stays a problem)
            if fa is not None and fa == brk.first:
                return g
            continue
        if lg is not None and fa is not None:
            resumes = min(brk.first, brk.prev_id) if brk.prev_id is not None else brk.first
            if lg <= brk.prev_last and fa >= resumes:
                return g
            continue
        if lg is not None or fa is not None:
            continue
        start = g["start"] if g["start"] is not None else g["ts"]
        end = g["end"] if g["end"] is not None else g["ts"]
        if start is not None and end is not None and start <= brk.prev_time and end >= brk.time:
            return g
    return None


def _starts(where: tuple[str, str, str], gaps: list[dict], breaks: list[Break]) -> list[Finding]:
    """A `start` row (the collector began or restarted here) that explains no break is
    listed too: where a new in-stream snapshot restarts the chain (Bybit, OKX) the
    restart shows no break, and the downtime before it would otherwise go unseen."""
    firsts = {b.first for b in breaks}
    return [
        Finding(*where, "recording (re)started",
                f"first update {g['first_id_after']} at {fmt_ms(g['end'])}; nothing stored "
                "before is known to continue it")
        for g in gaps
        if g["kind"] == GapKind.START.value and g["first_id_after"] not in firsts
    ]  # fmt: skip


def check_deltas(
    files: list,
    gaps: pl.DataFrame,
    restarts: dict[tuple[str, str, str], list[Restart]] | None = None,
) -> tuple[list[Finding], list[Finding], list]:
    """(problems, known gaps, bad files) for the deltas in `files`; `restarts` are the
    in-stream snapshots (`load_restarts`)."""
    msgs, bad = load_messages(files)
    problems: list[Finding] = []
    known: list[Finding] = []
    if msgs.is_empty():
        return problems, known, bad
    for (ex, mkt, sym), group in msgs.group_by(
        ["exchange", "market", "symbol"], maintain_order=True
    ):
        where = (ex, mkt, sym)
        breaks, chains = walk_chain(group, (restarts or {}).get(where))
        dup_ids = conflicting(group.with_columns(chain=pl.Series(chains, dtype=pl.Int64)), "chain")
        for row in dup_ids.iter_rows(named=True):
            problems.append(
                Finding(*where, "conflicting message",
                        f"update {row['last_update_id']} stored as "
                        f"{row['first_update_id']}..{row['last_update_id']} "
                        f"prev {row['prev_update_id']}")
            )  # fmt: skip
        bad_range = group.filter(pl.col("first_update_id") > pl.col("last_update_id"))
        for row in bad_range.iter_rows(named=True):
            problems.append(
                Finding(*where, "bad id range",
                        f"first {row['first_update_id']} > last {row['last_update_id']}")
            )  # fmt: skip
        sym_gaps = (
            gaps.filter(
                (pl.col("exchange") == ex) & (pl.col("market") == mkt) & (pl.col("symbol") == sym)
            ).to_dicts()
            if not gaps.is_empty()
            else []
        )
        for brk in breaks:
            expected = f"prev {brk.prev_id}" if brk.prev_id is not None else f"first {brk.first}"
            text = (
                f"after update {brk.prev_last} ({fmt_ms(brk.prev_time)}) next message has "
                f"{expected} ({brk.first}..{brk.last} at {fmt_ms(brk.time)})"
            )
            g = covering_gap(brk, sym_gaps)
            if g is not None:
                known.append(Finding(*where, f"known gap ({g['kind']})", text))
            else:
                problems.append(Finding(*where, "continuity break", text))
        known.extend(_starts(where, sym_gaps, breaks))
    for row in msgs.filter((pl.col("files") > 1) | (pl.col("twice") > 0)).iter_rows(named=True):
        problems.append(
            Finding(row["exchange"], row["market"], row["symbol"], "duplicate rows",
                    f"message {row['first_update_id']}..{row['last_update_id']} at "
                    f"{fmt_ms(row['ts'])}: {_how_twice(row)}")
        )  # fmt: skip
    return problems, known, bad


def _how_twice(row: dict) -> str:
    parts = [f"stored in {row['files']} files"] if row["files"] > 1 else []
    if row["twice"]:
        parts.append(f"{row['twice']} row(s) repeating a (side, price) in one file")
    return " and ".join(parts)


def check_snapshots(files: list) -> tuple[list[Finding], list]:
    """(problems, bad files) for the snapshots in `files`; all checks run in polars."""
    key = ["exchange", "market", "symbol", "last_update_id", "ts"]

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        lf = lf.with_columns(ts=epoch_ms("timestamp")).sort([*key, "side", "level"])
        step = pl.col("price").diff().over([*key, "side"])
        lvl_step = pl.col("level").diff().over([*key, "side"])
        first_lvl = pl.col("level").min().over([*key, "side"])
        return (
            lf.with_columns(
                unsorted=pl.when(pl.col("side") == "bid").then(step >= 0).otherwise(step <= 0),
                level_hole=(lvl_step != 1) | (first_lvl != 0),
                negative=(pl.col("price") <= 0) | (pl.col("quantity") < 0),
                bad_side=~pl.col("side").is_in(["bid", "ask"]),
            )
            .group_by(key)
            .agg(
                unsorted=pl.col("unsorted").fill_null(False).sum(),
                level_hole=pl.col("level_hole").fill_null(False).sum(),
                negative=pl.col("negative").fill_null(True).sum(),
                bad_side=pl.col("bad_side").fill_null(True).sum(),
                best_bid=pl.col("price").filter(pl.col("side") == "bid").max(),
                best_ask=pl.col("price").filter(pl.col("side") == "ask").min(),
            )
        )

    df, bad = collect_per_file(files, build, label="snapshots")
    problems: list[Finding] = []
    if df.is_empty():
        return problems, bad
    df = df.sort(key)
    for r in df.iter_rows(named=True):
        where = (r["exchange"], r["market"], r["symbol"])
        snap = f"snapshot {r['last_update_id']} at {fmt_ms(r['ts'])}"
        if r["unsorted"]:
            problems.append(Finding(*where, "unsorted snapshot", f"{snap}: {r['unsorted']} "
                                    "level(s) out of price order"))  # fmt: skip
        if r["level_hole"]:
            problems.append(Finding(*where, "level numbering", f"{snap}: levels not 0..n-1"))
        if r["negative"]:
            problems.append(Finding(*where, "negative value", f"{snap}: {r['negative']} row(s) "
                                    "with price <= 0 or quantity < 0"))  # fmt: skip
        if r["bad_side"]:
            problems.append(Finding(*where, "bad side", f"{snap}: side not bid/ask"))
        bb, ba = r["best_bid"], r["best_ask"]
        if bb is not None and ba is not None and bb >= ba:
            problems.append(Finding(*where, "crossed book", f"{snap}: best bid {bb} >= "
                                    f"best ask {ba}"))  # fmt: skip
    return problems, bad


def run(
    path: str,
    exchange: str | None = None,
    symbol: str | None = None,
    *,
    market: str | None = None,
    console: Console | None = None,
) -> int:
    """Check deltas and snapshots under `path`; print findings; 0 if clean, else 1.

    Raises DataError when `path` is missing or holds no deltas or snapshots at all
    (nothing verified must not look like "clean").
    """
    registry.check_exchange(exchange)
    with open_root(path) as root:
        return _verify(root, path, exchange, symbol, market, console or report_console())


def _verify(root, path, exchange, symbol, market, console) -> int:  # type: ignore[no-untyped-def]
    from cryptoflow.errors import DataError

    filters = dict(exchange=exchange, market=market, symbol=symbol)
    delta_files = list_files(root, Dataset.DELTAS, **filters)
    snap_files = list_files(root, Dataset.SNAPSHOTS, **filters)
    if not delta_files and not snap_files:
        raise DataError(f"{path}: no snapshots or deltas found" + _filter_text(filters))
    gaps, g_bad = load_gaps(root, **filters)
    d_problems, known, d_bad = check_deltas(delta_files, gaps, load_restarts(snap_files))
    s_problems, s_bad = check_snapshots(snap_files)
    problems = d_problems + s_problems
    for b in d_bad + s_bad + g_bad:
        problems.append(Finding("-", "-", "-", "unreadable file", f"{b.shown}: {b.reason}"))

    console.print(
        f"verified {len(delta_files)} delta file(s), {len(snap_files)} snapshot file(s) "
        f"under {path}"
    )
    if known:
        console.print(_table("Known gaps (recorded, not problems)", known))
    if problems:
        console.print(_table(f"{len(problems)} problem(s)", problems))
        return 1
    console.print("[green]OK[/green]: no problems found")
    return 0


def _filter_text(filters: dict) -> str:
    parts = [f"{k}={v}" for k, v in filters.items() if v]
    return f" ({', '.join(parts)})" if parts else ""


def _table(title: str, findings: list[Finding]) -> Table:
    table = Table(title=title)
    for col in ("exchange", "market", "symbol", "kind", "detail"):
        table.add_column(col, overflow="fold")
    counts: dict[tuple[str, str, str, str], int] = {}
    hidden = 0
    for f in findings:
        k = (f.exchange, f.market, f.symbol, f.kind)
        counts[k] = counts.get(k, 0) + 1
        if counts[k] > MAX_LISTED:
            hidden += 1
            continue
        table.add_row(f.exchange, f.market, f.symbol, f.kind, f.detail)
    if hidden:
        table.caption = f"{hidden} more not listed"
    return table
