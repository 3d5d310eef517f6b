"""The snapshot lane's fast pieces change no stored value.

`_levels` (parse), `_snapshot_rows` (shared level numbers), `wire_frame` (columns of long
runs built from one value per run) and `frame_from_wire` (one select) are compared with a
reference built the plain way: one Python value per cell, floats by `float(text)`,
quantities by `Decimal`, times by `datetime` arithmetic. Inputs: the recorded BTCUSDT REST
body (2 x 1000 levels) fed as the writer buffers it, and edge cases (an empty side, one
level, a non-unit multiplier, no `T`, mixed sources, runs too short to code).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import polars as pl
import pytest
from paths import RECORDED

from cryptoflow.errors import MalformedMessage
from cryptoflow.exchanges.binance.parse import parse_rest_snapshot
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import SCHEMAS, Dataset, DepthSnapshot, SnapshotSource
from cryptoflow.pipeline.normalize import Normalizer, frame_from_columns, wire_frame
from cryptoflow.tools.recording import iter_records

BTC = RECORDED / "binance" / "futures_depth_BTCUSDT_2024-08-08.jsonl.gz"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
INT_COLUMNS = {"timestamp", "transaction_time", "receive_time", "last_update_id", "level"}


def btc_body() -> tuple[dict, int]:
    for rec in iter_records(BTC):
        if rec.kind == "rest_snapshot":
            return rec.msg, rec.recv_ns
    raise AssertionError("no rest_snapshot in the recording")


def collector_frame(snaps: list[DepthSnapshot], multiplier: str = "1") -> pl.DataFrame:
    """As the collector: feed_many per snapshot, the writer extends one buffer's lists."""
    norm = Normalizer({"binance": RULES})
    cols: dict[str, list] = {}
    for snap in snaps:
        for batch in norm.feed_many([snap]).batches:
            for name, values in batch.columns.items():
                cols.setdefault(name, []).extend(values)
    return frame_from_columns(Dataset.SNAPSHOTS, "binance", "futures", "BTCUSDT", cols, multiplier)


