"""KuCoin poll snapshots read at the writer's flush (`pipeline/bodies.py` with
`exchanges/kucoin/batch.py`) store the same rows as the simple path (parse on arrival,
`Normalizer.feed`, `frame_from_columns`); bodies outside the exact wire shape are read one
by one, bad ones left out and named; error bodies never wait for the flush
(`KucoinRest.fetch_snapshot_body` raises them at once).

Inputs: bodies from the simulator's `GET /api/v1/level2/snapshot` handler (what the soak
sees; 2 x 1000 levels, prices and sizes JSON numbers), the documented example, bodies
with chosen number texts, and damaged copies of them. The reader rewrites each number
into `rules.canonical_decimal` form with string operations: that is compared with the
function itself on generated texts, one by one.
"""

from __future__ import annotations

import random

import bodies_support
import httpx
import orjson
import polars as pl
import pytest
import trio

from cryptoflow.errors import RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.fields import TIME_MAX_MS, TIME_MIN_MS
from cryptoflow.exchanges.kucoin import batch, parse, rules
from cryptoflow.exchanges.kucoin.rest import KucoinRest
from cryptoflow.models import MARKET_FUTURES, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.bodies import SnapshotCodec, frame_from_bodies
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest
from cryptoflow.sim.kucoin import KucoinVenue
from cryptoflow.sim.market import Market

CODEC = SnapshotCodec(
    parse=parse.parse_rest_snapshot,
    read=batch.read_snapshot_bodies,
    count_levels=parse.count_snapshot_levels,
)
EX, MKT, SYM = "kucoin", MARKET_FUTURES, "BTCUSDT"
RECV = 1_700_000_000_000_000_000
#: XBTUSDTM's lot (sim/kucoin.py MULTIPLIERS): sizes are lots, stored x multiplier
LOT = "0.001"

#: the documented example (docs/exchanges.md, KuCoin), compact as the venue sends it
DOC_BODY = orjson.dumps(
    {
        "code": "200000",
        "data": {
            "symbol": "XBTUSDTM",
            "sequence": 100,
            "asks": [[5000.0, 1000], [6000.0, 1983]],
            "bids": [[3200.0, 800], [3100.0, 100]],
            "ts": 1604643655040584408,
        },
    }
)


def body(
    bids: str = "[3200.0,800],[3100.0,100]",
    asks: str = "[5000.0,1000],[6000.0,1983]",
    *,
    sequence: str = "100",
    ts: str = "1604643655040584408",
) -> bytes:
    """A body in the wire shape with the level arrays' and integers' text as given."""
    return (
        f'{{"code":"200000","data":{{"symbol":"XBTUSDTM","sequence":{sequence},'
        f'"asks":[{asks}],"bids":[{bids}],"ts":{ts}}}}}'
    ).encode()


def _sim_bodies(symbol: str, n: int) -> list[bytes]:
    """n bodies of the simulator's level2 snapshot handler, one book tick apart."""
    stats = Stats()
    market = Market(KucoinVenue.make_books([symbol], seed=7, depth=1000), stats)
    venue = KucoinVenue(market, Faults(), stats)
    query = {"symbol": symbol}
    path = "/api/v1/level2/snapshot"
    req = HttpRequest("GET", path, path, query, {}, b"", "")
    out = []
    for _ in range(n):
        out.append(trio.run(venue._snapshot, req).body)
        market.step()
    return out


#: made once, outside any test's event loop (the handler is a trio coroutine)
SIM = _sim_bodies("XBTUSDTM", 3)
#: other price scales: 3000.01 (ETH), 0.12001 (DOGE), 0.6001 (XRP)
SIM_OTHERS = [_sim_bodies(s, 1)[0] for s in ("ETHUSDTM", "DOGEUSDTM", "XRPUSDTM")]


def items_of(
    bodies: list[bytes], source: SnapshotSource = SnapshotSource.POLL
) -> list[SnapshotBody]:
    return [SnapshotBody(EX, MKT, SYM, b, RECV + i * 10**10, source) for i, b in enumerate(bodies)]


def simple_frame(items: list[SnapshotBody], multiplier: str = LOT) -> pl.DataFrame:
    return bodies_support.simple_frame(rules.RULES, parse.parse_rest_snapshot, items, multiplier)


def read(items: list[SnapshotBody]) -> batch.SnapshotBatch | None:
    return bodies_support.read_batch(batch.read_snapshot_bodies, items)


