from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
import trio

from cryptoflow.errors import UnsafePartition
from cryptoflow.models import Dataset
from cryptoflow.storage import layout
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.spool import Spool

H = 3_600_000
T0 = int(datetime(2025, 3, 4, 10, 59, 0, tzinfo=UTC).timestamp() * 1000)


def snap_cols(ts: list[int], ids: list[int]) -> dict[str, list]:
    n = len(ts)
    return {
        "timestamp": ts,
        "transaction_time": ts,
        "receive_time": [t * 1_000_000 for t in ts],
        "last_update_id": ids,
        "side": ["bid"] * n,
        "level": list(range(n)),
        "price": ["100.5"] * n,
        "quantity": ["1"] * n,
        "raw_quantity": ["1"] * n,
        "source": ["poll"] * n,
    }


def delta_cols(ts: list[int], ids: list[int]) -> dict[str, list]:
    n = len(ts)
    return {
        "timestamp": ts,
        "transaction_time": ts,
        "receive_time": [t * 1_000_000 for t in ts],
        "first_update_id": ids,
        "last_update_id": ids,
        "prev_update_id": [i - 1 for i in ids],
        "side": ["ask"] * n,
        "price": ["100.5"] * n,
        "quantity": ["0"] * n,
        "raw_quantity": ["0"] * n,
    }


def gap_cols(ts: list[int]) -> dict[str, list]:
    n = len(ts)
    return {
        "timestamp": ts,
        "kind": ["reconnect"] * n,
        "last_good_id": [1] * n,
        "first_id_after": [2] * n,
        "start_time": ts,
        "end_time": ts,
        "reason": ["ws closed"] * n,
        "detected_at": [t * 1_000_000 for t in ts],
    }


@pytest.mark.parametrize(
    ("dataset", "cols", "name"),
    [
        (Dataset.SNAPSHOTS, snap_cols([T0, T0 + 10], [7, 9]), f"BTCUSDT-7-9-{T0}-{T0 + 10}"),
        (Dataset.DELTAS, delta_cols([T0, T0 + 10], [7, 9]), f"BTCUSDT-7-9-{T0}-{T0 + 10}"),
    ],
)
def test_key_for_each_id_dataset(frame_builder, dataset, cols, name):
    frame = frame_builder(dataset, "binance", "futures", "BTCUSDT", cols)
    [(key, part)] = layout.keys_for_frame(dataset, "binance", "futures", "BTCUSDT", frame, "pre")
    digest = layout.content_hash(part)
    assert key == (
        f"pre/{dataset.value}/exchange=binance/market=futures/symbol=BTCUSDT/"
        f"year=2025/month=03/day=04/hour=10/{name}-{digest}.parquet"
    )
    assert part.height == 2
    parts = layout.parse_key(key)
    assert parts.content_hash == digest
    assert (parts.prefix, parts.dataset, parts.symbol) == ("pre", dataset.value, "BTCUSDT")
    assert (parts.first_id, parts.last_id) == (7, 9)
    assert parts.hour == datetime(2025, 3, 4, 10, tzinfo=UTC)
    assert parts.key == key
    assert parts.relative_key == key.removeprefix("pre/")


def test_gap_key_uses_times_and_hash(frame_builder):
    frame = frame_builder(Dataset.GAPS, "okx", "futures", "ETHUSDT", gap_cols([T0]))
    [(key, _)] = layout.keys_for_frame(Dataset.GAPS, "okx", "futures", "ETHUSDT", frame)
    assert key.startswith("gaps/exchange=okx/market=futures/symbol=ETHUSDT/year=2025/")
    parts = layout.parse_key(key)
    assert parts.first_ts_ms == T0 and parts.content_hash and len(parts.content_hash) == 8
    assert parts.prefix == "" and parts.first_id is None
    other = frame_builder(
        Dataset.GAPS, "okx", "futures", "ETHUSDT", {**gap_cols([T0]), "reason": ["other"]}
    )
    assert layout.file_name(Dataset.GAPS, "ETHUSDT", other) != parts.filename


def test_hour_boundary_split(frame_builder):
    ts = [T0, T0 + 30_000, T0 + 60_000, T0 + 90_000, T0 + H]  # 10:59:00 .. 11:59:00
    frame = frame_builder(
        Dataset.DELTAS, "binance", "futures", "BTCUSDT", delta_cols(ts, [1, 2, 3, 4, 5])
    )
    out = layout.keys_for_frame(Dataset.DELTAS, "binance", "futures", "BTCUSDT", frame)
    assert [layout.parse_key(k).hour.hour for k, _ in out] == [10, 11]
    assert [p.height for _, p in out] == [2, 3]
    assert sum(p.height for _, p in out) == frame.height
    assert f"/BTCUSDT-1-2-{T0}-{T0 + 30_000}-" in out[0][0]
    assert f"/BTCUSDT-3-5-{T0 + 60_000}-{T0 + H}-" in out[1][0]


