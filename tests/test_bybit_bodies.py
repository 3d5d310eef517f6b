"""Bybit poll snapshots read at the writer's flush (`pipeline/bodies.py` with
`exchanges/bybit/batch.py`) store the same rows as the simple path (parse on arrival,
`Normalizer.feed`, `frame_from_columns`); bodies outside the exact wire shape are read one
by one, bad ones left out and named; error bodies never wait for the flush
(`BybitRest.fetch_snapshot_body` raises them at once).

Inputs: bodies from the simulator's `GET /v5/market/orderbook` handler (what the soak
sees; 2 x 500 levels), the documented example, and damaged copies of them.
"""

from __future__ import annotations

import bodies_support
import httpx
import orjson
import polars as pl
import pytest
import trio

from cryptoflow.errors import IPBanned, RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.bybit import batch, parse
from cryptoflow.exchanges.bybit.rest import BybitRest
from cryptoflow.exchanges.bybit.rules import RULES
from cryptoflow.models import MARKET_FUTURES, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.bodies import SnapshotCodec, frame_from_bodies
from cryptoflow.sim.bybit import BybitVenue
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest
from cryptoflow.sim.market import Market

CODEC = SnapshotCodec(
    parse=parse.parse_rest_snapshot,
    read=batch.read_snapshot_bodies,
    count_levels=parse.count_snapshot_levels,
)
EX, MKT, SYM = "bybit", MARKET_FUTURES, "BTCUSDT"
RECV = 1_700_000_000_000_000_000

#: the documented example (docs/exchanges.md, Bybit), in the order Bybit sends its keys
DOC_BODY = orjson.dumps(
    {
        "retCode": 0,
        "retMsg": "OK",
        "result": {
            "s": "BTCUSDT",
            "b": [["16493.50", "0.006"], ["16493.00", "0.100"]],
            "a": [["16611.00", "0.029"], ["16612.00", "0.213"]],
            "ts": 1672765737733,
            "u": 5277055,
            "seq": 7961638724,
            "cts": 1672765737731,
        },
        "retExtInfo": {},
        "time": 1672765737734,
    }
)


def _sim_bodies(n: int, symbol: str = SYM, limit: int = 500) -> list[bytes]:
    """n bodies of the simulator's orderbook handler, one book tick apart."""
    stats = Stats()
    market = Market(BybitVenue.make_books([symbol], seed=7, depth=500), stats)
    venue = BybitVenue(market, Faults(), stats)
    query = {"category": "linear", "symbol": symbol, "limit": str(limit)}
    req = HttpRequest("GET", "/v5/market/orderbook", "/v5/market/orderbook", query, {}, b"", "")
    out = []
    for _ in range(n):
        out.append(trio.run(venue._orderbook, req).body)
        market.step()
    return out


#: made once, outside any test's event loop (the handler is a trio coroutine)
SIM = _sim_bodies(3)
SIM_ETH_37 = _sim_bodies(1, "ETHUSDT", limit=37)[0]


def sim_bodies(n: int = 3) -> list[bytes]:
    return SIM[:n]


def items_of(
    bodies: list[bytes], source: SnapshotSource = SnapshotSource.POLL
) -> list[SnapshotBody]:
    return [SnapshotBody(EX, MKT, SYM, b, RECV + i * 10**10, source) for i, b in enumerate(bodies)]


def edit(body: bytes, **result_edits: object) -> bytes:
    """`body` with fields of `result` replaced (None: removed), re-encoded compactly."""
    obj = orjson.loads(body)
    for k, v in result_edits.items():
        if v is None:
            obj["result"].pop(k)
        else:
            obj["result"][k] = v
    return orjson.dumps(obj)


def simple_frame(items: list[SnapshotBody], multiplier: str = "1") -> pl.DataFrame:
    return bodies_support.simple_frame(RULES, parse.parse_rest_snapshot, items, multiplier)


def read(items: list[SnapshotBody]) -> batch.SnapshotBatch | None:
    return bodies_support.read_batch(batch.read_snapshot_bodies, items)


# --- (a) the batch read gives the simple path's rows -----------------------------------


