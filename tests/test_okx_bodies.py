"""OKX poll snapshots read at the writer's flush (`pipeline/bodies.py` with the OKX codec:
`exchanges/okx/batch.py`, `parse.parse_snapshot_body`, `parse.count_snapshot_levels`) store
the same rows as the simple path (`parse_rest_snapshot` on arrival, `Normalizer`,
`frame_from_columns`), with OKX's contract multiplier; bodies outside the exact wire shape
go through the checked parser, and only those it rejects are left out, named.
`OkxRest.fetch_snapshot_body` keeps success bodies unparsed and raises error codes at once.

Inputs: bodies made by the simulator's OKX REST handler (2 x 1000 levels), the documented
example body, and damaged copies.
"""

from __future__ import annotations

import functools

import bodies_support
import httpx
import orjson
import polars as pl
import pytest
import trio

from cryptoflow.book.sync import BookState
from cryptoflow.errors import RateLimited, RequestRejected, ServerError
from cryptoflow.exchanges.okx import batch, parse, rules
from cryptoflow.exchanges.okx.rest import OkxRest
from cryptoflow.models import DepthDiff, DepthSnapshot, SnapshotBody, SnapshotSource
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.pipeline.bodies import SnapshotCodec, frame_from_bodies
from cryptoflow.pipeline.normalize import Normalizer
from cryptoflow.sim.faults import Faults, Stats
from cryptoflow.sim.http import HttpRequest
from cryptoflow.sim.market import Market
from cryptoflow.sim.okx import OkxVenue

CODEC = SnapshotCodec(
    parse=parse.parse_snapshot_body,
    read=batch.read_snapshot_bodies,
    count_levels=parse.count_snapshot_levels,
)
EX, MKT, SYM, INST = "okx", "futures", "BTCUSDT", "BTC-USDT-SWAP"
CT_VAL = "0.01"  # the simulator's (and OKX's) ctVal of BTC-USDT-SWAP
RECV = 1_795_000_000_000_000_000
#: OKX's documented example body (exchanges.md), compact as OKX sends it: no seqId
DOC = (
    b'{"code":"0","msg":"","data":[{"asks":[["41006.8","0.60038921","0","1"]],'
    b'"bids":[["41006.3","0.30178218","0","2"]],"ts":"1629966436396"}]}'
)


def _venue() -> OkxVenue:
    stats = Stats()
    return OkxVenue(Market(OkxVenue.make_books([INST], 7, 5000), stats), Faults(), stats)


async def _sim_body(venue: OkxVenue, sz: int) -> bytes:
    path = "/api/v5/market/books-full" if sz > 400 else "/api/v5/market/books"
    req = HttpRequest("GET", path, path, {"instId": INST, "sz": str(sz)}, {}, b"", "127.0.0.1")
    resp = await venue._books(req)
    assert resp.status == 200
    return resp.body


@functools.cache
def sim_bodies(n: int, sz: int = 1000) -> tuple[bytes, ...]:
    """n books bodies of the simulator, the market a tick further each time."""
    venue = _venue()

    async def run() -> list[bytes]:
        out = []
        for _ in range(n):
            out.append(await _sim_body(venue, sz))
            venue.market.step()
        return out

    return tuple(trio.run(run))


def items(raw: list[bytes]) -> list[SnapshotBody]:
    return [SnapshotBody(EX, MKT, SYM, b, RECV + i * 10**10) for i, b in enumerate(raw)]


def simple_frame(bodies: list[SnapshotBody]) -> pl.DataFrame:
    return bodies_support.simple_frame(rules.RULES, parse.parse_rest_snapshot, bodies, CT_VAL)


def read(bodies: list[SnapshotBody]) -> batch.SnapshotBatch | None:
    return bodies_support.read_batch(batch.read_snapshot_bodies, bodies)


# --- (a) same rows as the simple path ------------------------------------------------------


