"""What the body-reader tests of every venue share: the simple path to compare with."""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from cryptoflow.book.sync import SyncRules
from cryptoflow.models import Dataset, DepthSnapshot, SnapshotBody
from cryptoflow.pipeline.batch import SnapshotBatch
from cryptoflow.pipeline.normalize import Normalizer, frame_from_columns


def simple_frame(
    rules: SyncRules,
    parse: Callable[..., DepthSnapshot],
    items: list[SnapshotBody],
    multiplier: str = "1",
) -> pl.DataFrame:
    """The simple path: parse each body on arrival, normalize, one frame from the lists
    (what the collector stored before bodies were read at the flush)."""
    exchange, market, symbol = items[0].exchange, items[0].market, items[0].symbol
    norm = Normalizer({exchange: rules})
    cols: dict[str, list] = {}
    for b in items:
        snap = parse(b.body, b.symbol, b.receive_time, b.source)
        for rows in norm.feed_many([snap]).batches:
            for name, values in rows.columns.items():
                cols.setdefault(name, []).extend(values)
    return frame_from_columns(Dataset.SNAPSHOTS, exchange, market, symbol, cols, multiplier)


def read_batch(
    reader: Callable[..., SnapshotBatch | None], items: list[SnapshotBody]
) -> SnapshotBatch | None:
    """`reader` (a venue's `read_snapshot_bodies`) on the bodies of `items`."""
    return reader([b.body for b in items], [b.receive_time for b in items], items[0].source.value)