@pytest.mark.parametrize("multiplier", ["1", "0.001"])  # Bybit's is "1"; the path is generic
@pytest.mark.parametrize("source", [SnapshotSource.POLL, SnapshotSource.RESYNC])
def test_batch_read_equals_the_simple_path_on_simulator_bodies(multiplier, source):
    items = items_of(sim_bodies(3), source)
    assert len({b.body for b in items}) == 3  # the book moved between them
    parsed = read(items)
    assert parsed is not None  # the batch read them, no fallback
    assert parsed.heads.columns == ["lastUpdateId", "event_time", "T"]
    assert parsed.heads.height == 3
    frame, rejected = frame_from_bodies(EX, MKT, SYM, multiplier, CODEC, items)
    assert rejected == []
    assert frame.height == 3 * 1000 == sum(parse.count_snapshot_levels(b.body) for b in items)
    assert frame.equals(simple_frame(items, multiplier))


def test_heads_are_the_ids_and_times_parse_rest_snapshot_gives():
    items = items_of([*sim_bodies(2), DOC_BODY])
    parsed = read(items)
    assert parsed is not None
    for b, head in zip(items, parsed.heads.iter_rows(), strict=True):
        snap = parse.parse_rest_snapshot(b.body, SYM, b.receive_time)
        assert head == (snap.last_update_id, snap.event_time, snap.transaction_time)


@pytest.mark.parametrize(
    "body",
    [
        DOC_BODY,
        edit(DOC_BODY, ts=None),  # event time: the envelope `time`
        edit(DOC_BODY, cts=None),  # no transaction time
        edit(DOC_BODY, ts=None, cts=None),
        edit(DOC_BODY, a=[]),
        edit(DOC_BODY, b=[], a=[]),  # no rows
        # extreme ids; times at the edges of the window the parser accepts (`fields`)
        edit(DOC_BODY, u=2**63 - 1, ts=4_102_444_799_999, cts=946_684_800_000),
    ],
    ids=["doc", "no-ts", "no-cts", "no-ts-cts", "no-asks", "empty", "extreme-ints"],
)
def test_batch_read_equals_the_simple_path_on_the_documented_body_and_its_variants(body):
    items = items_of([sim_bodies(1)[0], body, DOC_BODY])
    assert read(items) is not None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", CODEC, items)
    assert rejected == []
    assert frame.height == sum(parse.count_snapshot_levels(b.body) for b in items)
    assert frame.equals(simple_frame(items))


def test_a_missing_ts_takes_the_envelope_time():
    body = edit(DOC_BODY, ts=None, cts=None)
    rows = read(items_of([body])).rows
    assert set(rows["timestamp"]) == {1672765737734}
    assert rows["transaction_time"].null_count() == rows.height == 4


# --- (b) anything outside the exact wire shape: the checked parser decides -------------


def _replace(old: bytes, new: bytes):
    def damage(body: bytes) -> bytes:
        assert old in body
        return body.replace(old, new, 1)

    return damage


#: valid JSON that `parse_rest_snapshot` accepts, outside the batch reader's grammar
UNUSUAL = {
    "pretty": lambda b: orjson.dumps(orjson.loads(b), option=orjson.OPT_INDENT_2),
    "space": _replace(b'"u":', b'"u": '),
    "extra-key": _replace(b'"seq":', b'"x":1,"seq":'),
    "doc-order": lambda b: orjson.dumps(
        {k: orjson.loads(b)[k] for k in ("retCode", "retMsg", "time", "result", "retExtInfo")}
    ),
    "escape": _replace(b'"s":"BTCUSDT"', b'"s":"BTC\\u0055SDT"'),
    "ts-as-string": lambda b: edit(b, ts=str(orjson.loads(b)["result"]["ts"])),
    "cts-null": _replace(b'"cts":', b'"cts":null,"x":'),
    "three-strings": _replace(b'"],["', b'","7"],["'),  # extra elements are dropped
    "ret-ext-info": _replace(b'"retExtInfo":{}', b'"retExtInfo":{"a":1}'),
    "big-seq": lambda b: edit(b, seq=2**64 - 1),  # not used: any integer is fine
}