def reference_frame(snaps: list[DepthSnapshot], multiplier: str = "1") -> pl.DataFrame:
    rows = []
    for s in snaps:
        for side, levels in (("bid", s.bids), ("ask", s.asks)):
            for level, (price, qty) in enumerate(levels):
                tt = s.transaction_time
                rows.append(
                    {
                        "exchange": "binance",
                        "market": "futures",
                        "symbol": "BTCUSDT",
                        "timestamp": EPOCH + timedelta(milliseconds=s.event_time),
                        "transaction_time": None
                        if tt is None
                        else EPOCH + timedelta(milliseconds=tt),
                        "receive_time": EPOCH + timedelta(microseconds=s.receive_time // 1000),
                        "last_update_id": s.last_update_id,
                        "side": side,
                        "level": level,
                        "price": float(price),
                        "quantity": float(Decimal(qty) * Decimal(multiplier)),
                        "raw_quantity": float(qty),
                        "source": s.source.value,
                    }
                )
    return pl.DataFrame(rows, schema=SCHEMAS[Dataset.SNAPSHOTS], orient="row")


def snap(body: dict, recv_ns: int, **changes) -> DepthSnapshot:
    source = changes.pop("source", SnapshotSource.POLL)
    return parse_rest_snapshot(orjson.dumps({**body, **changes}), "BTCUSDT", recv_ns, source)


def assert_same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got.schema == want.schema
    assert got.height == want.height
    for name in want.columns:  # column by column: a failure names the column
        assert got[name].to_list() == want[name].to_list(), name


@pytest.mark.skipif(not BTC.is_file(), reason="shared recordings not present")
@pytest.mark.parametrize("distinct_times", [False, True])
def test_recorded_flush_matches_reference(distinct_times):
    """6 polls of the recorded body, as one writer flush: the same event time and id in
    every snapshot (an idle book), or a new one each poll (runs end per snapshot)."""
    body, recv = btc_body()
    snaps = []
    for i in range(6):
        changes = {"E": body["E"] + i * 10_000, "lastUpdateId": body["lastUpdateId"] + i}
        snaps.append(snap(body, recv + i * 10_000_000_000, **(changes if distinct_times else {})))
    assert {len(s.bids) for s in snaps} == {1000}
    assert_same(collector_frame(snaps), reference_frame(snaps))


@pytest.mark.skipif(not BTC.is_file(), reason="shared recordings not present")
def test_recorded_edge_cases_match_reference():
    body, recv = btc_body()
    t = body["E"]
    snaps = [
        snap(body, recv, bids=[]),  # empty side
        snap(body, recv + 1, E=t + 1, asks=body["asks"][:1], bids=body["bids"][:1]),  # 1 level
        snap(body, recv + 2, E=t + 2, source=SnapshotSource.RESYNC),
        snap({k: v for k, v in body.items() if k not in ("E", "T")}, recv + 3),  # no T
        snap(body, recv + 4, E=t + 4, bids=body["bids"][:100], asks=body["asks"][:300]),
        snap(body, recv + 5, E=t + 5, asks=[]),
    ]
    assert snaps[3].transaction_time is None
    for multiplier in ("1", "0.1", "0.001", "1000"):
        assert_same(collector_frame(snaps, multiplier), reference_frame(snaps, multiplier))
    for one in snaps:
        assert_same(collector_frame([one], "0.1"), reference_frame([one], "0.1"))


def plain_wire(columns: dict[str, list]) -> pl.DataFrame:
    return pl.DataFrame(
        [
            pl.Series(name, v, dtype=pl.Int64 if name in INT_COLUMNS else pl.String)
            for name, v in columns.items()
        ]
    )


@pytest.mark.parametrize(
    "values",
    [
        ["a"] * 300 + ["b"] * 300 + ["a"] * 300,  # a value again after another run
        ["a"] * 300 + ["b"] * 129 + ["c"] * 300,  # three values
        ["a"] * 300 + ["b"] * 5 + ["a"] * 300,  # a short run inside
        ["a"] * 129 + ["b"] * 1,  # a short last run
        ["a"] * 1000 + ["b"] + ["a"] * 1000,  # one odd value the probes jump over
        ["a"] * 500 + [None] * 500,
        [None] * 1000,
        ["a"] * 127,
        [],
    ],
)
def test_wire_frame_runs_keep_every_value(values):
    for name in ("side", "source"):
        cols = {name: values}
        assert wire_frame(cols).equals(plain_wire(cols))
    ints = [None if v is None else ord(v) for v in values]
    for name in ("timestamp", "transaction_time", "receive_time", "last_update_id"):
        cols = {name: ints}
        got = wire_frame(cols)
        assert got.equals(plain_wire(cols)) and got[name].to_list() == ints


def test_wire_frame_mixed_int_objects():
    """Equal ints that are different objects (one per parsed message)."""
    big = [10**12 + int(d) for d in "1" * 400]  # equal values, distinct objects
    cols = {"timestamp": big + [10**12 + 2] * 400, "last_update_id": big + big[:1] * 400}
    assert wire_frame(cols).equals(plain_wire(cols))


@pytest.mark.parametrize(
    "levels",
    [
        [["1", "2"], ["1", 2]],
        [["1", "2"], [1.5, "2"]],
        [["1", "2"], ["1", "2", "3"]],
        [["1", "2"], ["1"]],
        [["1", "2"], None],
        [["1", "2"], [None, "1"]],
        [["1", "2"], 5],
        [[]],
        {"1": "2"},
        "12",
    ],
)
def test_snapshot_levels_still_rejected(levels):
    for field in ("bids", "asks"):
        body = {"lastUpdateId": 5, "E": 1_700_000_000_001, "T": 1_700_000_000_000}
        body |= {"bids": [], "asks": [], field: levels}
        with pytest.raises(MalformedMessage, match=f"'{field}'"):
            parse_rest_snapshot(orjson.dumps(body), "BTCUSDT", 0)
