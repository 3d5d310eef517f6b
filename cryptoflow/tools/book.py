"""`cryptoflow book`: rebuild the order book at one moment from stored data.

Rule: take the latest snapshot with event time <= AT (ties: the later received, then the
highest update id; one stored without an id, OKX's -1, cannot anchor and is passed
over), id L, received at R. The deltas that can follow it are the messages with event
time <= AT received at or after R, plus, for a REST snapshot, those received before R
that reach past L (Binance's diff containing L + 1 is often received while the REST
request is in flight). Only messages of the snapshot's own chain count: never those
received before the last chain restart received at or before R, because ids may start
over there and older messages with higher ids belong to another book. A restart is an
in-stream snapshot (source `stream`: Bybit, OKX; Bybit restarts its ids with `u == 1`)
or a reset: a message whose id goes back (`prev_update_id > last_update_id`: OKX `seqId`
after maintenance, prevSeqId matching) with an event time before the snapshot's (a reset
not before it may postdate the snapshot's book, which then belongs to the chain before
the reset). Apply them in arrival order (receive time, ties by id), leaving out the
leading ones with last_update_id <= L (already in the snapshot) unless they continue it:
the first applied must continue the snapshot, either by its previous id (prev_update_id
== L: Binance ids jump between diffs, so when L is a diff's `u` the next diff has `pu ==
L` and a `U` far above L + 1; an OKX reset after L has a lower id but `prevSeqId == L`)
or by straddling it (first_update_id <= L + 1), and each next one must continue the
previous (prev_update_id == previous last_update_id). The chain's first stored message
after AT must continue the last one applied too (`check_next`): otherwise updates up to
AT may be missing (a lost file just before AT), unless an in-stream snapshot restarts the
chain before it or a `start` row says a collector run began there. If a `gaps` record
lies between the snapshot and AT, or the stored ids do not continue, the book is refused
(DataError): an answer that might be wrong is worse than none. A gap detected before
the start of the snapshot's chain is healed by it.

PATH may be `s3://bucket/prefix`: keys are listed for the one exchange/symbol and only
the hours actually read (the snapshot's hour, the deltas from `SNAPSHOT_LAG_MS` before
the snapshot up to AT, the hours after AT up to the first that holds a message of the
chain (`next_message`; the snapshots of those hours), and earlier hours back to the
chain's start only when a gap would otherwise refuse the book: `check_gaps`) are
downloaded.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import polars as pl
from rich.console import Console
from rich.table import Table

from cryptoflow.errors import DataError, UsageError
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.okx.rules import NO_SEQ_ID
from cryptoflow.models import DELTA_SCHEMA, Dataset, SnapshotSource
from cryptoflow.tools.datasets import (
    FileInfo,
    Root,
    collect_per_file,
    epoch_ms,
    fmt_ms,
    hour_of,
    list_files,
    open_root,
    parse_time,
    receive_us,
    report_console,
)
from cryptoflow.tools.verify import (
    ARRIVAL,
    MSG_ID,
    Break,
    conflicting,
    continues,
    load_gaps,
    walk_chain,
)

Side = dict[float, float]


def _readable(df: pl.DataFrame, bad: list, what: str) -> pl.DataFrame:
    if bad:
        names = ", ".join(b.shown for b in bad[:3])
        raise DataError(f"cannot rebuild the book: unreadable {what} file(s): {names}")
    return df


def find_snapshot(files: list[FileInfo], at_ms: int) -> pl.DataFrame:
    """Rows of the latest snapshot at or before `at_ms` that can anchor a book, scanning
    hour by hour backwards.

    A snapshot stored without an update id (`NO_SEQ_ID`: an OKX poll whose body had no
    seqId) is passed over: no stored update can be shown to continue it.
    Snapshots come every few seconds, so the hour of AT almost always answers and older
    hours are only opened when it does not.
    """
    by_hour: dict = {}
    for f in files:
        by_hour.setdefault(f.hour, []).append(f)
    no_id = 0
    for hour in sorted((h for h in by_hour if h <= hour_of(at_ms)), reverse=True):

        def latest(lf: pl.LazyFrame) -> pl.LazyFrame:
            return (
                lf.with_columns(ts=epoch_ms("timestamp"))
                .filter(pl.col("ts") <= at_ms)
                .group_by("ts", receive_us(), "last_update_id")
                .agg()
            )

        keys, bad = collect_per_file(by_hour[hour], latest, label="snapshots")
        _readable(keys, bad, "snapshot")
        if keys.is_empty():
            continue
        anchors = keys.filter(pl.col("last_update_id") != NO_SEQ_ID)
        no_id += keys.height - anchors.height
        if anchors.is_empty():
            continue
        ts, rt, lid = anchors.sort("ts", "rt", "last_update_id").row(-1)

        def rows(lf: pl.LazyFrame, ts: int = ts, rt: int = rt, lid: int = lid) -> pl.LazyFrame:
            return lf.with_columns(ts=epoch_ms("timestamp"), rt=receive_us()).filter(
                (pl.col("ts") == ts) & (pl.col("rt") == rt) & (pl.col("last_update_id") == lid)
            )

        snap, bad = collect_per_file(by_hour[hour], rows, label="snapshots")
        return _readable(snap, bad, "snapshot")
    if no_id:
        raise DataError(
            f"no snapshot that can anchor a book at or before {fmt_ms(at_ms)}: the {no_id} "
            "stored before it have no update id (OKX polls without seqId)"
        )
    raise DataError(f"no snapshot at or before {fmt_ms(at_ms)} (--at is before the first one)")


def apply_deltas(bids: Side, asks: Side, deltas: pl.DataFrame, snapshot_id: int) -> tuple[int, int]:
    """Apply `deltas` (rows with `ts` and `rt`, any order) to the book in place, in
    arrival order from the first message that continues the snapshot or reaches past it;
    (messages, last id applied).

    Raises DataError if the first message does not continue the snapshot (`_continues`)
    or the ids break.
    """
    if deltas.is_empty():
        return 0, snapshot_id
    msgs = deltas.group_by(MSG_ID[3:]).agg(ts=pl.col("ts").min()).sort(ARRIVAL)
    # a message with prev == L comes right after the snapshot even when its id is lower
    # (an OKX reset): leaving it out as "in the snapshot" would skip its whole chain
    start = (msgs["last_update_id"] > snapshot_id) | (msgs["prev_update_id"] == snapshot_id)
    start = start.fill_null(False)  # prev null: a venue that sends none (old OKX captures)
    if not start.any():
        return 0, snapshot_id
    msgs = msgs.slice(int(start.arg_true()[0]))  # leading ones are in the snapshot already
    breaks, chains = walk_chain(msgs)  # an id reset starts a new chain: ids may repeat
    dup = conflicting(msgs.with_columns(chain=pl.Series(chains, dtype=pl.Int64)), "chain")
    if not dup.is_empty():
        raise DataError(
            f"update {dup['last_update_id'][0]} is stored with conflicting id ranges; "
            "run `cryptoflow verify`"
        )
    first = msgs.row(0, named=True)
    if not _continues(first, snapshot_id):
        raise DataError(
            f"deltas do not continue snapshot {snapshot_id}: the first stored message after it "
            f"starts at update {first['first_update_id']} ({fmt_ms(first['ts'])})"
        )
    if breaks:
        raise DataError(f"continuity break between the snapshot and --at: {_break_text(breaks[0])}")
    ordered = deltas.join(msgs.select(MSG_ID[3:]), on=MSG_ID[3:], nulls_equal=True)
    ordered = ordered.sort(ARRIVAL, maintain_order=True)
    for side, price, qty in ordered.select("side", "price", "quantity").iter_rows():
        if side is None:  # the marker row of a message that changed no level
            continue
        book = bids if side == "bid" else asks
        if qty == 0:
            book.pop(price, None)
        else:
            book[price] = qty
    return msgs.height, int(msgs["last_update_id"][-1])


def _continues(first: dict, snapshot_id: int) -> bool:
    """Does message `first` (the first applied) continue the snapshot at `snapshot_id`?

    By its previous id (`prev == L`, the stream's own continuity rule, as book/sync.py
    chains diffs): Binance futures ids jump between a symbol's diffs, so when the REST
    snapshot's L is a diff's `u`, that diff is in the snapshot and the next one has
    `pu == L` but `U` far above L + 1. Or by straddling it (`first <= L + 1`, sync.py's
    `aligns`): it holds L + 1 and re-applying the updates up to L is harmless (sizes are
    absolute); a venue that sends no previous id can only continue this way.
    """
    return first["prev_update_id"] == snapshot_id or first["first_update_id"] <= snapshot_id + 1


def _break_text(b: Break) -> str:
    return (
        f"after update {b.prev_last} ({fmt_ms(b.prev_time)}) the next stored message is "
        f"{b.first}..{b.last} with prev {b.prev_id} ({fmt_ms(b.time)})"
    )


#: A REST snapshot's book can lag the stream: the diff that straddles it (received before
#: it) may carry an event time before the snapshot's, in the previous hour near an hour
#: boundary. Delta files are read from this long before the snapshot; which of their
#: messages count is decided by receive time and ids (module docstring).
SNAPSHOT_LAG_MS = 60_000

#: --at this long after the last stored snapshot or update: refused, not a stale book
#: (polls come every 10-25 s, so a running collector stores something well within it)
NO_DATA_AFTER_MS = 60_000


def rebuild(
    root: Root,
    exchange: str,
    symbol: str,
    at_ms: int,
    *,
    market: str | None = None,
) -> tuple[pl.DataFrame, dict]:
    """The full book at `at_ms` as rows (side, level, price, quantity) plus facts about it."""
    filters = dict(exchange=exchange, market=market, symbol=symbol)
    snap_files = _not_after(list_files(root, Dataset.SNAPSHOTS, end_ms=at_ms, **filters), at_ms)
    if not snap_files:
        raise DataError(
            f"no snapshots for {exchange}/{symbol} at or before {fmt_ms(at_ms)} under {root}"
        )
    markets = {f.market for f in snap_files}
    if len(markets) > 1:
        raise UsageError(f"{exchange}/{symbol} exists in markets {sorted(markets)}; pass market")
    snap = find_snapshot(snap_files, at_ms)
    snap_id = int(snap["last_update_id"][0])
    snap_ts = int(snap["ts"][0])
    snap_rt = int(snap["rt"][0])
    mkt = str(snap["market"][0])
    at = Anchor(snap_id, snap_ts, snap_rt, at_ms)
    filters["market"] = mkt

    from_ms = snap_ts - SNAPSHOT_LAG_MS
    delta_files = _not_after(list_files(root, Dataset.DELTAS, start_ms=from_ms, end_ms=at_ms,
                                        **filters), at_ms)  # fmt: skip
    deltas, resets = read_deltas(delta_files, at)
    near = [f for f in snap_files if hour_of(from_ms) <= f.hour <= hour_of(snap_ts)]
    chain_rt = max([*stream_restarts(near, at), *resets], default=None)
    # read once: `check_gaps` and `check_next` both judge by these records
    gaps = _readable(*load_gaps(root, **filters), "gaps")
    chain_rt = check_gaps(root, filters, gaps, snap_files, at, chain_rt)
    if chain_rt is not None:
        deltas = deltas.filter(pl.col("rt") >= chain_rt)
    latest = max(snap_ts, int(deltas["ts"].max()) if deltas.height else snap_ts)
    if at_ms - latest > NO_DATA_AFTER_MS:
        raise DataError(
            f"no data near {fmt_ms(at_ms)}: the last stored snapshot or update of "
            f"{exchange}/{symbol} before it is at {fmt_ms(latest)}, "
            f"{(at_ms - latest) / 1000:.0f} s earlier (the collector was not recording then)"
        )
    bids: Side = {}
    asks: Side = {}
    for side, price, qty in (
        snap.sort("side", "level").select("side", "price", "quantity").iter_rows()
    ):
        (bids if side == "bid" else asks)[price] = qty
    n_msgs, last_id = apply_deltas(bids, asks, deltas, snap_id)
    last_rt = int(deltas["rt"].max()) if n_msgs else None
    check_next(root, filters, gaps, at, Applied(n_msgs, last_id, last_rt))

    rows = [
        {"side": "bid", "level": i, "price": p, "quantity": bids[p]}
        for i, p in enumerate(sorted(bids, reverse=True))
    ] + [
        {"side": "ask", "level": i, "price": p, "quantity": asks[p]}
        for i, p in enumerate(sorted(asks))
    ]
    book = pl.DataFrame(
        rows,
        schema={"side": pl.String, "level": pl.Int32, "price": pl.Float64, "quantity": pl.Float64},
    )
    facts = dict(
        exchange=exchange, market=mkt, symbol=symbol, at=at_ms, snapshot_id=snap_id,
        snapshot_time=snap_ts, messages=n_msgs, last_update_id=last_id,
    )  # fmt: skip
    return book, facts


@attrs.frozen(slots=True)
class Anchor:
    """The chosen snapshot (id, event time ms, receive time µs) and AT (ms)."""

    snap_id: int
    snap_ts: int
    snap_rt: int
    at_ms: int


def stream_restarts(files: list[FileInfo], at: Anchor) -> list[int]:
    """Receive times (µs) of the in-stream snapshots in `files` received at or before the
    chosen snapshot: each restarts the chain (itself, when it is one)."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.filter(pl.col("source") == SnapshotSource.STREAM.value)
            .select(receive_us())
            .filter(pl.col("rt") <= at.snap_rt)
            .unique()
        )

    df, bad = collect_per_file(files, build, label="snapshots")
    _readable(df, bad, "snapshot")
    return df["rt"].to_list() if df.height else []