#: bodies `parse_rest_snapshot` rejects: (damage, a word its message holds)
BAD = {
    "truncated": (lambda b: b[:-40], "not JSON"),
    "number-for-string": (
        lambda b: edit(b, b=[[1.5, "0.1"], *orjson.loads(b)["result"]["b"]]),
        "non-string price",
    ),
    "one-string-level": (_replace(b'"],["', b'"],["1"],["'), "not [price, size"),
    "missing-u": (lambda b: edit(b, u=None), "'u'"),
    "missing-ts-and-time": (
        lambda b: orjson.dumps({**orjson.loads(edit(b, ts=None)), "time": None}),
        "'time'",
    ),
    "not-a-number": (_replace(b'[["', b'[["x'), "does not fit"),  # price "x59999.90"
    "result-missing": (_replace(b'"result":', b'"resul":'), "'result'"),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_a_body_outside_the_wire_shape_is_read_one_by_one_with_the_same_rows(name):
    good = items_of(sim_bodies(3))
    odd = SnapshotBody(EX, MKT, SYM, UNUSUAL[name](good[1].body), good[1].receive_time)
    parse.parse_rest_snapshot(odd.body, SYM, 0)  # valid for the checked parser
    items = [good[0], odd, good[2]]
    assert read([odd]) is None and read(items) is None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", CODEC, items)
    assert rejected == [] and frame.equals(simple_frame(items))


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_body_is_left_out_named_and_the_others_kept(name):
    damage, why = BAD[name]
    good = items_of(sim_bodies(3))
    bad = SnapshotBody(EX, MKT, SYM, damage(good[1].body), good[1].receive_time)
    items = [good[0], bad, good[2]]
    if name != "not-a-number":  # that one only the number cast finds
        assert read([bad]) is None and read(items) is None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "1", CODEC, items)
    assert len(rejected) == 1 and "bybit/BTCUSDT" in rejected[0], rejected
    assert why in rejected[0], rejected
    assert frame.equals(simple_frame([good[0], good[2]]))


@pytest.mark.parametrize(
    "body",
    [
        DOC_BODY.replace(b'"retCode":0', b'"retCode":10006'),
        DOC_BODY.replace(b'"retCode":0', b'"retCode":10001'),
        DOC_BODY.replace(b'"retCode":0', b'"retCode":"0"'),
        DOC_BODY.replace(b'"retCode":0', b'"retCode":-0'),
        DOC_BODY.replace(b'"time":', b'"retCode":10006,"time":'),  # JSON keeps the last
        DOC_BODY.replace(b'"time":', b'"ret\\u0043ode":10006,"time":'),  # the same, escaped
        DOC_BODY.replace(b'"u":5277055', b'"u":9223372036854775808'),  # over Int64
        DOC_BODY.replace(b'"ts":', b'"ts":01'),  # not JSON
        DOC_BODY.replace(b'"ts":1672765737733', b'"ts":1.5'),
        DOC_BODY.replace(b'"OK"', b'"O\x01K"'),  # a control character
        DOC_BODY.replace(b'"OK"', b'"\xff"'),  # not UTF-8
        DOC_BODY + b"\n",
    ],
)
def test_the_batch_reader_refuses_error_codes_and_near_misses(body):
    parsed = batch.read_snapshot_bodies([DOC_BODY, body], [RECV, RECV], "poll")
    assert parsed is None


def test_an_error_body_is_never_left_for_the_flush():
    """What `fetch_snapshot_body` hands on unparsed is certainly `retCode` 0."""
    assert parse.is_plain_success(DOC_BODY)
    assert all(parse.is_plain_success(b) for b in sim_bodies(2))
    for body in (
        orjson.dumps({"retCode": 10006, "retMsg": "Too many visits!", "result": {}, "time": 1}),
        DOC_BODY.replace(b'"time":', b'"retCode":10006,"time":'),
        DOC_BODY.replace(b'"time":', b'"ret\\u0043ode":10006,"time":'),
        DOC_BODY.replace(b'"retCode":0', b'"retCode": 0'),
        b"",
    ):
        assert not parse.is_plain_success(body)


def test_reader_rejects_mismatched_receive_times_and_nothing():
    assert batch.read_snapshot_bodies([], [], "poll") is None
    assert batch.read_snapshot_bodies([DOC_BODY, DOC_BODY], [RECV], "poll") is None


