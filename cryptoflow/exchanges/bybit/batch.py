"""Bybit REST depth bodies read many at once in polars (the snapshot lane, `pipeline/bodies.py`).

The Bybit counterpart of `pipeline/batch.read_snapshot_bodies` (Binance), with the same
exactness rule: only the exact byte shape Bybit (and our simulator) sends is read,

    {"retCode":0,"retMsg":"<str>","result":{"s":"<str>","b":[<levels>],"a":[<levels>],
     "ts":<int>,"u":<int>,"seq":<int>(,"cts":<int>)?},"retExtInfo":{},"time":<int>}

(one line; the order of the Bybit v5 docs' response example and of `sim/bybit.py`), where
each level is exactly two JSON strings `["price","size"]`, checked in full before anything
is used: keys in that order, each once, no whitespace between tokens, `retCode` exactly
`0`, `retExtInfo` exactly `{}`, ids and times JSON integers (no fraction, exponent or
leading zero) that fit in Int64, the times the parser reads (`ts`, else `time`; `cts`)
within the window it demands (`batch.times_in_window`), no backslash and no control
character in any string (so every string is its bytes verbatim and a `"` only ever
delimits one). `ts` may be absent
and `cts` may be absent, as `parse_rest_snapshot` allows. On that subset
`parse.parse_rest_snapshot` + `Normalizer` give exactly these rows. Anything else (a
non-zero `retCode`, an extra or missing key, pretty-printed JSON, an escape, a number
where a string belongs, a level of one or three elements, `ts`/`cts` as a string or null,
a truncated body) makes the reader return None and the caller parses each body with the
checked parser, which decides what is malformed.

Rows: per body its bids then its asks, bodies in order. As `parse_rest_snapshot`:
timestamp = `result.ts`, else the envelope `time`; transaction_time = `result.cts` (null
when absent); last_update_id = `result.u`. `s`, `seq` and `retMsg` are checked, not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from cryptoflow.pipeline.batch import (
    _INT,
    _STR,
    SnapshotBatch,
    _levels,
    match_bodies,
    snapshot_batch,
    times_in_window,
)

#: a `GET /v5/market/orderbook` success body; `"ts":..,` is optional, written as
#: `"(?:ts":..,")?u"` so that every choice is decided by the next byte
_BODY = (
    rf'^\{{"retCode":0,"retMsg":"{_STR}","result":\{{"s":"{_STR}",'
    rf'"b":\[{_levels("b")}\],"a":\[{_levels("a")}\],'
    rf'"(?:ts":(?<ts>{_INT}),")?u":(?<u>{_INT}),"seq":(?<seq>{_INT})(?:,"cts":(?<cts>{_INT}))?'
    rf'\}},"retExtInfo":\{{\}},"time":(?<time>{_INT})\}}$'
)


def read_snapshot_bodies(
    bodies: Sequence[bytes | str], receive_ns: Sequence[int], source: str
) -> SnapshotBatch | None:
    """Raw `/v5/market/orderbook` bodies -> SnapshotBatch (heads `lastUpdateId, event_time,
    T` as the Binance reader's: `u`, `ts` else `time`, `cts`), or None when a body is not
    in the exact wire shape (see the module docstring)."""
    matched = match_bodies(bodies, receive_ns, _BODY, ["u", "seq", "time"], ["ts", "cts"])
    # as `parse_rest_snapshot`: `time` is read (and must be a sane time) only without `ts`
    if matched is None or not times_in_window(matched[0], pl.coalesce("ts", "time"), pl.col("cts")):
        return None
    m, recv = matched
    heads = m.select(
        pl.col("u").alias("lastUpdateId"),
        # as `parse_rest_snapshot`: `result.ts`, else the envelope `time`
        pl.coalesce("ts", "time").alias("event_time"),
        pl.col("cts").alias("T"),
    )
    return snapshot_batch(m, heads, recv, source)