def test_simulator_bodies_are_read_in_one_batch_with_the_simple_paths_rows():
    bodies = items(list(sim_bodies(6)))
    parsed = read(bodies)
    assert parsed is not None  # the fast shape, not the fallback
    assert parsed.rows.height == 6 * 2000
    objs = [orjson.loads(b.body)["data"][0] for b in bodies]
    assert parsed.heads["lastUpdateId"].to_list() == [o["seqId"] for o in objs]
    assert parsed.heads["event_time"].to_list() == [int(o["ts"]) for o in objs]
    assert parsed.heads["T"].null_count() == 6
    frame, rejected = frame_from_bodies(EX, MKT, SYM, CT_VAL, CODEC, bodies)
    assert rejected == []
    expected = simple_frame(bodies)
    assert frame.equals(expected)
    # bids first although OKX sends the asks first; the multiplier applied
    first = frame.head(1).row(0, named=True)
    assert first["side"] == "bid" and first["level"] == 0
    assert first["price"] == float(objs[0]["bids"][0][0])
    assert first["quantity"] == pytest.approx(float(objs[0]["bids"][0][1]) * 0.01)


def test_documented_body_empty_sides_and_no_seq_id_in_one_batch():
    sim = sim_bodies(1, 5)[0]
    no_bids = sim.replace(sim[sim.index(b'"bids":[') : sim.index(b'],"ts"') + 1], b'"bids":[]')
    empty = DOC.replace(b'[["41006.8","0.60038921","0","1"]]', b"[]").replace(
        b'[["41006.3","0.30178218","0","2"]]', b"[]"
    )
    bodies = items([DOC, no_bids, empty, sim])
    parsed = read(bodies)
    assert parsed is not None
    assert parsed.heads["lastUpdateId"].to_list()[0] == rules.NO_SEQ_ID
    assert parsed.heads["lastUpdateId"].to_list()[3] == orjson.loads(sim)["data"][0]["seqId"]
    frame, rejected = frame_from_bodies(EX, MKT, SYM, CT_VAL, CODEC, bodies)
    assert rejected == [] and frame.equals(simple_frame(bodies))
    assert frame.height == 2 + 5 + 0 + 10
    assert frame["last_update_id"].to_list()[:2] == [rules.NO_SEQ_ID] * 2


# --- (b) bodies outside the exact shape ----------------------------------------------------


def _first_level(b: bytes) -> bytes:
    start = b.index(b'[["') + 1
    return b[start : b.index(b"]", start) + 1]


#: (damage, None: the checked parser accepts it, same rows; else words of its rejection)
DAMAGES = [
    ("whitespace", lambda b: b.replace(b'"msg":""', b'"msg": ""'), None),
    ("extra key", lambda b: b.replace(b'"ts":', b'"x":1,"ts":'), None),
    ("keys reordered", lambda b: b.replace(b'{"code":"0","msg":""', b'{"msg":"","code":"0"'), None),
    ("level of 3", lambda b: b.replace(b'","0","', b'","', 1), None),
    ("level of 5", lambda b: b.replace(b'","0","', b'","0","0","', 1), None),
    ("number for the deprecated field", lambda b: b.replace(b'","0","', b'",0,"', 1), None),
    ("escape in a price", lambda b: b.replace(b'["6', b'["\\u0036', 1), None),
    (
        "ts as a number",
        lambda b: b.replace(b'"ts":"', b'"ts":').replace(b'","seqId"', b',"seqId"'),
        None,
    ),
    (
        "seqId as a string",
        lambda b: b.replace(b'"seqId":', b'"seqId":"').replace(b"}]}", b'"}]}'),
        None,
    ),
    ("seqId null", lambda b: b[: b.index(b'"seqId":') + 8] + b"null}]}", None),
    ("two books", lambda b: b.replace(b"}]}", b'},{"asks":[],"bids":[],"ts":"1"}]}'), None),
    (
        "number for a price",
        lambda b: b.replace(_first_level(b), b"[1," + _first_level(b)[1:]),
        "non-string",
    ),
    ("level of 1", lambda b: b.replace(_first_level(b), b'["1"]'), "not [price, size"),
    ("control character", lambda b: b.replace(b'"msg":""', b'"msg":"\t"'), "not JSON"),
    ("truncated", lambda b: b[:-40], "not JSON"),
    ("empty data", lambda b: b'{"code":"0","msg":"","data":[]}', "'data'"),
    ("missing ts", lambda b: b.replace(b'"ts":"', b'"tz":"'), "'ts'"),
    ("code 50011", lambda b: b'{"code":"50011","msg":"Too Many Requests","data":[]}', "50011"),
    (
        "code 51001",
        lambda b: b'{"code":"51001","msg":"Instrument ID does not exist","data":[]}',
        "51001",
    ),
    ("a second code", lambda b: b.replace(b'"msg":""', b'"msg":"","code":"50001"'), "50001"),
]