def _reset_before(at: Anchor) -> pl.Expr:
    """A reset that can start the chosen snapshot's chain (rows with `ts` and `rt`)."""
    return is_reset() & (pl.col("rt") <= at.snap_rt) & (pl.col("ts") < at.snap_ts)


def reset_times(files: list[FileInfo], at: Anchor) -> list[int]:
    """Receive times (µs) of the resets in `files` that can start the snapshot's chain."""

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        rows = lf.with_columns(ts=epoch_ms("timestamp"), rt=receive_us())
        return rows.filter(_reset_before(at)).select("rt").unique()

    df, bad = collect_per_file(files, build, label="deltas")
    _readable(df, bad, "delta")
    return df["rt"].to_list() if df.height else []


def earlier_restart(
    snap_files: list[FileInfo], delta_files: list[FileInfo], at: Anchor
) -> int | None:
    """Receive time of the latest chain restart in these (earlier) files, reading hour by
    hour backwards and stopping at the first hour that has one; None if none has."""
    for hour in sorted({f.hour for f in (*snap_files, *delta_files)}, reverse=True):
        rts = stream_restarts([f for f in snap_files if f.hour == hour], at)
        rts += reset_times([f for f in delta_files if f.hour == hour], at)
        if rts:
            return max(rts)
    return None


