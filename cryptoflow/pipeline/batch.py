"""Batch fast path: many Binance frames (or REST snapshot bodies) parsed at once in polars.

The simple path (`exchanges/binance/parse.py` + `Normalizer.feed_many`) makes a Python
dict per frame and a list and two strings per level, and spends most of its time in
`orjson.loads` and in the garbage collector walking those lists. Here a batch of raw
frames becomes one polars String column and is parsed with column expressions (one Rust
regex per frame, then one string split), so no Python object is made per level: only
the per-frame header (ids, times, symbol: about 1 % of the values) comes back to Python,
for the book-sync state machine, and the rows are built with `explode`.

Exactness. The fast path reads only the exact wire shape Binance sends, checked in full
before anything is used: every frame must match, from its first byte to its last, one
regex that spells that shape out (`_DIFF_WRAPPED`, `_DIFF_BARE`, `_SNAPSHOT`):

- the keys in Binance's order, each once, ids and times as JSON integers (no fraction,
  exponent or leading zero), `T` an integer or null, `s` a string, `b`/`a` arrays of
  `["<str>","<str>"]` pairs and nothing else, no whitespace between tokens;
- every string's content (`_STR`) without `"`, backslash or control character, so every
  JSON string is its bytes verbatim (nothing to unescape) and a `"` only ever delimits
  a string. Outside strings the grammar has only fixed ASCII punctuation, letters and
  digits, so this is the same as "no backslash and no control character anywhere";
- integers fit in Int64 (the captured digits are cast, a failed cast refuses the batch);
- every time the checked parser reads (`E`, `T`; a snapshot's `E`, `T`) lies in the
  window `exchanges/fields.TIME_MIN_MS`.. (`times_in_window`), as the parser demands.

That is a subset of JSON on which `orjson.loads` + `parse_ws_message` give exactly these
values. Anything else (a control frame, an extra field, pretty-printed JSON, an escape,
a number where a string belongs, a malformed frame) makes the reader return None and the
caller runs the simple path for that batch, which decides what is malformed.

The match also captures the header fields and, per side, the level array's text after
its first `["`: `p","q"],["p","q"]`. As a `"` there only delimits strings, that text
split at `"` is exactly 4 tokens per level: price, `,`, quantity, and `],[` (`]` after
the last); the rows are the tokens 4j and 4j + 2 (`_rows`). No other check is needed,
and no other pass over the levels is made.

Speed. The regexes are written so that at every choice the next byte decides which way
to go (the optional `E` / `T` of a snapshot as `,"(?:E":..,")?(?:T":..,")?bids"`, not
`(?:,"E":..)?(?:,"T":..)?,"bids"`): for such a "one-pass" regex the Rust `regex` crate
fills the capture groups in one scan (its one-pass DFA); the other spelling of the same
language takes ~10x longer to capture on a 2,000-level body. All steps are eager
DataFrame calls, which run on the in-memory engine: polars >= 2 runs
`LazyFrame.collect()` on the streaming engine by default, about 1.5x slower on plans
this small.

The first attempt here used `pl.read_ndjson` with an explicit schema (the hint in issue
9): it is correct with the same guards, but measured only 1.5x `orjson.loads` on this
machine and needs more guards (it coerces numbers to strings, keeps the first of
duplicated keys); see docs/benchmarks.md. The next checked the same grammar in pieces
(a scan for backslashes and control characters, splits at `,"b":[` and `],"a":[`, a
regex per level array) and split the levels at `"],["` and then at `","`: this one
accepts the same frames in about half the time, and gives the same rows but where a
price or quantity is exactly `],[` (which that split cut in the wrong place).
`tests/test_fastpath.py` compares the fast and simple paths row for row on the
recordings, on damaged copies and on damaged and unusual level arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import polars as pl

from cryptoflow.exchanges.fields import TIME_MAX_MS, TIME_MIN_MS

#: the content of a JSON string read here: no quote, no backslash, no control character
_STR = r'[^"\\\x00-\x1f]*'
_INT = r"-?(?:0|[1-9][0-9]*)"


def _levels(name: str) -> str:
    """The inside of a level array: zero or more `["<str>","<str>"]` pairs, joined by `,`.
    Group `name` is everything after the first `["` (null for an empty array), so that
    it splits at `"` into 4 tokens per pair: `p`, `,`, `q`, `],[` (`]` for the last)."""
    pair = rf'{_STR}","{_STR}"\]'
    return rf'(?:\["(?<{name}>{pair}(?:,\["{pair})*))?'


#: a depthUpdate event (bare; the combined-stream wrapper adds a prefix and a `}`)
_DIFF = (
    rf'\{{"e":"depthUpdate","E":(?<E>{_INT}),"T":(?:(?<T>{_INT})|null),"s":"(?<s>{_STR})",'
    rf'"U":(?<U>{_INT}),"u":(?<u>{_INT}),"pu":(?<pu>{_INT}),'
    rf'"b":\[{_levels("b")}\],"a":\[{_levels("a")}\]\}}'
)
_DIFF_BARE = rf"^{_DIFF}$"
_DIFF_WRAPPED = rf'^\{{"stream":"{_STR}","data":{_DIFF}\}}$'
#: a REST depth body; `,"E":..` and `,"T":..` are optional (old responses), written as
#: `,"(?:E":..,")?(?:T":..,")?bids"` so that every choice is decided by the next byte
_SNAPSHOT = (
    rf'^\{{"lastUpdateId":(?<lastUpdateId>{_INT}),"(?:E":(?<E>{_INT}),")?(?:T":(?<T>{_INT}),")?'
    rf'bids":\[{_levels("b")}\],"asks":\[{_levels("a")}\]\}}$'
)


def _text(frames: Sequence[bytes | str]) -> pl.Series | None:
    """The frames as one String column; None if one is not UTF-8 text."""
    try:
        raw = [f if type(f) is bytes else f.encode() for f in frames]  # type: ignore[union-attr]
        return pl.Series("f", raw, dtype=pl.Binary).cast(pl.String)
    except Exception:  # not bytes/str, or invalid UTF-8: the simple path reports it
        return None


def _match(
    text: pl.Series, pattern: str, required: list[str], optional: list[str]
) -> pl.DataFrame | None:
    """One row per frame: the named groups of `pattern`, the integers `required` and
    `optional` as Int64; None unless every frame matched and every integer present fits
    in Int64 (a frame that did not match has null groups: its `required` ones too)."""
    ints = [pl.col(c).cast(pl.Int64, strict=False) for c in (*required, *optional)]
    fits = [pl.col(c).cast(pl.Int64, strict=False).is_not_null() for c in required] + [
        pl.col(c).is_null() | pl.col(c).cast(pl.Int64, strict=False).is_not_null() for c in optional
    ]
    df = (
        pl.DataFrame([text])
        .select(pl.col("f").str.extract_groups(pattern))
        .unnest("f")
        .with_columns(*ints, pl.all_horizontal(fits).alias("_ok"))
    )
    return df if df.get_column("_ok").all() else None


def times_in_window(groups: pl.DataFrame, *times: pl.Expr) -> bool:
    """Whether every non-null value of `times` (ms, from `_match`'s groups) lies in
    [`fields.TIME_MIN_MS`, `fields.TIME_MAX_MS`): the checked parsers refuse any other
    (`fields.check_time`), so a reader returns None then and they decide."""
    ok = [t.is_null() | t.is_between(TIME_MIN_MS, TIME_MAX_MS, closed="left") for t in times]
    return bool(groups.select(pl.all_horizontal(ok)).to_series().all())


def _quoted(text: pl.Expr) -> pl.Expr:
    """A level array's inside `["p","q"],["p","q"]` -> its tokens, split at `"`."""
    return text.str.split('"')


def _rows(
    levels: pl.DataFrame,
    head: dict[str, pl.Series],
    *,
    level: bool,
    source: str | None = None,
    tokens: int = 4,
    qty: int = 2,
    split: Callable[[pl.Expr], pl.Expr] = _quoted,
) -> pl.DataFrame:
    """One row per level: `_i` (message index), the `head` columns (a value per message)
    repeated, `side`, (`level`,) `price`, `raw_quantity` (, `source`); bids then asks of
    each message, in message order (as the simple path's `list.extend`).

    `levels` has the groups `b` and `a` of `_levels` of every message (`_match` checked
    them). Segment 2m is message m's bids, 2m + 1 its asks; `split` turns a segment's
    text into `tokens` tokens per level (at `"`: 4 for `["p","q"]`, 8 for OKX's four
    strings; KuCoin's numbers split at `,` into 2), so in the tokens of all segments, in
    segment order, the row j's price and quantity are tokens `tokens`·j and
    `tokens`·j + `qty`. A null (empty) segment is left out before `explode` (which would
    give it a null row)."""
    k = pl.int_range(2 * pl.len(), dtype=pl.UInt32)
    text = pl.concat_list("b", "a").explode()  # segment k's text
    keep = text.is_not_null()
    segments = levels.select(split(text.filter(keep)).alias("tok"), k.filter(keep).alias("seg"))
    seg = pl.col("seg").gather_every(tokens)  # one per row
    i = (seg // 2).alias("_i")
    exprs = [
        i,
        *(pl.lit(v).gather(i).alias(name) for name, v in head.items()),
        pl.when(seg % 2 == 0).then(pl.lit("bid")).otherwise(pl.lit("ask")).alias("side"),
    ]
    if level:  # the row's index minus the index of its segment's first row
        n = pl.col("tok").list.len() // tokens
        segments = segments.with_columns((n.cum_sum() - n).cast(pl.Int64).alias("start"))
        first = pl.col("start").gather_every(tokens)
        exprs.append((pl.int_range(pl.len() // tokens, dtype=pl.Int64) - first).alias("level"))
    exprs += [
        pl.col("tok").gather_every(tokens, 0).alias("price"),
        pl.col("tok").gather_every(tokens, qty).alias("raw_quantity"),
    ]
    if source is not None:
        exprs.append(pl.lit(source, pl.String).alias("source"))
    return segments.explode("tok").select(exprs)


@attrs.frozen
class DiffBatch:
    """A batch of diff frames read at once."""

    #: one row per frame: `s, E, T, U, u, pu`
    heads: pl.DataFrame
    #: one row per level: `_i` (frame index) + the delta wire columns but receive_time
    rows: pl.DataFrame


def read_diff_frames(frames: Sequence[bytes | str]) -> DiffBatch | None:
    """Raw `depthUpdate` frames (all combined-stream wrapped, or all bare) -> DiffBatch,
    or None when a frame is not in the exact wire shape (see the module docstring)."""
    text = _text(frames) if frames else None
    if text is None:
        return None
    wrapped = text[0].startswith('{"stream":')
    m = _match(text, _DIFF_WRAPPED if wrapped else _DIFF_BARE, ["E", "U", "u", "pu"], ["T"])
    if m is None or not times_in_window(m, pl.col("E"), pl.col("T")):
        return None
    heads = m.select("s", "E", "T", "U", "u", "pu")
    head = {
        "timestamp": heads["E"],
        "transaction_time": heads["T"],
        "first_update_id": heads["U"],
        "last_update_id": heads["u"],
        "prev_update_id": heads["pu"],
    }
    return DiffBatch(heads, _with_markers(_rows(m, head, level=False), m, head))


def _with_markers(rows: pl.DataFrame, m: pl.DataFrame, head: dict[str, pl.Series]) -> pl.DataFrame:
    """`rows` and one marker row (side, price, raw_quantity null) for each frame with no
    level whose ids move the chain on, in frame order: as `normalize._delta_rows`."""
    empty = pl.col("b").is_null() & pl.col("a").is_null() & (pl.col("pu") != pl.col("u"))
    idx = m.select(pl.int_range(pl.len(), dtype=pl.UInt32).filter(empty).alias("_i"))
    if idx.is_empty():
        return rows
    i = idx.get_column("_i")
    markers = pl.DataFrame(
        [i, *(v.gather(i).alias(name) for name, v in head.items())]
    ).with_columns(
        pl.lit(None, pl.String).alias("side"),
        pl.lit(None, pl.String).alias("price"),
        pl.lit(None, pl.String).alias("raw_quantity"),
    )
    return pl.concat([rows, markers.select(rows.columns)]).sort("_i", maintain_order=True)


@attrs.frozen
class SnapshotBatch:
    #: one row per body: `lastUpdateId, event_time, T`
    heads: pl.DataFrame
    #: one row per level: `_i` (body index) + the snapshot wire columns
    rows: pl.DataFrame


def match_bodies(
    bodies: Sequence[bytes | str],
    receive_ns: Sequence[int],
    pattern: str,
    required: list[str],
    optional: list[str],
) -> tuple[pl.DataFrame, pl.Series] | None:
    """REST bodies every one of which `pattern` matches whole -> (`_match`'s groups, the
    receive times as a column), or None: the first step of every venue's body reader."""
    text = _text(bodies) if bodies else None
    if text is None or len(receive_ns) != len(bodies):
        return None
    m = _match(text, pattern, required, optional)
    if m is None:
        return None
    return m, pl.Series("receive_time", receive_ns, dtype=pl.Int64)


def snapshot_batch(
    groups: pl.DataFrame,
    heads: pl.DataFrame,
    recv: pl.Series,
    source: str,
    **split: Any,
) -> SnapshotBatch:
    """The SnapshotBatch of matched bodies from their heads (`lastUpdateId, event_time,
    T`, a row a body, the names every reader gives them) and receive times; `split`
    goes to `_rows` (levels other than `["p","q"]`): the last step of every body reader."""
    head = {
        "timestamp": heads["event_time"],
        "transaction_time": heads["T"],
        "receive_time": recv,
        "last_update_id": heads["lastUpdateId"],
    }
    return SnapshotBatch(heads, _rows(groups, head, level=True, source=source, **split))


def read_snapshot_bodies(
    bodies: Sequence[bytes | str], receive_ns: Sequence[int], source: str
) -> SnapshotBatch | None:
    """Raw `GET /fapi/v1/depth` bodies -> SnapshotBatch, or None when a body is not in
    the exact wire shape (`{"lastUpdateId":..,"E":..,"T":..,"bids":[..],"asks":[..]}`,
    E and T optional as in old responses)."""
    matched = match_bodies(bodies, receive_ns, _SNAPSHOT, ["lastUpdateId"], ["E", "T"])
    if matched is None or not times_in_window(matched[0], pl.col("E"), pl.col("T")):
        return None
    m, recv = matched
    heads = m.select(
        "lastUpdateId",
        # as `parse_rest_snapshot`: E, else T, else the receive time in ms
        pl.coalesce("E", "T", pl.lit(recv) // 1_000_000).alias("event_time"),
        "T",
    )
    return snapshot_batch(m, heads, recv, source)