def test_the_simulator_sends_the_documented_shape():
    """The inputs below are what the tests mean them to be: numbers, asks first."""
    for b in (*SIM, *SIM_OTHERS):
        assert b.startswith(b'{"code":"200000","data":{"symbol":"')
        data = orjson.loads(b)["data"]
        assert list(data) == ["symbol", "sequence", "asks", "bids", "ts"]
        assert len(data["asks"]) == len(data["bids"]) == 1000
        assert all(type(v) in (int, float) for lv in data["asks"] + data["bids"] for v in lv)
    assert b".0," in SIM[0]  # prices such as 60001.0: the canonical form differs


# --- (a) the batch read gives the simple path's rows -----------------------------------


@pytest.mark.parametrize("multiplier", [LOT, "1"])
@pytest.mark.parametrize("source", [SnapshotSource.POLL, SnapshotSource.RESYNC])
def test_batch_read_equals_the_simple_path_on_simulator_bodies(multiplier, source):
    items = items_of(SIM, source)
    assert len({b.body for b in items}) == 3  # the book moved between them
    parsed = read(items)
    assert parsed is not None  # the batch read them, no fallback
    assert parsed.heads.columns == ["lastUpdateId", "event_time", "T"]
    assert parsed.heads.height == 3
    frame, rejected = frame_from_bodies(EX, MKT, SYM, multiplier, CODEC, items)
    assert rejected == []
    assert frame.height == 3 * 2000 == sum(parse.count_snapshot_levels(b.body) for b in items)
    assert frame.equals(simple_frame(items, multiplier))


def test_batch_read_equals_the_simple_path_on_other_price_scales():
    items = items_of([*SIM_OTHERS, SIM[0]])
    assert read(items) is not None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, "0.01", CODEC, items)
    assert rejected == [] and frame.equals(simple_frame(items, "0.01"))


def test_wire_rows_are_the_parsed_levels_in_canonical_text():
    """Before any cast: price and raw_quantity are the strings `parse_rest_snapshot`
    gives (bids then asks, levels numbered per side), the heads its ids and times."""
    zeros = body(bids="[1.50,2.500],[0.0,0],[0.000,10.0]", asks="[100.010,1],[7,0.50]")
    items = items_of([*SIM[:2], DOC_BODY, zeros])
    parsed = read(items)
    assert parsed is not None
    for i, b in enumerate(items):
        snap = parse.parse_rest_snapshot(b.body, SYM, b.receive_time)
        head = parsed.heads.row(i)
        assert head == (snap.last_update_id, snap.event_time, None)
        rows = parsed.rows.filter(pl.col("_i") == i)
        assert list(zip(rows["price"], rows["raw_quantity"], strict=True)) == snap.bids + snap.asks
        assert rows["side"].to_list() == ["bid"] * len(snap.bids) + ["ask"] * len(snap.asks)
        assert rows["level"].to_list() == [*range(len(snap.bids)), *range(len(snap.asks))]
        assert set(rows["timestamp"]) == {snap.event_time}
        assert set(rows["last_update_id"]) == {snap.last_update_id}
        assert set(rows["receive_time"]) == {b.receive_time}
        assert rows["transaction_time"].null_count() == rows.height
    assert parsed.rows.filter(pl.col("_i") == 2)["price"].to_list() == [
        "3200",
        "3100",
        "5000",
        "6000",
    ]
    assert parsed.rows.filter(pl.col("_i") == 3).select("price", "raw_quantity").rows() == [
        ("1.5", "2.5"),
        ("0", "0"),
        ("0", "10"),
        ("100.01", "1"),
        ("7", "0.5"),
    ]