def check_gaps(
    root: Root,
    filters: dict,
    gaps: pl.DataFrame,
    snap_files: list[FileInfo],
    at: Anchor,
    chain_rt: int | None,
) -> int | None:
    """Raise DataError if a gap record makes the book at AT unknown; return the receive
    time of the start of the snapshot's chain (`chain_rt`, restarts found in the hours
    read so far, or one found in earlier hours).

    Earlier hours are read only when that decides the answer: no restart in the hours
    read, and a gap that refuses the book unless a restart after its detection heals it.
    Then the latest restart at or before the snapshot is looked for from the hour before
    those read back to the earliest such detection.
    """
    rows = gaps.to_dicts() if not gaps.is_empty() else []
    blocking = _blocking(rows, at, chain_rt)
    healable = [g["detected"] for g in blocking if g["detected"] is not None]
    if chain_rt is None and healable and min(healable) < at.snap_rt:
        read_from = hour_of(at.snap_ts - SNAPSHOT_LAG_MS)
        floor_ms = min(healable) // 1000 - SNAPSHOT_LAG_MS
        older = list_files(
            root, Dataset.DELTAS, start_ms=floor_ms, end_ms=at.snap_ts - SNAPSHOT_LAG_MS,
            **filters,
        )  # fmt: skip
        chain_rt = earlier_restart(
            [f for f in snap_files if hour_of(floor_ms) <= f.hour < read_from],
            [f for f in older if f.hour < read_from],
            at,
        )
        blocking = _blocking(rows, at, chain_rt)
    if blocking:
        raise DataError(_refusal(blocking[0], at))
    return chain_rt


