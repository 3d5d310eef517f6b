"""Book-sync state machine shared by every venue (pure: no I/O, no clock).

One `BookSync` per (exchange, symbol). It is fed diffs, snapshots and stream markers in
arrival order, and answers each with a `Decision`: record the diff or not, gap records,
and whether a fresh snapshot must be fetched. Venue specifics live in a small `SyncRules`
object (`exchanges/<venue>/rules.py`); ids were already normalized by the parser
(`DepthDiff.first/last/prev_update_id`).

Two independent checks:

1. **Stream continuity** (drives the `gaps` dataset). Every diff received is recorded in
   `deltas`, also the ones before the first snapshot. Each diff must continue the previous
   one (`prev_update_id == previous last_update_id`), regardless of snapshots. A break
   gives `Gap(SEQUENCE_BREAK, last_good_id, first_id_after, start/end event times)`.
   A diff that is *older* than the previous one (out of order) is a break too, and does
   not move the chain back: the next in-order diff continues from the newest id seen.
   Except the first diff after a `RECONNECT` marker: a venue may restart its ids on the
   new connection (OKX seqId after maintenance), so the chain moves to it, lower or not.
   *Exact duplicates* (same first and last id as the previous diff, and not continuing
   it) are dropped and counted (`duplicates`): they carry the same absolute sizes, so
   they add nothing, and writing them would store the same rows twice.
   A venue that sends no previous id (`prev_update_id is None`, old OKX captures) cannot
   be checked here; the rules say it continues.

2. **The book** (drives resync decisions and the optional `OrderBook`). Diffs are buffered
   (bounded) until a snapshot with id L arrives (REST, or an in-stream `is_snapshot`
   diff, which is a full book and anchors at once). Buffered diffs with `last < L` are
   stale and dropped. The first applied diff must straddle L: `first <= L + 1` and
   `last >= L`. Binance documents `U <= L <= u`; `first == L + 1` is fine too because a
   snapshot at L contains every update up to L, so a diff starting at L + 1 is its exact
   continuation (KuCoin and OKX-from-REST align that way). Later diffs must continue.
   A snapshot older than every buffered diff (`first > L + 1` for the oldest) cannot
   anchor: counted in `snapshots_too_old` and another snapshot is requested.
   After a break the book waits again (buffering from the breaking diff), asks for a
   snapshot once (a request stays outstanding until any snapshot arrives, so the caller
   must retry a failed fetch itself; a snapshot fetched before the break is simply too
   old and triggers a new request), keeps recording, and when a snapshot anchors it again emits
   `Gap(RESYNC, last_good_id = last applied id before the break, first_id_after = L)`.
   The initial sync is not a resync.

Markers (`StreamEvent`): `CONSUMER_OVERLOAD` means messages were dropped, so the next diff
gives a gap of that kind whether it continues or not, and a resync; `RECONNECT` gives a gap
of that kind only if the next diff does not continue (the venue may resume cleanly).

Speed: the common case (a diff that continues, book synced) costs one comparison and an
optional dict update per level, and returns a shared constant `Decision`, so feeding a
whole batch stays O(levels) (see `feed_many` on the normalizer).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from enum import Enum

import attrs

from cryptoflow.book.orderbook import OrderBook
from cryptoflow.models import (
    DepthDiff,
    DepthSnapshot,
    Gap,
    GapKind,
    SnapshotSource,
    StreamEvent,
)

#: gap kinds that mean "the stream lost data" (as opposed to RESYNC, which says it healed)
BREAK_KINDS = frozenset(
    {GapKind.SEQUENCE_BREAK, GapKind.RECONNECT, GapKind.CONSUMER_OVERLOAD, GapKind.CHECKSUM}
)


@attrs.frozen(slots=True)
class SyncRules:
    """A venue's sequence rules. The defaults are Binance's, which the normalized ids make
    the general case; a venue overrides only what differs."""

    venue: str
    #: how a resync is obtained: "rest" (fetch a REST snapshot) or "resubscribe"
    resync_by: str = "rest"
    #: at most this many diffs wait for a snapshot; older ones are dropped (and counted)
    max_buffer: int = 20_000
    #: book checksum (bids, asks as {price text: size text}) -> int, compared with a
    #: diff's non-zero `checksum` after applying it (OKX CRC32 of the top 25 levels).
    #: Set: the machine keeps the book and checks; None (Binance...): no cost at all.
    checksum: Callable[[Mapping[str, str], Mapping[str, str]], int] | None = None

    def continues(self, last_id: int, diff: DepthDiff) -> bool:
        """Consulted only when `prev_update_id != last_id` (the machine's fast path takes
        equality as continuation), so an override can only *add* ways to continue."""
        prev = diff.prev_update_id
        return prev is None or prev == last_id

    def is_stale(self, anchor_id: int, diff: DepthDiff) -> bool:
        return diff.last_update_id < anchor_id

    def aligns(self, anchor_id: int, diff: DepthDiff) -> bool:
        """Called only for a diff that is not stale (so `last >= anchor_id`)."""
        return diff.first_update_id <= anchor_id + 1


class BookState(Enum):
    WAITING = "waiting"  # buffering diffs until a snapshot arrives
    ALIGNING = "aligning"  # anchored on a snapshot; waiting for the diff that straddles it
    SYNCED = "synced"


@attrs.frozen(slots=True)
class Decision:
    record: bool  # write this diff to `deltas` (False only for dropped exact duplicates)
    gaps: tuple[Gap, ...] = ()
    need_snapshot: bool = False  # fetch (or resubscribe for) a fresh snapshot now


RECORD = Decision(True)
DROP = Decision(False)
NOTHING = Decision(False)


@attrs.define(slots=True)
class SyncCounters:
    diffs: int = 0
    snapshots: int = 0
    applied: int = 0
    stale_dropped: int = 0
    duplicates: int = 0
    breaks: int = 0
    resyncs: int = 0
    snapshot_requests: int = 0
    snapshots_too_old: int = 0
    buffer_overflow: int = 0
    drift_checks: int = 0
    drift: int = 0

    def add(self, other: SyncCounters) -> None:
        for field in attrs.fields(SyncCounters):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class BookSync:
    """Sync state of one symbol's stream; see the module docstring for the rules."""

    def __init__(
        self,
        exchange: str,
        market: str,
        symbol: str,
        rules: SyncRules,
        *,
        track_book: bool = False,
        drift_depth: int = 20,
        mark_start: bool = False,
    ) -> None:
        self.exchange, self.market, self.symbol = exchange, market, symbol
        self.rules = rules
        checked = rules.checksum is not None
        self.track_book = track_book  # poll snapshots checked against the book (drift)
        self.book: OrderBook | None = OrderBook() if track_book or checked else None
        self.drift_depth = drift_depth
        self.counters = SyncCounters()
        self.state = BookState.WAITING
        # stream chain
        self._last_first: int | None = None
        self._last_id: int | None = None
        self._last_time: int | None = None
        self._pending: StreamEvent | None = None
        self._reconnected = False  # a RECONNECT marker came since the last diff
        # book
        self._buffer: deque[DepthDiff] = deque()
        self._anchor: DepthSnapshot | None = None
        self._book_id: int | None = None
        self._book_time: int | None = None
        self._requested = False
        self._broken: tuple[int | None, int | None] | None = None  # (last good id, time)
        #: the writer's flush rejected a poll body read unparsed: until a poll snapshot
        #: parses, bodies are parsed on arrival so only usable ones count (`on_unread_snapshot`)
        self._bodies_rejected = False
        if checked:  # only venues with a checksum pay for it: the class method stays as is
            self.on_diff = self._on_diff_checked  # type: ignore[method-assign]
        if mark_start:
            # the first diff also records where this process's chain starts (`START`);
            # the hook replaces itself, so later diffs pay nothing for it
            self._on_diff_next = self.on_diff
            self.on_diff = self._on_first_diff  # type: ignore[method-assign]

    @property
    def book_id(self) -> int | None:
        """Last update id applied to the book (None while waiting)."""
        return self._book_id if self.state is BookState.SYNCED else None

    # --- inputs ---------------------------------------------------------------------

    def on_event(self, event: StreamEvent) -> Decision:
        """Remember a marker; it takes effect at the next diff. Overload wins over reconnect,
        and overload markers before one diff add up their `dropped` (a marker can go out
        while the diff after it is dropped again: the next marker counts only that one).
        A `final` one (the stream stopped; no next diff) is a gap at once, with the drops
        of an overload marker still pending."""
        if event.kind is GapKind.RECONNECT and not event.final:
            self._reconnected = True
        pending = self._pending
        if pending is not None and pending.kind is GapKind.CONSUMER_OVERLOAD:
            if event.kind is GapKind.CONSUMER_OVERLOAD:
                event = attrs.evolve(
                    event,
                    reason=pending.reason or event.reason,
                    dropped=pending.dropped + event.dropped,
                )
            elif event.final:
                event = attrs.evolve(pending, time=event.time, final=True)
            else:
                return NOTHING  # overload wins: the next diff is a gap whatever it is
        if event.final:
            self._pending = None  # accounted for here: no next diff carries it
            self.counters.breaks += 1
            reason = event.reason or f"{event.kind.value} at the end of the stream"
            if event.dropped:
                reason += f"; dropped {event.dropped} messages before the stop"
            gap = self._gap(
                event.kind, self._last_id, None, self._last_time, None, event.time, reason
            )
            self._note_broken()
            return Decision(False, gaps=(gap,))
        self._pending = event
        return NOTHING

    def on_diff(self, diff: DepthDiff) -> Decision:
        self.counters.diffs += 1
        if diff.is_snapshot:
            return self._stream_snapshot(diff)
        last = self._last_id
        pending = self._pending
        # fast path: continues, no marker, book synced
        if last is not None and diff.prev_update_id == last and pending is None:
            self._advance(diff)
            if self.state is BookState.SYNCED:
                self._apply(diff)
                return RECORD
            return self._book_continue(diff)
        reconnected, self._reconnected = self._reconnected, False
        if last is None:
            self._pending = None
            self._advance(diff)
            return self._book_continue(diff)
        if self.rules.continues(last, diff):
            self._pending = None
            if pending is not None and pending.kind is GapKind.CONSUMER_OVERLOAD:
                return self._break(diff, pending, last, advance=True)
            self._advance(diff)
            if self.state is BookState.SYNCED:
                self._apply(diff)
                return RECORD
            return self._book_continue(diff)
        if diff.first_update_id == self._last_first and diff.last_update_id == last:
            self.counters.duplicates += 1
            return DROP
        self._pending = None
        # an older diff is out of order and moves nothing, except as the first diff of a
        # new connection: a venue may restart its ids (OKX seqId after maintenance), and
        # the new connection's chain is the one to follow and resync on
        advance = reconnected or diff.last_update_id > last
        return self._break(diff, pending, last, advance=advance)

    def _on_first_diff(self, diff: DepthDiff) -> Decision:
        """The first diff (or in-stream snapshot) of this symbol in this process, with a
        `START` gap row: a restarted collector does not know the ids its predecessor
        stored, so without this row its downtime left no trace where a new in-stream
        snapshot restarts the chain (Bybit, OKX); `verify` lists these rows. Not a break
        (no resync, not counted in `breaks`)."""
        self.on_diff = self._on_diff_next  # type: ignore[method-assign]
        d = self.on_diff(diff)
        start = self._gap(
            GapKind.START,
            None,
            diff.first_update_id,
            None,
            diff.event_time,
            diff.receive_time,
            "the collector started here: nothing stored before is known to continue it",
        )
        return Decision(d.record, gaps=(start, *d.gaps), need_snapshot=d.need_snapshot)

    def _on_diff_checked(self, diff: DepthDiff) -> Decision:
        """`on_diff`, then the venue checksum of the book against the diff's (non-zero)
        `checksum`; a mismatch is a CHECKSUM gap and a resync, like a sequence break."""
        before_id, before_time = self._book_id, self._book_time
        d = BookSync.on_diff(self, diff)
        expected = diff.checksum
        if not expected or not d.record or self.state is not BookState.SYNCED:
            return d
        assert self.book is not None and self.rules.checksum is not None
        got = self.rules.checksum(self.book.bids, self.book.asks)
        if got == expected:
            return d
        self.counters.breaks += 1
        gap = self._gap(
            GapKind.CHECKSUM,
            None if diff.is_snapshot else before_id,
            diff.last_update_id,
            None if diff.is_snapshot else before_time,
            diff.event_time,
            diff.receive_time,
            f"checksum {expected} != {got} computed on the book after update {diff.last_update_id}",
        )
        self._note_broken()
        r = self._request()
        return Decision(True, gaps=(*d.gaps, gap), need_snapshot=d.need_snapshot or r.need_snapshot)

    def on_unread_snapshot(self) -> bool:
        """A poll snapshot not parsed yet (`models.SnapshotBody`). True: its content is not
        needed (in sync, and no drift checks: `track_book` off; a book kept only for the
        venue's checksum, OKX, is checked by every diff instead), and it is counted here;
        False: parse it and call `on_snapshot`.

        Counted on arrival, a body is trusted to be usable; once the writer's flush has
        rejected one (`on_body_rejected`), bodies are parsed on arrival again until one
        parses, so a lane whose every poll is malformed stops counting and turns stale
        (/healthz) instead of looking fresh on bodies that hold no rows."""
        if self.state is BookState.SYNCED and not self.track_book and not self._bodies_rejected:
            self.counters.snapshots += 1
            return True
        return False

    def on_body_rejected(self, why: str = "") -> None:
        """The writer's flush found a poll body this sync let through unparsed malformed
        (`BodyBatch.on_rejected`; `why` is logged by the writer)."""
        self._bodies_rejected = True

    def on_snapshot(self, snap: DepthSnapshot) -> Decision:
        """A REST snapshot. When the book waits, it tries to anchor on it; when synced, a
        POLL/REPLAY snapshot at the book's id is a drift check (if the book is kept)."""
        self.counters.snapshots += 1
        self._bodies_rejected = False  # a usable one: bodies may be read at the flush again
        if self.state is BookState.SYNCED:
            if self.book is not None and snap.last_update_id == self._book_id:
                self.counters.drift_checks += 1
                if not self.book.matches(snap.bids, snap.asks, self.drift_depth):
                    self.counters.drift += 1
            return NOTHING
        self._requested = False
        anchor_id = snap.last_update_id
        buf = self._buffer
        while buf and self.rules.is_stale(anchor_id, buf[0]):
            buf.popleft()
            self.counters.stale_dropped += 1
        if not buf:
            self.state = BookState.ALIGNING
            self._anchor = snap
            return NOTHING
        if not self.rules.aligns(anchor_id, buf[0]):
            self.counters.snapshots_too_old += 1
            return self._request()
        self._anchor = snap
        # detected when the later of the two came: the snapshot, or the last diff
        return self._synced(snap, list(buf), max(snap.receive_time, buf[-1].receive_time))

    # --- internals --------------------------------------------------------------------

    def _advance(self, diff: DepthDiff) -> None:
        self._last_first = diff.first_update_id
        self._last_id = diff.last_update_id
        self._last_time = diff.event_time

    def _apply(self, diff: DepthDiff) -> None:
        self.counters.applied += 1
        self._book_id = diff.last_update_id
        self._book_time = diff.event_time
        if self.book is not None:
            self.book.apply(diff.bids, diff.asks, diff.last_update_id)

    def _request(self) -> Decision:
        if self._requested:
            return RECORD
        self._requested = True
        self.counters.snapshot_requests += 1
        return Decision(True, need_snapshot=True)

    def _book_continue(self, diff: DepthDiff) -> Decision:
        """A diff that continues the stream while the book is not synced."""
        if self.state is BookState.ALIGNING:
            anchor = self._anchor
            assert anchor is not None
            if self.rules.is_stale(anchor.last_update_id, diff):
                self.counters.stale_dropped += 1
                return RECORD
            if self.rules.aligns(anchor.last_update_id, diff):
                return self._synced(anchor, [diff], max(anchor.receive_time, diff.receive_time))
            self.counters.snapshots_too_old += 1
            self.state = BookState.WAITING
            self._anchor = None
        buf = self._buffer
        buf.append(diff)
        if len(buf) > self.rules.max_buffer:
            buf.popleft()
            self.counters.buffer_overflow += 1
        return self._request()

    def _synced(self, anchor: DepthSnapshot, diffs: list[DepthDiff], now: int) -> Decision:
        """Anchor the book on `anchor` and apply `diffs` (the first one straddles it)."""
        if self.book is not None:
            self.book.reset(anchor.bids, anchor.asks, anchor.last_update_id)
        self._book_id = anchor.last_update_id
        self._buffer.clear()
        self._anchor = None  # not needed once synced: do not keep its levels alive
        self.state = BookState.SYNCED
        for d in diffs:
            self._apply(d)
        return self._resynced(anchor.last_update_id, anchor.event_time, now, anchor.source)

    def _resynced(
        self, anchor_id: int, anchor_time: int, now: int, source: SnapshotSource
    ) -> Decision:
        broken, self._broken = self._broken, None
        if broken is None:
            return RECORD
        self.counters.resyncs += 1
        # the row says what healed, so a log line or a reader of `gaps` alone can tell
        # the heal from the losses before it (it used to be empty)
        at = f"the break at {broken[0]}" if broken[0] is not None else "a break"
        reason = f"healed: book re-anchored on {source.value} snapshot {anchor_id} after {at}"
        gap = self._gap(GapKind.RESYNC, broken[0], anchor_id, broken[1], anchor_time, now, reason)
        return Decision(True, gaps=(gap,))

    def _stream_snapshot(self, diff: DepthDiff) -> Decision:
        """An in-stream snapshot replaces the book and restarts the chain (Bybit, OKX)."""
        gaps: list[Gap] = []
        pending, self._pending = self._pending, None
        self._reconnected = False
        if pending is not None and (
            pending.kind is GapKind.CONSUMER_OVERLOAD
            # after a reconnect, a snapshot at another id than the last one seen means
            # updates were missed in between (at the same id: nothing was lost)
            or (self._last_id is not None and diff.last_update_id != self._last_id)
        ):
            gaps.append(self._break_gap(diff, pending, self._last_id))
            self._note_broken()
        self._advance(diff)
        self._requested = False
        if self.book is not None:
            self.book.reset(diff.bids, diff.asks, diff.last_update_id)
        self._buffer.clear()
        self.state = BookState.SYNCED
        self._book_id = diff.last_update_id
        self._book_time = diff.event_time
        d = self._resynced(
            diff.last_update_id, diff.event_time, diff.receive_time, SnapshotSource.STREAM
        )
        gaps.extend(d.gaps)
        return Decision(True, gaps=tuple(gaps)) if gaps else RECORD

    def _note_broken(self) -> None:
        # only a synced book can be "re-synced"; an earlier break's record is kept
        if self.state is BookState.SYNCED and self._broken is None:
            self._broken = (self._book_id, self._book_time)
        self.state = BookState.WAITING
        self._anchor = None
        self._buffer.clear()

    def _break_gap(self, diff: DepthDiff, pending: StreamEvent | None, last: int | None) -> Gap:
        self.counters.breaks += 1
        if pending is not None:
            kind = pending.kind
            reason = pending.reason or f"{kind.value} before this diff"
            if pending.dropped:  # the count is written here only: merged markers add up
                reason += f"; dropped {pending.dropped} messages"
        elif last is not None and diff.last_update_id <= last:
            # out of order: the row spans the late diff up to the newest id seen, ids and
            # times ascending (the late diff's own ids after the newest id read backwards)
            before = diff.prev_update_id
            times = sorted(t for t in (diff.event_time, self._last_time) if t is not None)
            return self._gap(
                GapKind.SEQUENCE_BREAK,
                before if before is not None else diff.first_update_id - 1,
                last,
                times[0] if times else None,
                times[-1] if times else None,
                diff.receive_time,
                f"out of order: updates {diff.first_update_id}..{diff.last_update_id} came "
                f"after {last}",
            )
        else:
            kind = GapKind.SEQUENCE_BREAK
            reason = f"prev_update_id {diff.prev_update_id} != previous last_update_id {last}"
        return self._gap(
            kind,
            last,
            diff.first_update_id,
            self._last_time,
            diff.event_time,
            diff.receive_time,
            reason,
        )

    def _break(
        self, diff: DepthDiff, pending: StreamEvent | None, last: int, *, advance: bool
    ) -> Decision:
        """The stream broke at `diff`: record the gap, start waiting from this diff."""
        gap = self._break_gap(diff, pending, last)
        self._note_broken()
        if advance:  # not advanced: an out-of-order (older) diff, neither chained nor buffered
            self._advance(diff)
            self._buffer.append(diff)
        d = self._request()
        return Decision(True, gaps=(gap,), need_snapshot=d.need_snapshot)

    def _gap(
        self,
        kind: GapKind,
        last_good: int | None,
        first_after: int | None,
        start: int | None,
        end: int | None,
        now: int,
        reason: str,
    ) -> Gap:
        return Gap(
            exchange=self.exchange,
            market=self.market,
            symbol=self.symbol,
            kind=kind,
            last_good_id=last_good,
            first_id_after=first_after,
            start_time=start,
            end_time=end,
            reason=reason,
            detected_at=now,
        )