@pytest.mark.parametrize(
    "variant",
    [
        DOC_BODY,
        body(asks=""),
        body(bids=""),
        body(bids="", asks=""),  # no rows
        body(bids="[1.50,2.500],[0.0,0],[0.000,10.0]", asks="[100.010,1]"),
        body(bids="[123456789.123456789,0.00000001]", asks="[7,100000]"),
        body(sequence=str(2**63 - 1)),
        body(sequence="0"),
        # `ts` in each unit `rules.ns_to_ms` tells by magnitude, at the edges of the time
        # window (`fields.TIME_MIN_MS`; outside it the parser refuses, see
        # tests/test_time_window.py): ns, µs, ms
        body(ts=str(TIME_MIN_MS * 10**6)),
        body(ts=str(TIME_MAX_MS * 10**6 - 1)),
        body(ts=str(TIME_MIN_MS * 10**3)),
        body(ts=str(TIME_MAX_MS * 10**3 - 1)),
        body(ts=str(TIME_MIN_MS)),
        body(ts=str(TIME_MAX_MS - 1)),
        body(ts="1551770400000"),  # ms
    ],
    ids=[
        "doc",
        "no-asks",
        "no-bids",
        "empty",
        "trailing-zeros",
        "long-fractions",
        "max-sequence",
        "zero-sequence",
        "ts-ns-min",
        "ts-ns-max",
        "ts-us-min",
        "ts-us-max",
        "ts-ms-min",
        "ts-ms-max",
        "ts-ms",
    ],
)
def test_batch_read_equals_the_simple_path_on_the_documented_body_and_its_variants(variant):
    items = items_of([SIM[0], variant, DOC_BODY])
    parsed = read(items)
    assert parsed is not None
    snap = parse.parse_rest_snapshot(variant, SYM, 0)
    assert parsed.heads.row(1) == (snap.last_update_id, snap.event_time, None)
    frame, rejected = frame_from_bodies(EX, MKT, SYM, LOT, CODEC, items)
    assert rejected == []
    assert frame.height == sum(parse.count_snapshot_levels(b.body) for b in items)
    assert frame.equals(simple_frame(items))


# --- (b) the number texts: canonical_decimal, by string operations ---------------------


def _number_texts(rng: random.Random, n: int) -> list[str]:
    """JSON numbers the reader accepts (no sign, no exponent): integers and decimals,
    short and long, with and without trailing zeros, all-zero fractions."""
    edge = [
        "0",
        "0.0",
        "0.00000",
        "0.5",
        "0.50",
        "0.05",
        "0.050",
        "0.000001",
        "1",
        "10",
        "100",
        "100.0",
        "100.00",
        "100.001",
        "100.0010",
        "5000.0",
        "60001.0",
        "27690.50",
        "9" * 100,
        "1" + "0" * 99,
        "1" + "0" * 99 + ".0",
        "1" + "0" * 99 + "." + "0" * 50 + "1" + "0" * 30,
        "0." + "0" * 200,
    ]
    digits = "0123456789"
    out = list(edge)
    for _ in range(n):
        k = rng.choice([1, 1, 2, 3, 5, 8, 17, 40])
        whole = (
            "0"
            if rng.random() < 0.3
            else rng.choice("123456789") + "".join(rng.choices(digits, k=k - 1))
        )
        kind = rng.random()
        if kind < 0.2:
            out.append(whole)
        elif kind < 0.4:
            out.append(whole + "." + "0" * rng.randint(1, 6))
        else:
            frac = "".join(rng.choices(digits, k=rng.randint(1, 20)))
            out.append(whole + "." + frac + "0" * rng.choice([0, 0, 1, 2, 7]))
    return out


def test_canonicalization_equals_canonical_decimal_text_by_text():
    texts = _number_texts(random.Random(20240601), 20_000)
    expected = [rules.canonical_decimal(t) for t in texts]
    # as level arrays: each text once as a price (before `,`), once as a size (before `]`)
    arrays = [",".join(f"[{p},{q}]" for p, q in zip(texts, texts[1:] + texts[:1], strict=True))]
    got = (
        pl.DataFrame({"a": arrays})
        .select(batch._canonical(pl.col("a")).str.split(","))
        .explode("a")["a"]
        .to_list()
    )
    assert got[0::2] == expected
    assert got[1::2] == expected[1:] + expected[:1]
    # and through the whole reader, in bodies of 250 levels a side
    step = 500
    bodies = []
    for s in range(0, len(texts) - step + 1, step):
        chunk = texts[s : s + step]
        levels = [f"[{p},{q}]" for p, q in zip(chunk[0::2], chunk[1::2], strict=True)]
        bodies.append(body(bids=",".join(levels[:125]), asks=",".join(levels[125:])))
    parsed = batch.read_snapshot_bodies(bodies, [RECV] * len(bodies), "poll")
    assert parsed is not None
    for i, b in enumerate(bodies):
        snap = parse.parse_rest_snapshot(b, SYM, RECV)
        rows = parsed.rows.filter(pl.col("_i") == i)
        assert list(zip(rows["price"], rows["raw_quantity"], strict=True)) == snap.bids + snap.asks


