"""Poll snapshots parsed at the writer's flush, a whole flush of bodies in one call.

Why: parsing a 2 x 1000-level REST body on arrival makes ~6,000 Python objects (orjson
lists and strings), flattens them into column lists, and the writer then builds a polars
frame from those lists: all on the event loop, ~3 ms a body on this machine. A poll
snapshot of a symbol whose book is in sync is only stored, so nothing needs its levels
before the flush. The normalizer hands such bodies on unparsed (`BodyBatch`); the
writer keeps the bytes and, in its flush thread, reads all of a buffer's bodies in one
polars call (`SnapshotCodec.read`, e.g. `pipeline/batch.read_snapshot_bodies`): no
Python object per level, the fixed cost of the call spread over the flush. See
docs/benchmarks.md ("snapshot lane").

Exactness: `read` accepts only the exact wire shape and returns None for anything else;
then, and when a price or size is not a number, each body goes through the venue's
checked parser (`SnapshotCodec.parse`, the same as the simple path) and only the bodies
it rejects are left out, each named in the returned messages. Either way the rows equal
what `parse_rest_snapshot` + `Normalizer.feed` + `frame_from_columns` make
(tests/test_bodies.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import attrs
import polars as pl

from cryptoflow.errors import ExchangeError
from cryptoflow.models import Dataset, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.pipeline.batch import SnapshotBatch


@attrs.frozen
class SnapshotCodec:
    """How one venue's REST depth bodies are read (see the module docstring)."""

    #: one body -> DepthSnapshot, checked; raises MalformedMessage (the simple path) or
    #: another ExchangeError (a venue error code the fetch did not catch): left out
    parse: Callable[[bytes, str, int, SnapshotSource], DepthSnapshot]
    #: many bodies -> SnapshotBatch, or None when one is not in the exact wire shape
    read: Callable[[Sequence[bytes], Sequence[int], str], SnapshotBatch | None]
    #: the levels a well-formed body holds: buffer accounting before the body is parsed
    count_levels: Callable[[bytes], int]


@attrs.define(slots=True)
class BodyBatch:
    """Unparsed poll snapshots of one symbol, for the writer (next to `RowBatch`)."""

    dataset: ClassVar[Dataset] = Dataset.SNAPSHOTS
    exchange: str
    market: str
    symbol: str
    bodies: list[SnapshotBody]
    #: rows the bodies hold if well formed (`count_levels`); the flush counts exactly
    rows: int
    codec: SnapshotCodec
    multiplier: str = "1"
    #: told (message) of each body left out at the flush, after the writer logs it
    on_rejected: Callable[[str], None] | None = None

    @property
    def nbytes(self) -> int:
        return sum(len(b.body) for b in self.bodies)


def frame_from_bodies(
    exchange: str,
    market: str,
    symbol: str,
    multiplier: str,
    codec: SnapshotCodec,
    bodies: Sequence[SnapshotBody],
) -> tuple[pl.DataFrame | None, list[str]]:
    """Bodies -> (their rows in the stored schema, None if there are none; one message per
    body that was left out because its venue parser rejects it)."""
    from cryptoflow.pipeline.normalize import SNAPSHOT_COLUMNS, frame_from_wire

    sources = {b.source for b in bodies}
    if len(sources) == 1:
        try:
            parsed = codec.read(
                [b.body for b in bodies], [b.receive_time for b in bodies], sources.pop().value
            )
            if parsed is not None:
                wire = parsed.rows.select(SNAPSHOT_COLUMNS)
                return frame_from_wire(
                    Dataset.SNAPSHOTS, exchange, market, symbol, wire, multiplier
                ), []
        except pl.exceptions.PolarsError:
            pass  # e.g. a price that is not a number: find the body one by one
    return _one_by_one(exchange, market, symbol, multiplier, codec, bodies)


def _one_by_one(
    exchange: str,
    market: str,
    symbol: str,
    multiplier: str,
    codec: SnapshotCodec,
    bodies: Sequence[SnapshotBody],
) -> tuple[pl.DataFrame | None, list[str]]:
    from cryptoflow.pipeline.normalize import SNAPSHOT_COLUMNS, _snapshot_rows, frame_from_columns

    frames: list[pl.DataFrame] = []
    rejected: list[str] = []
    for b in bodies:
        try:
            snap = codec.parse(b.body, b.symbol, b.receive_time, b.source)
            cols: dict[str, list] = {name: [] for name in SNAPSHOT_COLUMNS}
            if not _snapshot_rows(cols, snap, snap.last_update_id, b.source):
                continue
            frames.append(
                frame_from_columns(Dataset.SNAPSHOTS, exchange, market, symbol, cols, multiplier)
            )
        except ExchangeError as exc:  # MalformedMessage; or a venue error code in a body
            rejected.append(str(exc))
        except (pl.exceptions.PolarsError, TypeError, OverflowError) as exc:
            # a price or size that is not a number: the venue parser let it through, the
            # stored types cannot hold it (ids beyond Int64 are refused by the parsers
            # now, `fields.INT64_MAX`; this stays the backstop for any value)
            rejected.append(f"{exchange}/{symbol}: a value does not fit its column ({exc})")
    if not frames:
        return None, rejected
    return (frames[0] if len(frames) == 1 else pl.concat(frames)), rejected