def _blocking(gaps: list[dict], at: Anchor, chain_rt: int | None) -> list[dict]:
    """The gap records that make the book at AT unknown: between the snapshot and AT
    (`_gap_between`) and not healed, i.e. not detected before the start of the snapshot's
    chain (a full book after them, or new ids that theirs cannot be compared with)."""
    out = []
    for g in gaps:
        detected = g["detected"]
        healed = chain_rt is not None and detected is not None and detected < chain_rt
        if not healed and _gap_between(g, at.snap_id, at.snap_ts, at.at_ms):
            out.append(g)
    return out


def _refusal(g: dict, at: Anchor) -> str:
    """Why gap `g` refuses the book, in the terms the check used (`_gap_between`)."""
    start, end = _gap_span(g)
    snap = f"snapshot {at.snap_id} at {fmt_ms(at.snap_ts)}"
    if g["first_id_after"] is not None:
        lg, fa = g["last_good_id"], g["first_id_after"]
        ids = f"updates {lg}..{fa}" if lg is not None else f"before update {fa}"  # `start`
        return (
            f"refusing: a {g['kind']} gap ({ids}, "
            f"{fmt_ms(start)} .. {fmt_ms(end)}) is not healed by the {snap}, the last "
            f"before {fmt_ms(at.at_ms)}: the updates between it and {g['first_id_after']} "
            "are not trustworthy"
        )
    return (
        f"refusing: a {g['kind']} gap ({fmt_ms(start)} .. {fmt_ms(end)}) lies between the "
        f"{snap} and {fmt_ms(at.at_ms)}"
    )