# --- (c) the levels a body holds, counted before it is parsed --------------------------


def test_count_snapshot_levels_is_the_row_count():
    for body in (*SIM, SIM_ETH_37, DOC_BODY):
        snap = parse.parse_rest_snapshot(body, SYM, 0)
        assert parse.count_snapshot_levels(body) == len(snap.bids) + len(snap.asks)
    assert parse.count_snapshot_levels(edit(DOC_BODY, b=[], a=[])) == 0


# --- (d) fetch_snapshot_body ------------------------------------------------------------


def client(handler) -> tuple[BybitRest, RateBudget]:
    budget = RateBudget(7200)
    http = httpx.AsyncClient(base_url="http://bybit.test", transport=httpx.MockTransport(handler))
    return BybitRest(http, budget), budget


def answer(body: bytes, status: int = 200):
    seen: list[httpx.URL] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url)
        return httpx.Response(status, content=body, headers={"content-type": "application/json"})

    return handler, seen


async def test_fetch_snapshot_body_hands_a_success_body_on_unparsed():
    (body,) = sim_bodies(1)
    handler, seen = answer(body)
    rest, budget = client(handler)
    got = await rest.fetch_snapshot_body("BTCUSDT", "BTCUSDT", depth_limit=1000)
    assert type(got) is SnapshotBody
    assert (got.exchange, got.market, got.symbol, got.body) == (EX, MKT, SYM, body)
    assert got.source is SnapshotSource.POLL and got.receive_time > 0
    await rest.fetch_snapshot("BTCUSDT", "BTCUSDT", depth_limit=1000)
    assert seen[0] == seen[1]  # the same request as fetch_snapshot
    assert seen[0].path == "/v5/market/orderbook"
    assert dict(seen[0].params) == {"category": "linear", "symbol": "BTCUSDT", "limit": "500"}
    assert budget.stats.throttles == 0


async def test_fetch_snapshot_body_parses_an_unusual_success_at_once():
    pretty = orjson.dumps(orjson.loads(DOC_BODY), option=orjson.OPT_INDENT_2)
    rest, _ = client(answer(pretty)[0])
    got = await rest.fetch_snapshot_body("BTCUSDT", "BTCUSDT", source=SnapshotSource.RESYNC)
    assert type(got) is DepthSnapshot
    assert got == parse.parse_rest_snapshot(pretty, SYM, got.receive_time, SnapshotSource.RESYNC)


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps({"retCode": 10006, "retMsg": "Too many visits!", "result": {}, "time": 1}),
        orjson.dumps({"retCode": 10018, "retMsg": "Too many visits!", "result": {}, "time": 1}),
        DOC_BODY.replace(b'"time":', b'"retCode":10006,"time":'),  # not left for the flush
    ],
)
async def test_fetch_snapshot_body_raises_a_ret_code_throttle_and_slows_the_budget(body):
    rest, budget = client(answer(body)[0])
    with pytest.raises(RateLimited):
        await rest.fetch_snapshot_body("BTCUSDT", "BTCUSDT")
    assert budget.stats.throttles == 1 and budget.blocked_for > 0


@pytest.mark.parametrize(
    ("code", "error"), [(10001, RequestRejected), (10016, ServerError), (10000, ServerError)]
)
async def test_fetch_snapshot_body_raises_other_ret_codes(code, error):
    body = orjson.dumps({"retCode": code, "retMsg": "no", "result": {}, "time": 1})
    rest, budget = client(answer(body)[0])
    with pytest.raises(error) as ei:
        await rest.fetch_snapshot_body("BTCUSDT", "BTCUSDT")
    assert "bybit/BTCUSDT" in str(ei.value) and f"retCode {code}" in str(ei.value)
    assert budget.stats.throttles == 0


async def test_fetch_snapshot_body_on_403_is_an_ip_ban():
    rest, budget = client(answer(b"access too frequent", status=403)[0])
    with pytest.raises(IPBanned):
        await rest.fetch_snapshot_body("BTCUSDT", "BTCUSDT")
    assert budget.stats.bans == 1