#: texts where a level number belongs that the reader refuses (JSON or not)
NOT_READ = ["-1", "-0", "-0.0", "-0.5", "1e5", "1E5", "1.5e-05", "1.0E+2", "01", "00.5"]
NOT_READ += ["1.", ".5", "+1", "1" + "0" * 100, "0x10", "NaN", "Infinity", '"5000.0"']
NOT_READ += ["true", "null", "1 ", ""]


@pytest.mark.parametrize("number", NOT_READ)
def test_a_number_outside_the_grammar_refuses_the_batch(number):
    """No sign, exponent, leading zero or quoted number; at most 100 integer digits.
    (Those the checked parser accepts are read by it, with the same rows: below.)"""
    for variant in (
        body(bids=f"[{number},1]"),
        body(asks=f"[3.5,{number}]"),
        body(bids=f"[1,1],[{number},2]"),
    ):
        assert batch.read_snapshot_bodies([DOC_BODY, variant], [RECV, RECV], "poll") is None


# --- (c) anything outside the exact wire shape: the checked parser decides -------------


def _replace(old: bytes, new: bytes):
    def damage(b: bytes) -> bytes:
        assert old in b
        return b.replace(old, new, 1)

    return damage


def _edit(**data_edits: object):
    """`data` fields replaced (None: removed), re-encoded compactly (orjson)."""

    def damage(b: bytes) -> bytes:
        obj = orjson.loads(b)
        for k, v in data_edits.items():
            if v is None:
                obj["data"].pop(k)
            else:
                obj["data"][k] = v
        return orjson.dumps(obj)

    return damage


def _first_level(new: bytes):
    """The first ask replaced by the level text `new`."""
    return _replace(b'"asks":[[', b'"asks":[' + new + b",[")


#: valid JSON that `parse_rest_snapshot` accepts, outside the batch reader's grammar
UNUSUAL = {
    "pretty": lambda b: orjson.dumps(orjson.loads(b), option=orjson.OPT_INDENT_2),
    "space": _replace(b'"sequence":', b'"sequence": '),
    "extra-key": _replace(b'"ts":', b'"x":[1],"ts":'),
    "msg-key": _replace(b'"data":', b'"msg":"","data":'),
    "bids-first": lambda b: orjson.dumps(
        {
            "code": "200000",
            "data": {
                k: orjson.loads(b)["data"][k] for k in ("symbol", "sequence", "bids", "asks", "ts")
            },
        }
    ),
    "no-symbol": _edit(symbol=None),
    "escape": _replace(b'"symbol":"XBTUSDTM"', b'"symbol":"XBT\\u0055SDTM"'),
    "code-as-int": _replace(b'"code":"200000"', b'"code":200000'),
    "sequence-as-string": _edit(sequence="7"),
    "exponent": _first_level(b"[1.5e-05,1E+2]"),
    "negative-zero": _first_level(b"[-0.0,-0]"),
    "negative": _first_level(b"[-5.50,-1]"),
    "string-numbers": _first_level(b'["5000.0","2.50"]'),
    "three-numbers": _first_level(b"[5000.0,1,7]"),  # extra elements are dropped
    "long-integer": _first_level(b"[" + b"1" * 150 + b",1]"),
    "trailing-newline": lambda b: b + b"\n",
}

#: bodies `parse_rest_snapshot` rejects: (damage, a word its message holds)
BAD = {
    "truncated": (lambda b: b[:-40], "not JSON"),
    "one-number-level": (_first_level(b"[5000.0]"), "not [price, size]"),
    "string-not-a-number": (_first_level(b'["x",1]'), "not a number"),
    "nan": (_first_level(b"[NaN,1]"), "not a number"),
    "bool": (_first_level(b"[true,1]"), "not a number"),
    "missing-sequence": (_edit(sequence=None), "'sequence'"),
    "missing-ts": (_edit(ts=None), "'ts'"),
    "float-ts": (_replace(b'"ts":', b'"ts":1.5,"x":'), "'ts'"),
    "asks-not-a-list": (_edit(asks={}), "'data.asks'"),
    "data-missing": (_replace(b'"data":', b'"dat":'), "'data'"),
    "error-code": (_replace(b'"code":"200000"', b'"code":"300000"'), "code 300000"),
    "throttle-code": (_replace(b'"code":"200000"', b'"code":"429000"'), "code 429000"),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_a_body_outside_the_wire_shape_is_read_one_by_one_with_the_same_rows(name):
    good = items_of(SIM)
    odd = SnapshotBody(EX, MKT, SYM, UNUSUAL[name](good[1].body), good[1].receive_time)
    parse.parse_rest_snapshot(odd.body, SYM, 0)  # valid for the checked parser
    items = [good[0], odd, good[2]]
    assert read([odd]) is None and read(items) is None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, LOT, CODEC, items)
    assert rejected == [] and frame.equals(simple_frame(items))