def is_reset() -> pl.Expr:
    """A message whose id goes back (OKX seqId after maintenance: normalized prev above
    last, `okx/rules.diff_ids`); when it continues the chain, a new chain starts at it."""
    return pl.col("prev_update_id") > pl.col("last_update_id")


def read_deltas(files: list[FileInfo], at: Anchor) -> tuple[pl.DataFrame, list[int]]:
    """(rows that can follow the snapshot, with `ts` and `rt`; receive times of the resets
    that may start its chain).

    Rows: event time <= AT, received at or after the snapshot, or before it reaching past
    its id (module docstring). Resets: received at or before the snapshot with an event
    time before its own; one whose event time is not before it may postdate the snapshot's
    book, which then belongs to the chain before the reset.
    """

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        rt = pl.col("rt")
        past = pl.col("last_update_id") > at.snap_id
        follows = (pl.col("ts") <= at.at_ms) & ((rt >= at.snap_rt) | past)
        return (
            lf.with_columns(ts=epoch_ms("timestamp"), rt=receive_us())
            .with_columns(follows=follows, reset=_reset_before(at))
            .filter(pl.col("follows") | pl.col("reset"))
        )

    df, bad = collect_per_file(files, build, label="deltas")
    _readable(df, bad, "delta")
    if df.is_empty():
        # no file to read gives a frame without columns (a snapshot-only Bybit stream, or
        # AT before the first delta after the snapshot): the caller filters on `rt`
        return build(pl.LazyFrame(schema=DELTA_SCHEMA)).collect().drop("follows", "reset"), []
    resets = df.filter("reset")["rt"].unique().to_list()
    return df.filter("follows").drop("follows", "reset"), resets


@attrs.frozen(slots=True)
class Applied:
    """What `apply_deltas` applied: messages, last id (the snapshot's when none), receive
    time (µs) of the last one (None when none)."""

    messages: int
    last_id: int
    last_rt: int | None