@pytest.mark.parametrize(("name", "damage", "why"), DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_body_outside_the_shape_is_parsed_alone_and_left_out_only_if_bad(name, damage, why):
    good = items(list(sim_bodies(3, 50)))
    bad = SnapshotBody(EX, MKT, SYM, damage(good[1].body), good[1].receive_time)
    assert bad.body != good[1].body, name
    bodies = [good[0], bad, good[2]]
    assert read([bad]) is None and read(bodies) is None
    frame, rejected = frame_from_bodies(EX, MKT, SYM, CT_VAL, CODEC, bodies)
    if why is None:  # valid OKX JSON the checked parser reads: the same rows as on arrival
        assert rejected == []
        assert frame.equals(simple_frame(bodies))
    else:
        assert len(rejected) == 1 and "okx/BTCUSDT" in rejected[0], rejected
        assert why in rejected[0], rejected
        assert frame.equals(simple_frame([good[0], good[2]]))


def test_the_reader_accepts_nothing_but_bytes_or_text_and_matching_times():
    (body,) = sim_bodies(1, 5)
    assert batch.read_snapshot_bodies([], [], "poll") is None
    assert batch.read_snapshot_bodies([body, body], [1], "poll") is None
    assert batch.read_snapshot_bodies([b"\xff" + body], [1], "poll") is None
    assert batch.read_snapshot_bodies([body.decode()], [1], "poll") is not None
    too_big = body.replace(b'"seqId":', b'"seqId":9' + b"9" * 19)
    assert batch.read_snapshot_bodies([too_big], [1], "poll") is None


# --- (c) level counting ---------------------------------------------------------------------


def test_count_snapshot_levels_equals_the_rows():
    raw = [
        *sim_bodies(6),
        *sim_bodies(3, 50),
        DOC,
        b'{"code":"0","msg":"","data":[{"asks":[],"bids":[],"ts":"1629966436396"}]}',
    ]
    for b in raw:
        snap = parse.parse_rest_snapshot(b, SYM, 0)
        assert parse.count_snapshot_levels(b) == len(snap.bids) + len(snap.asks)
    bodies = items(raw)
    frame, _ = frame_from_bodies(EX, MKT, SYM, CT_VAL, CODEC, bodies)
    assert frame.height == sum(parse.count_snapshot_levels(b) for b in raw)


# --- (d) fetch_snapshot_body ----------------------------------------------------------------


def client(handler) -> tuple[OkxRest, RateBudget]:
    budget = RateBudget(1200)
    http = httpx.AsyncClient(base_url="http://okx.test", transport=httpx.MockTransport(handler))
    return OkxRest(http, budget), budget


async def test_fetch_snapshot_body_keeps_a_success_body_unparsed():
    body = await _sim_body(_venue(), 1000)
    seen = []

    def handler(req):
        seen.append(req.url)
        return httpx.Response(200, content=body)

    rest, budget = client(handler)
    got = await rest.fetch_snapshot_body(SYM, INST, depth_limit=1000, source=SnapshotSource.POLL)
    assert type(got) is SnapshotBody
    assert got.body == body and (got.exchange, got.market, got.symbol) == (EX, MKT, SYM)
    assert got.source is SnapshotSource.POLL and got.receive_time > 0
    snap = await rest.fetch_snapshot(SYM, INST, depth_limit=1000)  # the same request
    assert seen[0] == seen[1]
    assert seen[0].path == "/api/v5/market/books-full" and seen[0].params["sz"] == "1000"
    assert budget.stats.requests == 2
    assert parse.parse_rest_snapshot(got.body, SYM, snap.receive_time) == snap


async def test_fetch_snapshot_body_parses_a_success_body_in_another_layout_at_once():
    pretty = orjson.dumps(orjson.loads(DOC), option=orjson.OPT_INDENT_2)
    rest, _ = client(lambda req: httpx.Response(200, content=pretty))
    got = await rest.fetch_snapshot_body(SYM, INST, depth_limit=400)
    assert type(got) is DepthSnapshot and got.bids == [("41006.3", "0.30178218")]


async def test_fetch_snapshot_body_raises_a_rate_limit_code_and_throttles():
    body = b'{"code":"50011","msg":"Too Many Requests","data":[]}'
    rest, budget = client(lambda req: httpx.Response(200, content=body))
    with pytest.raises(RateLimited, match="50011"):
        await rest.fetch_snapshot_body(SYM, INST)
    assert budget.stats.throttles == 1 and budget.blocked_for > 0
    rest, budget = client(lambda req: httpx.Response(429, content=body))
    with pytest.raises(RateLimited):
        await rest.fetch_snapshot_body(SYM, INST)
    assert budget.stats.throttles == 1


async def test_fetch_snapshot_body_raises_a_rate_limit_code_behind_the_success_prefix():
    """JSON keeps the last of duplicated keys: a second `code` makes the body an error,
    and that must still throttle at fetch time, not be left for the writer's flush."""
    (good,) = sim_bodies(1, 5)
    body = good.replace(b'"msg":""', b'"msg":"","code":"50011"')
    assert body.startswith(b'{"code":"0",')
    rest, budget = client(lambda req: httpx.Response(200, content=body))
    with pytest.raises(RateLimited, match="50011"):
        await rest.fetch_snapshot_body(SYM, INST)
    assert budget.stats.throttles == 1


@pytest.mark.parametrize(("code", "exc"), [("51001", RequestRejected), ("50001", ServerError)])
async def test_fetch_snapshot_body_raises_the_venue_error_of_a_code(code, exc):
    body = orjson.dumps({"code": code, "msg": "x", "data": []})
    rest, budget = client(lambda req: httpx.Response(200, content=body))
    with pytest.raises(exc, match=code) as ei:
        await rest.fetch_snapshot_body(SYM, INST)
    assert not isinstance(ei.value, RateLimited) and budget.stats.throttles == 0


def test_the_normalizer_reports_an_error_code_in_a_body_it_parses_and_goes_on():
    """Bodies reach the normalizer only after `fetch_snapshot_body` checked the prefix;
    one that still has an error code is reported (a failed poll), not raised."""
    good = items(list(sim_bodies(2, 5)))
    odd = good[1].body.replace(b'"msg":""', b'"msg":"","code":"50011"')
    bad = SnapshotBody(EX, MKT, SYM, odd, good[1].receive_time)
    out = Normalizer({EX: rules.RULES}, codecs={EX: CODEC}).feed_many([good[0], bad])
    assert [b.rows for b in out.batches] == [10]
    ((symbol, message),) = out.errors
    assert symbol == SYM and "okx/BTCUSDT" in message and "50011" in message


def test_a_poll_body_of_a_synced_book_is_left_for_the_writer_though_a_checksum_book_is_kept():
    """OKX keeps a book for its checksum; that book is checked by every diff, so a poll
    snapshot of a synced symbol is not needed on arrival (only `verify_book` wants it)."""
    (poll,) = items(list(sim_bodies(1, 5)))
    stream_snapshot = DepthDiff(
        EX, MKT, SYM, 1, None, 100, 100, -1, [("1", "1")], [("2", "1")], 1, is_snapshot=True
    )
    norm = Normalizer({EX: rules.RULES}, codecs={EX: CODEC})
    norm.feed_many([stream_snapshot])
    sync = norm.sync(EX, MKT, SYM)
    assert sync.state is BookState.SYNCED and sync.book is not None  # the checksum's book
    out = norm.feed_many([poll])
    assert out.batches == [] and [b.rows for b in out.bodies] == [10]
    # with drift checks the poll snapshot is parsed on arrival, as before
    tracked = Normalizer({EX: rules.RULES}, codecs={EX: CODEC}, track_book=True)
    tracked.feed_many([stream_snapshot])
    out = tracked.feed_many([poll])
    assert out.bodies == [] and [b.rows for b in out.batches] == [10]