def test_unusual_numbers_are_canonical_on_the_checked_path():
    """What the reader leaves to the checked parser still ends in canonical text."""
    odd = UNUSUAL["negative-zero"](DOC_BODY)
    assert parse.parse_rest_snapshot(odd, SYM, 0).asks[0] == ("0", "0")
    odd = UNUSUAL["exponent"](DOC_BODY)
    assert parse.parse_rest_snapshot(odd, SYM, 0).asks[0] == ("0.000015", "100")


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_body_is_left_out_named_and_the_others_kept(name):
    damage, why = BAD[name]
    good = items_of(SIM)
    bad = SnapshotBody(EX, MKT, SYM, damage(good[1].body), good[1].receive_time)
    items = [good[0], bad, good[2]]
    assert read([bad]) is None and read(items) is None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, LOT, CODEC, items)
    assert len(rejected) == 1 and "kucoin/BTCUSDT" in rejected[0], rejected
    assert why in rejected[0], rejected
    assert frame.equals(simple_frame([good[0], good[2]]))


@pytest.mark.parametrize(
    "variant",
    [
        body(sequence=str(2**63)),  # over Int64
        body(ts=str(2**63)),
        body(sequence="01"),  # not JSON
        body(sequence="1.0"),
        body(ts="-0.5"),
        DOC_BODY.replace(b'"XBTUSDTM"', b'"XBT\x01USDTM"'),  # a control character
        DOC_BODY.replace(b'"XBTUSDTM"', b'"\xff"'),  # not UTF-8
        DOC_BODY.replace(b'"code":"200000"', b'"code":"200001"'),
        DOC_BODY.replace(b"{", b" {", 1),
        DOC_BODY.replace(b"1983]", b"1983],"),  # a trailing comma
        DOC_BODY.replace(b"[[", b"[ [", 1),
        DOC_BODY.replace(b"}}", b"},}", 1),
        DOC_BODY + b"\n",
        DOC_BODY[:-1],
        b"",
    ],
)
def test_the_batch_reader_refuses_error_codes_and_near_misses(variant):
    assert batch.read_snapshot_bodies([DOC_BODY, variant], [RECV, RECV], "poll") is None


def test_reader_rejects_mismatched_receive_times_and_nothing():
    assert batch.read_snapshot_bodies([], [], "poll") is None
    assert batch.read_snapshot_bodies([DOC_BODY, DOC_BODY], [RECV], "poll") is None


# --- (d) the levels a body holds, counted before it is parsed --------------------------


def test_count_snapshot_levels_is_the_row_count():
    for b in (
        *SIM,
        *SIM_OTHERS,
        DOC_BODY,
        body(asks=""),
        body(bids=""),
        body(bids="", asks=""),
        body(bids="[1,2]", asks="[3,4]"),
    ):
        snap = parse.parse_rest_snapshot(b, SYM, 0)
        assert parse.count_snapshot_levels(b) == len(snap.bids) + len(snap.asks)
    assert parse.count_snapshot_levels(body(bids="", asks="")) == 0


def test_an_error_body_is_never_left_for_the_flush():
    """What `fetch_snapshot_body` hands on unparsed is certainly `code` "200000"."""
    assert parse.is_plain_success(DOC_BODY)
    assert all(parse.is_plain_success(b) for b in SIM)
    for b in (
        orjson.dumps({"code": "429000", "msg": "Too Many Requests"}),
        orjson.dumps({"code": "300000", "msg": "Contract parameter invalid."}),
        DOC_BODY.replace(b'"data":', b'"code":"429000","data":'),  # JSON keeps the last
        DOC_BODY.replace(b'"data":', b'"c\\u006fde":"429000","data":'),  # the same, escaped
        DOC_BODY.replace(b'"code":"200000"', b'"code": "200000"'),
        DOC_BODY.replace(b'"code":"200000"', b'"code":200000'),
        b"",
    ):
        assert not parse.is_plain_success(b)


# --- (e) fetch_snapshot_body ------------------------------------------------------------