def test_deterministic_names(frame_builder):
    a = frame_builder(Dataset.SNAPSHOTS, "bybit", "futures", "SOLUSDT", snap_cols([T0], [3]))
    b = frame_builder(Dataset.SNAPSHOTS, "bybit", "futures", "SOLUSDT", snap_cols([T0], [3]))
    ka = layout.keys_for_frame(Dataset.SNAPSHOTS, "bybit", "futures", "SOLUSDT", a)
    kb = layout.keys_for_frame(Dataset.SNAPSHOTS, "bybit", "futures", "SOLUSDT", b)
    assert [k for k, _ in ka] == [k for k, _ in kb]
    g1 = frame_builder(Dataset.GAPS, "bybit", "futures", "SOLUSDT", gap_cols([T0]))
    g2 = frame_builder(Dataset.GAPS, "bybit", "futures", "SOLUSDT", gap_cols([T0]))
    assert layout.file_name(Dataset.GAPS, "SOLUSDT", g1) == layout.file_name(
        Dataset.GAPS, "SOLUSDT", g2
    )


def test_same_range_different_content_gets_different_names(frame_builder):
    """Two flushes with the same id and time range but different rows never overwrite
    each other: the content hash tells them apart."""
    a = frame_builder(Dataset.DELTAS, "binance", "futures", "BTCUSDT", delta_cols([T0], [5]))
    cols = delta_cols([T0], [5])
    cols["quantity"] = ["2"]
    b = frame_builder(Dataset.DELTAS, "binance", "futures", "BTCUSDT", cols)
    [(ka, _)] = layout.keys_for_frame(Dataset.DELTAS, "binance", "futures", "BTCUSDT", a)
    [(kb, _)] = layout.keys_for_frame(Dataset.DELTAS, "binance", "futures", "BTCUSDT", b)
    assert ka != kb
    pa, pb = layout.parse_key(ka), layout.parse_key(kb)
    assert (pa.first_id, pa.last_id, pa.first_ts_ms) == (pb.first_id, pb.last_id, pb.first_ts_ms)
    # the hash is over the exact file bytes that are stored
    [(kc, _, data)] = layout.files_for_frame(Dataset.DELTAS, "binance", "futures", "BTCUSDT", a)
    assert kc == ka and layout.parse_key(kc).content_hash == layout.content_hash(data)


def test_old_names_without_hash_still_parse():
    key = (
        "deltas/exchange=binance/market=futures/symbol=BTCUSDT/year=2025/month=03/day=04/"
        "hour=10/BTCUSDT-7-9-100-200.parquet"
    )
    parts = layout.parse_key(key)
    assert (parts.first_id, parts.last_id, parts.content_hash) == (7, 9, None)


def test_raw_key_roundtrip():
    ns = T0 * 1_000_000
    key = layout.raw_key("binance", "futures", "BTCUSDT", ns, ns + 5_000_000, b"abc")
    assert key.startswith("raw/exchange=binance/market=futures/symbol=BTCUSDT/year=2025/")
    assert key.endswith(f"/BTCUSDT-{T0}-{T0 + 5}-{layout.content_hash(b'abc')}.jsonl.zst")
    parts = layout.parse_key(key)
    assert parts.dataset == "raw" and parts.first_ts_ms == T0 and parts.content_hash


def test_parse_key_rejects_foreign_keys():
    with pytest.raises(ValueError):
        layout.parse_key("foo/bar.parquet")


def test_hour_start_takes_any_int64_and_refuses_clearly_outside_the_years():
    """The layout has partitions for years 0001-9999 (`year=YYYY`, datetime's range);
    every other Int64 ms time is refused with UnplaceableTime naming it, never an
    OverflowError or a bare 'year is out of range' from deep inside datetime."""
    from cryptoflow.errors import UnplaceableTime

    assert layout.hour_start(T0) == datetime(2025, 3, 4, 10, tzinfo=UTC)
    assert layout.hour_start(layout.MIN_MS) == datetime(1, 1, 1, tzinfo=UTC)
    assert layout.hour_start(layout.MAX_MS) == datetime(9999, 12, 31, 23, tzinfo=UTC)
    assert layout.hour_start(-1) == datetime(1969, 12, 31, 23, tzinfo=UTC)
    for ms in (layout.MAX_MS + 1, layout.MIN_MS - 1, 2**63 - 1, -(2**63), 300_000_000_000_000):
        with pytest.raises(UnplaceableTime, match=f"event time {ms} ms is outside"):
            layout.hour_start(ms)