def check_next(root: Root, filters: dict, gaps: pl.DataFrame, at: Anchor, applied: Applied) -> None:
    """Raise DataError if the chain's first stored message after AT does not continue the
    last one applied: the messages up to AT only show breaks *between* them, so a lost
    file just before AT left a stale book that looked whole (an audit deleted one and got
    it, exit 0). Nothing to check when no message follows AT, when an in-stream snapshot
    restarts the chain before it (its ids need not continue), or when a `start` row says
    a collector run began at it (a downtime, which a later message may follow)."""
    nxt = next_message(root, filters, at, applied)
    if nxt is None or _restarted_between(root, filters, applied, nxt, at):
        return
    if applied.messages:
        ok = continues(applied.last_id, nxt["first_update_id"], nxt["prev_update_id"])
    else:
        ok = _continues(nxt, applied.last_id)
    if ok:
        return
    starts = gaps.filter(pl.col("kind") == "start") if gaps.height else gaps
    if starts.height and nxt["first_update_id"] in starts["first_id_after"].to_list():
        return
    raise DataError(
        "continuity break between the snapshot and --at: after update "
        f"{applied.last_id} the next stored message, after --at, is "
        f"{nxt['first_update_id']}..{nxt['last_update_id']} with prev {nxt['prev_update_id']} "
        f"({fmt_ms(nxt['ts'])}): updates up to --at are missing"
    )


def next_message(root: Root, filters: dict, at: Anchor, applied: Applied) -> dict | None:
    """The first message in arrival order with event time after AT that the chain can
    reach (received after the last applied one; none applied: as `read_deltas` selects
    after the snapshot, leaving out those already in it), reading hour by hour from AT's
    and stopping at the first hour that has one; None when nothing is stored after AT."""
    files = list_files(root, Dataset.DELTAS, start_ms=at.at_ms, **filters)
    rt, lid, pid = pl.col("rt"), pl.col("last_update_id"), pl.col("prev_update_id")
    if applied.last_rt is not None:
        reach = rt >= applied.last_rt
    else:
        after = (lid > applied.last_id) | (pid == applied.last_id).fill_null(False)
        reach = ((rt >= at.snap_rt) | (lid > at.snap_id)) & after

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.with_columns(ts=epoch_ms("timestamp"), rt=receive_us())
            .filter((pl.col("ts") > at.at_ms) & reach)
            .group_by(MSG_ID[3:])
            .agg(ts=pl.col("ts").min())
        )

    for hour in sorted({f.hour for f in files}):
        df, bad = collect_per_file([f for f in files if f.hour == hour], build, label="deltas")
        _readable(df, bad, "delta")
        if df.height:
            return df.sort(ARRIVAL).row(0, named=True)
    return None


def _restarted_between(root: Root, filters: dict, applied: Applied, nxt: dict, at: Anchor) -> bool:
    """Is an in-stream snapshot received after the last applied message (or the chosen
    snapshot) and at or before `nxt`? It restarts the chain: `nxt` continues it."""
    since = applied.last_rt if applied.last_rt is not None else at.snap_rt
    files = list_files(root, Dataset.SNAPSHOTS, start_ms=at.at_ms, end_ms=nxt["ts"], **filters)

    def build(lf: pl.LazyFrame) -> pl.LazyFrame:
        return (
            lf.filter(pl.col("source") == SnapshotSource.STREAM.value)
            .select(receive_us())
            .filter((pl.col("rt") > since) & (pl.col("rt") <= nxt["rt"]))
            .unique()
        )

    df, bad = collect_per_file(files, build, label="snapshots")
    _readable(df, bad, "snapshot")
    return df.height > 0


def _not_after(files: list[FileInfo], at_ms: int) -> list[FileInfo]:
    """Drop files whose name says every row is after AT (they could add nothing; on S3
    this saves downloading the rest of AT's hour)."""
    return [f for f in files if f.first_ts is None or f.first_ts <= at_ms]


def _gap_between(g: dict, snap_id: int, snap_ts: int, at_ms: int) -> bool:
    """Does gap record `g` make the stream between the snapshot and AT untrustworthy?

    With an id after the gap: a gap row reads "good up to last_good_id, not trustworthy
    until first_id_after", so the updates it spoils are those before first_id_after. It
    matters when the snapshot does not hold them all (first id after > snapshot id + 1:
    updates after the snapshot may be missing) and the gap began by AT. A snapshot at
    first_id_after - 1 or later heals it: it holds every update before first_id_after,
    and the message starting there continues it exactly (sync.py's `first <= L + 1`).
    Without ids: when its time range [start, end] reaches into [snapshot time, AT].
    """
    start, end = _gap_span(g)
    if start is None or end is None:
        return False
    if g["first_id_after"] is not None:
        return g["first_id_after"] > snap_id + 1 and start <= at_ms
    return start <= at_ms and end >= snap_ts