def client(handler) -> tuple[KucoinRest, RateBudget]:
    budget = RateBudget(4000)
    http = httpx.AsyncClient(base_url="http://kc.test", transport=httpx.MockTransport(handler))
    return KucoinRest(http, budget), budget


def answer(content: bytes, status: int = 200, headers: dict[str, str] | None = None):
    seen: list[httpx.URL] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req.url)
        return httpx.Response(status, content=content, headers=headers or {})

    return handler, seen


async def test_fetch_snapshot_body_hands_a_success_body_on_unparsed():
    handler, seen = answer(SIM[0], headers={"gw-ratelimit-limit": "2000"})
    rest, budget = client(handler)
    got = await rest.fetch_snapshot_body("BTCUSDT", "XBTUSDTM", depth_limit=1000)
    assert type(got) is SnapshotBody
    assert (got.exchange, got.market, got.symbol, got.body) == (EX, MKT, SYM, SIM[0])
    assert got.source is SnapshotSource.POLL and got.receive_time > 0
    await rest.fetch_snapshot("BTCUSDT", "XBTUSDTM", depth_limit=1000)
    assert seen[0] == seen[1]  # the same request as fetch_snapshot
    assert seen[0].path == "/api/v1/level2/snapshot"
    assert dict(seen[0].params) == {"symbol": "XBTUSDTM"}
    assert budget.stats.throttles == 0


async def test_fetch_snapshot_body_parses_an_unusual_success_at_once():
    pretty = orjson.dumps(orjson.loads(DOC_BODY), option=orjson.OPT_INDENT_2)
    rest, _ = client(answer(pretty)[0])
    got = await rest.fetch_snapshot_body("BTCUSDT", "XBTUSDTM", source=SnapshotSource.RESYNC)
    assert type(got) is DepthSnapshot
    assert got == parse.parse_rest_snapshot(pretty, SYM, got.receive_time, SnapshotSource.RESYNC)


async def test_fetch_snapshot_body_still_slows_down_on_low_remaining():
    headers = {
        "gw-ratelimit-limit": "2000",
        "gw-ratelimit-remaining": "100",
        "gw-ratelimit-reset": "8000",
    }
    rest, budget = client(answer(DOC_BODY, headers=headers)[0])
    assert type(await rest.fetch_snapshot_body("BTCUSDT", "XBTUSDTM")) is SnapshotBody
    assert 7.0 < budget.blocked_for <= 8.0
    assert budget.stats.throttles == 0


@pytest.mark.parametrize(
    "content",
    [
        orjson.dumps({"code": "429000", "msg": "Too Many Requests"}),
        DOC_BODY.replace(b'"data":', b'"code":"429000","data":'),  # not left for the flush
    ],
)
async def test_fetch_snapshot_body_raises_a_code_throttle_and_waits_for_the_reset(content):
    """As fetch_snapshot (`KucoinRest._checked`): the wait is the longer of the default
    and `gw-ratelimit-reset`."""
    rest, budget = client(answer(content, headers={"gw-ratelimit-reset": "2500"})[0])
    with pytest.raises(RateLimited) as ei:
        await rest.fetch_snapshot_body("BTCUSDT", "XBTUSDTM")
    assert ei.value.retry_after == pytest.approx(2.5)
    assert budget.stats.throttles == 1 and 2.0 < budget.blocked_for <= 2.5


async def test_fetch_snapshot_body_on_http_429_waits_for_the_reset():
    content = orjson.dumps({"code": "429000", "msg": "Too Many Requests"})
    rest, budget = client(answer(content, 429, {"gw-ratelimit-reset": "3500"})[0])
    with pytest.raises(RateLimited) as ei:
        await rest.fetch_snapshot_body("BTCUSDT", "XBTUSDTM")
    assert ei.value.retry_after == pytest.approx(3.5)
    assert 3.0 < budget.blocked_for <= 3.5


@pytest.mark.parametrize(
    ("code", "error"),
    [("300000", RequestRejected), ("500000", ServerError), ("503000", ServerError)],
)
async def test_fetch_snapshot_body_raises_other_codes(code, error):
    content = orjson.dumps({"code": code, "msg": "no"})
    rest, budget = client(answer(content)[0])
    with pytest.raises(error) as ei:
        await rest.fetch_snapshot_body("BTCUSDT", "XBTUSDTM")
    assert "kucoin/BTCUSDT" in str(ei.value) and f"code {code}" in str(ei.value)
    assert budget.stats.throttles == 0