def test_split_by_hour_refuses_a_time_past_9999_and_split_placeable_sets_it_apart():
    from cryptoflow.errors import UnplaceableTime
    from cryptoflow.pipeline.normalize import frame_from_columns

    far = 300_000_000_000_000  # year 11476: a valid Int64 ms
    ts = [T0, far, T0 + 1, 2**63 - 1, layout.MAX_MS]
    cols = {**delta_cols(ts, [1, 2, 3, 4, 5]), "receive_time": [T0 * 1_000_000] * 5}
    frame = frame_from_columns(Dataset.DELTAS, "binance", "futures", "BTCUSDT", cols)
    with pytest.raises(UnplaceableTime, match=str(2**63 - 1)):
        layout.split_by_hour(frame)
    ok, bad = layout.split_placeable(frame)
    assert ok["last_update_id"].to_list() == [1, 3, 5]
    assert bad["last_update_id"].to_list() == [2, 4]
    assert [h.year for h, _ in layout.split_by_hour(ok)] == [2025, 9999]
    same, none = layout.split_placeable(ok)
    assert same is ok and none.height == 0 and none.columns == ok.columns


# --- partition values from the wire: only safe path components (audit 8) -------------

#: names a parser may keep "as sent" that must never become a path: the audit's Bybit
#: `data.s`, path parts, separators, and anything beyond the plain ASCII set
UNSAFE = [
    "../../../../../../ESCAPED",
    "..",
    ".",
    "",
    "a/b",
    "/etc",
    "a\\b",
    "BTC USDT",
    "BTC\x00",
    "BTC\n",
    "ÄBC",
]
#: real names of every venue (normalized, kept as sent, or an instrument id)
SAFE = ["BTCUSDT", "1000PEPEUSDT", "SHIB1000USDT", "BTC-USDT-SWAP", "BTCUSDT_240927", "a.b"]


@pytest.mark.parametrize("bad", UNSAFE)
def test_keys_refuse_a_partition_value_that_is_no_plain_path_component(frame_builder, bad):
    frame = frame_builder(Dataset.DELTAS, "x", "futures", "BTCUSDT", delta_cols([T0], [5]))
    hour = datetime(2025, 3, 4, 10, tzinfo=UTC)
    for exchange, market, symbol in ((bad, "futures", "X"), ("x", bad, "X"), ("x", "f", bad)):
        with pytest.raises(UnsafePartition, match="for a storage path"):
            layout.partition_path("deltas", exchange, market, symbol, hour)
        with pytest.raises(UnsafePartition):
            layout.files_for_frame(Dataset.DELTAS, exchange, market, symbol, frame)
        with pytest.raises(UnsafePartition):
            layout.raw_key(exchange, market, symbol, T0 * 10**6, T0 * 10**6, b"x")
    with pytest.raises(UnsafePartition, match=re.escape(f"unsafe symbol {bad!r:.80}")):
        layout.file_name(Dataset.DELTAS, bad, frame)


@pytest.mark.parametrize("name", SAFE)
def test_keys_take_every_venue_name(frame_builder, name):
    frame = frame_builder(Dataset.DELTAS, "x", "futures", "BTCUSDT", delta_cols([T0], [5]))
    [(key, _)] = layout.keys_for_frame(Dataset.DELTAS, "okx", "futures", name, frame)
    assert layout.parse_key(key).symbol == name


@pytest.mark.parametrize(
    "key", ["a/../../x.parquet", "../x", "/abs/x", "a//b", "a/./b", "a\\..\\b"]
)
def test_spool_and_local_store_refuse_a_key_that_leaves_their_root(tmp_path, key):
    """A caller passing its own key (not one built here) cannot write outside either."""
    spool = Spool(tmp_path / "spool", max_bytes=10**6)
    with pytest.raises(UnsafePartition, match="not a plain relative path"):
        spool.write(key, b"data")
    src = tmp_path / "src.parquet"
    src.write_bytes(b"data")
    with pytest.raises(UnsafePartition):
        trio.run(LocalStore(tmp_path / "out").put_file, key, src)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["src.parquet"]
