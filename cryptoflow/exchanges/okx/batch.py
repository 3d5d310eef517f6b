"""OKX REST depth bodies read many at once in polars (the snapshot lane, `pipeline/bodies.py`).

The OKX counterpart of `pipeline/batch.read_snapshot_bodies` (Binance), with the same
exactness rule: only the exact byte shape OKX (and our simulator) sends is read,

    {"code":"0","msg":"<str>","data":[{"asks":[<levels>],"bids":[<levels>],"ts":"<int>"(,"seqId":<int>)?}]}

where each level is exactly four JSON strings `["px","sz","<deprecated>","<orders>"]`,
checked in full before anything is used: keys in that order, each once, no whitespace
between tokens, `code` exactly "0", exactly one book in `data`, `ts` a string of a JSON
integer, `seqId` a JSON integer (or absent), no backslash and no control character in
any string (so every string is its bytes verbatim and a `"` only ever delimits one),
integers that fit in Int64, `ts` within the time window the parser demands
(`batch.times_in_window`). On that subset `parse.parse_rest_snapshot` +
`Normalizer` give exactly these rows. Anything else (an error code, a level of 2, 3 or
5 elements, a number where a string belongs, an extra or missing key, pretty-printed
JSON, an escape, a truncated body, an empty `data`, `seqId` as a string or null) makes
the reader return None and the caller parses each body with the checked parser, which
decides what is malformed.

Rows: per body its bids then its asks (as `normalize._snapshot_rows`, although OKX sends
the asks first), bodies in order. As `parse_rest_snapshot`: timestamp = `ts`,
transaction_time null, last_update_id = `seqId`, else `rules.NO_SEQ_ID`; of each level
only price and size are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from cryptoflow.exchanges.okx import rules
from cryptoflow.pipeline.batch import (
    _INT,
    _STR,
    SnapshotBatch,
    match_bodies,
    snapshot_batch,
    times_in_window,
)

#: one level's inside after its `["`: four strings; split at `"` it is 8 tokens:
#: px `,` sz `,` deprecated `,` orders `],[` (`]` for the last level of an array)
_LEVEL = rf'{_STR}","{_STR}","{_STR}","{_STR}"\]'
_TOKENS = 8


def _book_side(name: str) -> str:
    """The inside of a level array: zero or more 4-string levels joined by `,`. Group
    `name` is everything after the first `["` (null for an empty array)."""
    return rf'(?:\["(?<{name}>{_LEVEL}(?:,\["{_LEVEL})*))?'


#: a `GET /api/v5/market/books[-full]` success body (asks first, as OKX sends them)
_BODY = (
    rf'^\{{"code":"0","msg":"{_STR}","data":\[\{{'
    rf'"asks":\[{_book_side("a")}\],"bids":\[{_book_side("b")}\],'
    rf'"ts":"(?<ts>{_INT})"(?:,"seqId":(?<seq>{_INT}))?\}}\]\}}$'
)


def read_snapshot_bodies(
    bodies: Sequence[bytes | str], receive_ns: Sequence[int], source: str
) -> SnapshotBatch | None:
    """Raw `/api/v5/market/books[-full]` bodies -> SnapshotBatch (heads `lastUpdateId,
    event_time, T` as the Binance reader's), or None when a body is not in the exact
    wire shape (see the module docstring)."""
    matched = match_bodies(bodies, receive_ns, _BODY, ["ts"], ["seq"])
    if matched is None or not times_in_window(matched[0], pl.col("ts")):
        return None
    m, recv = matched
    heads = m.select(
        pl.col("seq").fill_null(rules.NO_SEQ_ID).alias("lastUpdateId"),
        pl.col("ts").alias("event_time"),
        pl.lit(None, pl.Int64).alias("T"),
    )
    return snapshot_batch(m, heads, recv, source, tokens=_TOKENS)
