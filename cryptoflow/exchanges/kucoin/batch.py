"""KuCoin REST depth bodies read many at once in polars (the snapshot lane, `pipeline/bodies.py`).

The KuCoin counterpart of `pipeline/batch.read_snapshot_bodies` (Binance), with the same
exactness rule: only the exact byte shape KuCoin's docs show (and our simulator sends) is
read,

    {"code":"200000","data":{"symbol":"<str>","sequence":<int>,"asks":[<levels>],
     "bids":[<levels>],"ts":<int>}}

(one line), where each level is exactly two JSON numbers `[price,size]`, checked in full
before anything is used: keys in that order, each once, no whitespace between tokens,
`code` exactly the string "200000", `sequence` and `ts` JSON integers that fit in Int64,
`ts` (in ms, `_ns_to_ms`) within the time window the parser demands
(`batch.times_in_window`), no backslash and no control character in `symbol`. A level
number (`_NUM`) is a plain non-negative JSON number: digits, optionally a `.` and
digits; no sign, no exponent, at most 100 digits before the point (`json.loads` refuses
integers of more than `sys.get_int_max_str_digits()` digits, never less than 640, which
the checked parser reports as malformed). Anything else (an error code, a level of one
or three elements, a string where a number belongs, a negative number, an exponent, an
extra or missing key, pretty-printed JSON, an escape, a truncated body) makes the reader
return None and the caller parses each body with the checked parser, which decides what
is malformed.

Numbers. `parse.parse_rest_snapshot` reads the body with `json.loads(parse_float=str)`
and gives each price and size as `rules.canonical_decimal` of its JSON text (an integer
as `str(int(text))`, the same thing). On the texts `_NUM` admits that is: an integer
as it is (no sign, no leading zero); a decimal with its trailing zeros after the point
removed, and the point too when nothing is left after it ("5000.0" -> "5000", "0.0" ->
"0", "27690.50" -> "27690.5"): `format(Decimal(t), "f")` gives `t` back for such a text,
as JSON has no leading zeros, and `canonical_decimal` then strips exactly that. Here the
same edit is done on each level array's text before it is split (`_canonical`: one regex
replacement that sees a number's end as the `,` or `]` after it), so the rows need no
per-value pass. `tests/test_kucoin_bodies.py` compares it with `canonical_decimal` on
generated texts, one by one.

Rows: per body its bids then its asks (as `normalize._snapshot_rows`, although KuCoin
sends the asks first), bodies in order. As `parse_rest_snapshot`: timestamp =
`rules.ns_to_ms(data.ts)`, transaction_time null, last_update_id = `data.sequence`.
`symbol` is checked, not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from cryptoflow.pipeline.batch import (
    _INT,
    _STR,
    SnapshotBatch,
    match_bodies,
    snapshot_batch,
    times_in_window,
)

#: a level's price or size: a JSON number without sign or exponent (see the docstring)
_NUM = r"(?:0|[1-9][0-9]{0,99})(?:\.[0-9]+)?"
_LEVEL = rf"{_NUM},{_NUM}\]"
#: a fraction with trailing zeros and the `,` or `]` after it (see `_canonical`)
_ZEROS = r"(?:\.0+|(\.[0-9]*[1-9])0+)([,\]])"


def _book_side(name: str) -> str:
    """The inside of a level array: zero or more `[price,size]` joined by `,`. Group
    `name` is all of it, `[p,q],[p,q]` (null for an empty array): it starts at the first
    `[` (decided by the next byte: `[` or the array's closing `]`), so the regex stays
    one-pass."""
    return rf"(?<{name}>\[{_LEVEL}(?:,\[{_LEVEL})*)?"


#: a `GET /api/v1/level2/snapshot` success body (asks first, as KuCoin sends them)
_BODY = (
    rf'^\{{"code":"200000","data":\{{"symbol":"{_STR}","sequence":(?<sequence>{_INT}),'
    rf'"asks":\[{_book_side("a")}\],"bids":\[{_book_side("b")}\],"ts":(?<ts>{_INT})\}}\}}$'
)


def _canonical(levels: pl.Expr) -> pl.Expr:
    """A level array's text `[p,q],[p,q]` -> `p,q,p,q` with every number in
    `rules.canonical_decimal` form.

    A number ends just before a `,` or `]` and only numbers hold a `.`, so a `.` and the
    digits after it up to a `,` or `]` are exactly one number's fraction. `_ZEROS` finds
    each fraction that ends in `0`: all zeros (first branch), it is replaced by nothing
    (the point goes too: "5000.0" -> "5000"); else (second branch) by its part up to the
    last non-zero digit ("27690.50" -> "27690.5"); the `,` or `]` is put back. One regex
    for both: the search, which stops at every `.`, is most of the cost."""
    return (
        levels.str.replace_all(_ZEROS, "${1}${2}")
        .str.strip_chars("[]")
        .str.replace_all("],[", ",", literal=True)
    )


def _tokens(levels: pl.Expr) -> pl.Expr:
    """A level array's text -> its numbers, canonical, 2 per level (for `batch._rows`)."""
    return _canonical(levels).str.split(",")


def _ns_to_ms(ts: pl.Expr) -> pl.Expr:
    """`rules.ns_to_ms`: ns above 1e17, µs above 1e14, else already ms; floored."""
    return (
        pl.when(ts > 10**17).then(ts // 1_000_000).when(ts > 10**14).then(ts // 1_000).otherwise(ts)
    )


def read_snapshot_bodies(
    bodies: Sequence[bytes | str], receive_ns: Sequence[int], source: str
) -> SnapshotBatch | None:
    """Raw `/api/v1/level2/snapshot` bodies -> SnapshotBatch (heads `lastUpdateId,
    event_time, T` as the Binance reader's: `sequence`, `ts` in ms, null), or None when a
    body is not in the exact wire shape (see the module docstring)."""
    matched = match_bodies(bodies, receive_ns, _BODY, ["sequence", "ts"], [])
    if matched is None or not times_in_window(matched[0], _ns_to_ms(pl.col("ts"))):
        return None
    m, recv = matched
    heads = m.select(
        pl.col("sequence").alias("lastUpdateId"),
        _ns_to_ms(pl.col("ts")).alias("event_time"),
        pl.lit(None, pl.Int64).alias("T"),
    )
    return snapshot_batch(m, heads, recv, source, tokens=2, qty=1, split=_tokens)