def _gap_span(g: dict) -> tuple[int | None, int | None]:
    """A gap record's time range (ms), each end falling back on the other or the row's
    timestamp when missing."""
    start = next((g[k] for k in ("start", "end", "ts") if g[k] is not None), None)
    end = next((g[k] for k in ("end", "start", "ts") if g[k] is not None), None)
    return start, end


def run(
    path: str,
    exchange: str,
    symbol: str,
    at: str,
    depth: int = 10,
    output: Path | None = None,
    *,
    market: str | None = None,
    console: Console | None = None,
) -> int:
    """Rebuild the book at `at`; print `depth` levels per side or write them to `output`.

    `output` ending in .parquet or .csv gets the top `depth` levels of both sides as rows
    (exchange, market, symbol, at, last_update_id, side, level, price, quantity).
    """
    registry.check_exchange(exchange)
    if depth < 1:
        raise UsageError("--depth must be at least 1")
    if output is not None:
        _check_output(output)
    at_ms = parse_time(at)
    with open_root(path) as root:
        book, facts = rebuild(root, exchange, symbol.upper(), at_ms, market=market)
    top = book.filter(pl.col("level") < depth)
    console = console or report_console()
    if output is not None:
        out = top.select(
            pl.lit(facts["exchange"]).alias("exchange"),
            pl.lit(facts["market"]).alias("market"),
            pl.lit(facts["symbol"]).alias("symbol"),
            pl.lit(at_ms).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC").alias("at"),
            pl.lit(facts["last_update_id"], pl.Int64).alias("last_update_id"),
            "side", "level", "price", "quantity",
        )  # fmt: skip
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix.lower() == ".csv":
            out.write_csv(output)
        else:
            out.write_parquet(output)
        console.print(f"wrote {out.height} level(s) to {output}")
        return 0
    console.print(_render(top, facts, depth))
    return 0


def _check_output(output: Path) -> None:
    """A file the book cannot be written to is refused before the rebuild (which may
    read an hour of deltas) in one line, exit 2: a folder that was a file gave
    `[Errno 17] File exists: 'afile'`, exit 1, after the whole rebuild."""
    from cryptoflow.storage.local import dir_write_problem

    if output.suffix.lower() not in (".parquet", ".csv"):
        raise UsageError(f"{output}: output must end in .parquet or .csv")
    if output.is_dir():
        raise UsageError(f"--output {str(output)!r}: is a directory, expected a file to write")
    problem = dir_write_problem(output.parent)
    if problem:
        raise UsageError(
            f"--output {str(output)!r}: cannot write in {str(output.parent)!r}: {problem}"
        )


def _render(top: pl.DataFrame, facts: dict, depth: int) -> Table:
    table = Table(
        title=f"{facts['exchange']} {facts['symbol']} at {fmt_ms(facts['at'])}",
        caption=(
            f"snapshot {facts['snapshot_id']} at {fmt_ms(facts['snapshot_time'])} "
            f"+ {facts['messages']} message(s) -> update {facts['last_update_id']}"
        ),
    )
    for name, style in (("bid qty", "green"), ("bid", "green"), ("ask", "red"), ("ask qty", "red")):
        table.add_column(name, justify="right", style=style)
    bids = top.filter(pl.col("side") == "bid").sort("level").rows(named=True)
    asks = top.filter(pl.col("side") == "ask").sort("level").rows(named=True)
    for i in range(min(depth, max(len(bids), len(asks)))):
        b = bids[i] if i < len(bids) else None
        a = asks[i] if i < len(asks) else None
        # shortest exact text (repr), as stored: `:g` printed 7654321.5 as 7.65432e+06
        table.add_row(
            repr(b["quantity"]) if b else "",
            repr(b["price"]) if b else "",
            repr(a["price"]) if a else "",
            repr(a["quantity"]) if a else "",
        )
    return table
