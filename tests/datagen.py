"""Write small, realistic stored datasets for the data-tool tests.

The layout, file names and columns are the ones the writer produces
(`<root>/<dataset>/exchange=/market=/symbol=/year=/month=/day=/hour=/<SYM>-<first_id>-
<last_id>-<first_ts>-<last_ts>.parquet`, schemas from `cryptoflow.models`), so the tools
are tested against the contract rather than against themselves. `generate` simulates a
book that evolves by diff messages with Binance-style ids (first/last/prev), takes a
snapshot every few seconds and flushes small files, optionally with a recorded gap.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import polars as pl

from cryptoflow.models import DELTA_SCHEMA, GAP_SCHEMA, SNAPSHOT_SCHEMA, Dataset

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ms(iso: str) -> int:
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return (dt - EPOCH) // timedelta(milliseconds=1)


def snapshot_rows(
    ts: int,
    last_update_id: int,
    bids: list[tuple[float, float]],
    asks: list[tuple[float, float]],
    *,
    exchange: str = "binance",
    market: str = "futures",
    symbol: str = "BTCUSDT",
    source: str = "poll",
    receive_us: int | None = None,
) -> list[dict]:
    """Rows of one snapshot; `bids`/`asks` in the order given (best first when correct).
    Received 5 ms after `ts` unless `receive_us` says when (µs)."""
    rows = []
    for side, levels in (("bid", bids), ("ask", asks)):
        for i, (price, qty) in enumerate(levels):
            rows.append(
                dict(
                    exchange=exchange, market=market, symbol=symbol, timestamp=ts,
                    transaction_time=ts,
                    receive_time=ts * 1000 + 5000 if receive_us is None else receive_us,
                    last_update_id=last_update_id, side=side, level=i, price=price,
                    quantity=qty, raw_quantity=qty, source=source,
                )
            )  # fmt: skip
    return rows


def delta_rows(
    ts: int,
    first: int,
    last: int,
    prev: int | None,
    changes: list[tuple[str | None, float | None, float | None]],
    *,
    exchange: str = "binance",
    market: str = "futures",
    symbol: str = "BTCUSDT",
    receive_us: int | None = None,
) -> list[dict]:
    """Rows of one diff message: `changes` are (side, price, quantity), 0 = remove;
    (None, None, None) is the marker row of a message that changed no level.
    Received 3 ms after `ts` unless `receive_us` says when (µs)."""
    recv = ts * 1000 + 3000 if receive_us is None else receive_us
    return [
        dict(
            exchange=exchange, market=market, symbol=symbol, timestamp=ts, transaction_time=ts,
            receive_time=recv, first_update_id=first, last_update_id=last,
            prev_update_id=prev, side=side, price=price, quantity=qty, raw_quantity=qty,
        )
        for side, price, qty in changes
    ]  # fmt: skip


def gap_rows(
    kind: str,
    last_good_id: int | None,
    first_id_after: int | None,
    start_time: int | None,
    end_time: int | None,
    *,
    exchange: str = "binance",
    market: str = "futures",
    symbol: str = "BTCUSDT",
    reason: str = "test",
) -> list[dict]:
    ts = end_time if end_time is not None else start_time
    return [
        dict(
            exchange=exchange, market=market, symbol=symbol, timestamp=ts, kind=kind,
            last_good_id=last_good_id, first_id_after=first_id_after, start_time=start_time,
            end_time=end_time, reason=reason, detected_at=(ts or 0) * 1000,
        )
    ]  # fmt: skip


_SCHEMAS = {
    Dataset.SNAPSHOTS: SNAPSHOT_SCHEMA,
    Dataset.DELTAS: DELTA_SCHEMA,
    Dataset.GAPS: GAP_SCHEMA,
}


def frame(dataset: Dataset, rows: list[dict]) -> pl.DataFrame:
    """Typed frame with exactly the stored schema (int ms/us -> Datetime)."""
    schema = _SCHEMAS[dataset]
    raw = pl.DataFrame(rows, infer_schema_length=None)
    cols = []
    for name, dtype in schema.items():
        col = pl.col(name) if name in raw.columns else pl.lit(None)
        if isinstance(dtype, pl.Datetime):
            col = col.cast(pl.Int64).cast(pl.Datetime(dtype.time_unit)).dt.replace_time_zone("UTC")
        cols.append(col.cast(dtype).alias(name))
    return raw.select(cols)


def write(root: Path, dataset: Dataset, rows: list[dict]) -> list[Path]:
    """Write rows as the writer would: one file per partition hour, deterministic names."""
    if not rows:
        return []
    df = frame(dataset, rows)
    ts = pl.col("timestamp")
    df = df.with_columns(__hour=ts.dt.truncate("1h"))
    if dataset is Dataset.GAPS:
        first_id = pl.coalesce("last_good_id", "first_id_after", pl.lit(0))
        last_id = pl.coalesce("first_id_after", "last_good_id", pl.lit(0))
    elif dataset is Dataset.DELTAS:
        first_id, last_id = pl.col("first_update_id"), pl.col("last_update_id")
    else:
        first_id = last_id = pl.col("last_update_id")
    paths = []
    for (ex, mkt, sym, hour), part in df.group_by(
        ["exchange", "market", "symbol", "__hour"], maintain_order=True
    ):
        part = part.drop("__hour")
        r = part.select(
            a=first_id.min(), b=last_id.max(), c=ts.dt.epoch("ms").min(), d=ts.dt.epoch("ms").max()
        ).row(0)
        folder = (
            root / dataset.value / f"exchange={ex}" / f"market={mkt}" / f"symbol={sym}"
            / f"year={hour.year:04d}" / f"month={hour.month:02d}" / f"day={hour.day:02d}"
            / f"hour={hour.hour:02d}"
        )  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sym}-{r[0]}-{r[1]}-{r[2]}-{r[3]}.parquet"
        part.write_parquet(path)
        paths.append(path)
    return paths


@attrs.define
class Generated:
    """What `generate` wrote, for assertions."""

    snapshots: list[tuple[int, int]] = attrs.field(factory=list)  # (ts, last_update_id)
    messages: int = 0
    delta_rows: int = 0
    snapshot_rows: int = 0
    gap: tuple[int, int, int, int] | None = None  # last_good_id, first_id_after, start, end
    files: list[Path] = attrs.field(factory=list)
    #: the true book after each stored message: last_update_id -> (bids, asks) dicts
    books: dict[int, tuple[dict[float, float], dict[float, float]]] = attrs.field(factory=dict)


def generate(
    root: Path,
    *,
    start: str = "2026-01-02T00:30:00Z",
    minutes: int = 60,
    exchange: str = "binance",
    symbol: str = "BTCUSDT",
    seed: int = 7,
    levels: int = 10,
    snapshot_every_s: int = 10,
    message_every_ms: int = 500,
    flush_every_s: int = 120,
    gap_at_s: int | None = None,
    gap_messages: int = 5,
) -> Generated:
    """Simulate `minutes` of one symbol and write snapshots, deltas (and a gap) to `root`.

    The book stays uncrossed (bids below 100.05, asks above). Each message covers 1-3
    update ids; at `gap_at_s` seconds, `gap_messages` messages are lost (the book still
    changes) and a `sequence_break` gap record is written, as the normalizer would.
    """
    rng = random.Random(seed)
    kw = dict(exchange=exchange, symbol=symbol)
    bids = {round(100.0 - 0.1 * i, 1): float(rng.randint(1, 9)) for i in range(levels)}
    asks = {round(100.1 + 0.1 * i, 1): float(rng.randint(1, 9)) for i in range(levels)}
    out = Generated()
    t0 = ms(start)
    end = t0 + minutes * 60_000
    last_id = 1000
    next_snap = t0
    next_flush = t0 + flush_every_s * 1000
    snap_buf: list[dict] = []
    delta_buf: list[dict] = []
    stored_last, stored_t = last_id, t0
    lost_left, gap_done, pending_gap = 0, False, False
    t = t0
    while t < end:
        if t >= next_snap:
            b = sorted(bids.items(), reverse=True)[:levels]
            a = sorted(asks.items())[:levels]
            snap_buf += snapshot_rows(t, last_id, b, a, **kw)
            out.snapshots.append((t, last_id))
            next_snap += snapshot_every_s * 1000
        if gap_at_s is not None and not gap_done and t >= t0 + gap_at_s * 1000:
            gap_done, lost_left = True, gap_messages
        first, prev = last_id + 1, last_id
        last_id += rng.randint(1, 3)
        changes: dict[tuple[str, float], float] = {}  # one row per (side, price), as venues send
        for _ in range(rng.randint(1, 3)):
            side = rng.choice(["bid", "ask"])
            book = bids if side == "bid" else asks
            price = (
                round(100.0 - 0.1 * rng.randint(0, levels + 2), 1)
                if side == "bid"
                else round(100.1 + 0.1 * rng.randint(0, levels + 2), 1)
            )
            qty = 0.0 if (price in book and rng.random() < 0.3) else float(rng.randint(1, 20))
            if qty == 0.0:
                book.pop(price, None)
            else:
                book[price] = qty
            changes[(side, price)] = qty
        if lost_left:
            lost_left -= 1
            pending_gap = lost_left == 0
        else:
            if pending_gap:
                out.gap = (stored_last, first, stored_t, t)
                out.files += write(root, Dataset.GAPS, gap_rows("sequence_break", *out.gap, **kw))
                pending_gap = False
            rows = [(side, price, qty) for (side, price), qty in changes.items()]
            delta_buf += delta_rows(t, first, last_id, prev, rows, **kw)
            out.messages += 1
            stored_last, stored_t = last_id, t
            out.books[last_id] = (dict(bids), dict(asks))
        t += message_every_ms
        if t >= next_flush or t >= end:
            out.snapshot_rows += len(snap_buf)
            out.delta_rows += len(delta_buf)
            out.files += write(root, Dataset.SNAPSHOTS, snap_buf)
            out.files += write(root, Dataset.DELTAS, delta_buf)
            snap_buf, delta_buf = [], []
            next_flush += flush_every_s * 1000
    return out


def okx_reset_revisiting_ids(root: Path, t0: int) -> None:
    """An OKX stream whose seqId goes back after maintenance (prevSeqId still matching:
    continuous) to ids the same chain already used: in-stream snapshot 100, updates
    100->110, 110->120, 120->130, the reset 130->105, then 105->110, 110->125 (prevSeqId
    -> seqId), one every 100 ms, each setting bid 100 to 2, 3, ... 7."""
    kw: dict = dict(exchange="okx")
    write(root, Dataset.SNAPSHOTS, snapshot_rows(t0, 100, [(100.0, 1.0)], [(101.0, 1.0)],
                                                 source="stream", **kw))  # fmt: skip
    deltas: list[dict] = []
    for i, (p, s) in enumerate([(100, 110), (110, 120), (120, 130), (130, 105), (105, 110),
                                (110, 125)]):  # fmt: skip
        first, last = (s, s) if s <= p else (p + 1, s)  # okx/rules.diff_ids
        deltas += delta_rows(t0 + 100 * (i + 1), first, last, p, [("bid", 100.0, float(i + 2))],
                             **kw)  # fmt: skip
    write(root, Dataset.DELTAS, deltas)


def bybit_restart(root: Path, t0: int, *, lose: int | None = None) -> None:
    """What the collector stores for a Bybit stream whose ids restart: an in-stream
    snapshot at u=5000, deltas 5001..5004 (bid 100 -> 10..13), then Bybit restarts (a
    snapshot with `u == 1`: a new full book at t0 + 1000) and deltas 2..4 (ask 101 ->
    20..22). Continuous; with `lose`, that delta (5001..5004) is missing and a
    `sequence_break` gap record says so, detected when the next one arrived."""
    kw: dict = dict(exchange="bybit", source="stream")
    rows = snapshot_rows(t0, 5000, [(100.0, 1.0), (99.0, 2.0)], [(101.0, 1.0), (102.0, 2.0)], **kw)
    rows += snapshot_rows(t0 + 1000, 1, [(100.0, 7.0), (98.0, 3.0)], [(101.0, 4.0)], **kw)
    write(root, Dataset.SNAPSHOTS, rows)
    deltas: list[dict] = []
    for i, u in enumerate(range(5001, 5005)):
        if u != lose:
            deltas += delta_rows(t0 + 100 * (i + 1), u, u, u - 1, [("bid", 100.0, 10.0 + i)],
                                 exchange="bybit")  # fmt: skip
    for i, u in enumerate(range(2, 5)):
        deltas += delta_rows(t0 + 1100 + 100 * i, u, u, u - 1, [("ask", 101.0, 20.0 + i)],
                             exchange="bybit")  # fmt: skip
    write(root, Dataset.DELTAS, deltas)
    if lose is not None:
        t_lost = t0 + 100 * (lose - 5000)
        write(root, Dataset.GAPS, gap_rows("sequence_break", lose - 1, lose + 1, t_lost - 100,
                                           t_lost + 100, exchange="bybit"))  # fmt: skip
