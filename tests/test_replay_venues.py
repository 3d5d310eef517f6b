"""`replay` on the Bybit and OKX recordings (and KuCoin example payloads), compared with
an independent checker (stdlib json/zlib, no project code), also on copies with messages
removed on purpose so the gap count is not always zero."""

from __future__ import annotations

import json
import zlib
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from configtools import make_config
from paths import RECORDED
from typer.testing import CliRunner

from cryptoflow.cli import app as cli_app
from cryptoflow.errors import DataError, UsageError
from cryptoflow.tools.replay import replay_summary, run

REC = RECORDED
REPO = Path(__file__).resolve().parents[1]
BYBIT1 = REC / "bybit/linear_orderbook1_BAND_RAD_SNT_AIOZ_2025-06-13.jsonl"
BYBIT500 = REC / "bybit/linear_orderbook500_XRPUSDT_2024-12-01.jsonl"
OKX_XMR = REC / "okx/swap_books-l2-tbt_XMR-USDT-SWAP_2021-07-22.jsonl"
OKX_UNI = REC / "okx/swap_books_UNI-USD-SWAP_2022-05-13.jsonl"

pytestmark = pytest.mark.skipif(not REC.is_dir(), reason="shared recordings not present")


def lines_of(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.strip()]


def write(tmp_path: Path, name: str, lines: list[str]) -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def bybit_expect(lines: list[str]) -> dict:
    """Bybit: snapshots' levels -> snapshot_rows, deltas' levels -> rows; a delta whose u is
    not previous u + 1 is a gap (each break in the chain, as for Binance); a snapshot after
    a gap is a resync."""
    out = dict(messages=0, rows=0, gaps=0, resyncs=0, snapshot_rows=0)
    last: dict[str, int] = {}
    broken: set[str] = set()
    for ln in lines:
        out["messages"] += 1
        msg = json.loads(ln)["msg"]
        d, sym = msg["data"], msg["data"]["s"]
        n = len(d["b"]) + len(d["a"])
        if msg["type"] == "snapshot" or d["u"] == 1:
            out["snapshot_rows"] += n
            if sym in broken:
                out["resyncs"] += 1
                broken.discard(sym)
        else:
            out["rows"] += n
            if sym in last and d["u"] != last[sym] + 1:
                out["gaps"] += 1
                broken.add(sym)
        last[sym] = d["u"]
    return out


def okx_crc(bids: dict, asks: dict) -> int:
    b = sorted(bids, key=Decimal, reverse=True)[:25]
    a = sorted(asks, key=Decimal)[:25]
    parts = []
    for i in range(max(len(b), len(a))):
        if i < len(b):
            parts += [b[i], bids[b[i]]]
        if i < len(a):
            parts += [a[i], asks[a[i]]]
    c = zlib.crc32(":".join(parts).encode())
    return c - (1 << 32) if c >= 1 << 31 else c


def okx_expect(lines: list[str]) -> dict:
    """OKX legacy (no seqId): the checksum is the only check; after the first mismatch the
    book is broken until the next snapshot (a resync). An update without levels is one
    marker row (the legacy ids move on with every frame, so it is never a heartbeat)."""
    out = dict(messages=0, rows=0, gaps=0, resyncs=0, snapshot_rows=0)
    bids: dict = {}
    asks: dict = {}
    broken = False
    for ln in lines:
        out["messages"] += 1
        msg = json.loads(ln)["msg"]
        for d in msg["data"]:
            n = len(d["bids"]) + len(d["asks"])
            if msg["action"] == "snapshot":
                out["snapshot_rows"] += n
                bids = {p: q for p, q, *_ in d["bids"] if Decimal(q)}
                asks = {p: q for p, q, *_ in d["asks"] if Decimal(q)}
                if broken:
                    out["resyncs"] += 1
                broken = False
            else:
                out["rows"] += n or 1
                for side, levels in ((bids, d["bids"]), (asks, d["asks"])):
                    for p, q, *_ in levels:
                        if Decimal(q):
                            side[p] = q
                        else:
                            side.pop(p, None)
            if not broken and d.get("checksum") and okx_crc(bids, asks) != d["checksum"]:
                out["gaps"] += 1
                broken = True
    return out


def summary_dict(exchange: str, path: Path, out: Path | None = None, **kw) -> dict:
    s = replay_summary(exchange, path, out, **kw)
    return dict(
        messages=s.messages,
        rows=s.rows,
        gaps=s.gaps,
        resyncs=s.resyncs,
        snapshot_rows=s.snapshot_rows,
    )


@pytest.mark.parametrize("path", [BYBIT1, BYBIT500], ids=["ob1", "ob500"])
def test_bybit_recordings(path):
    lines = lines_of(path)
    expect = bybit_expect(lines)
    assert summary_dict("bybit", path) == expect
    assert expect["gaps"] == 0 and expect["messages"] == len(lines)


def test_bybit_known_counts():
    assert summary_dict("bybit", BYBIT500) == dict(
        messages=50, rows=2966, gaps=0, resyncs=0, snapshot_rows=1000
    )


@pytest.mark.parametrize("drop", [[5], [5, 6, 30]])
def test_bybit_removed_deltas_are_gaps(tmp_path, drop):
    lines = [ln for i, ln in enumerate(lines_of(BYBIT500)) if i not in drop]
    # plus a fresh snapshot at the end (copy of the first one): the book resyncs on it
    lines.append(lines_of(BYBIT500)[0])
    path = write(tmp_path, "cut.jsonl", lines)
    expect = bybit_expect(lines)
    assert expect["gaps"] >= 1 and expect["resyncs"] == 1
    assert summary_dict("bybit", path) == expect


def test_bybit_repeated_identical_snapshot_is_not_a_gap(tmp_path):
    first = lines_of(BYBIT500)[0]
    path = write(tmp_path, "rep.jsonl", [first, first, first])
    assert summary_dict("bybit", path) == dict(
        messages=3, rows=0, gaps=0, resyncs=0, snapshot_rows=3000
    )


def shib_lines() -> list[str]:
    """The XRPUSDT recording as Bybit's per-1000 SHIB contract `SHIB1000USDT` (the symbol
    table's `1000SHIBUSDT`), ending with a REST poll of it at the last delta's id."""
    lines = [ln.replace("XRPUSDT", "SHIB1000USDT") for ln in lines_of(BYBIT500)]
    last = json.loads(lines[-1])
    body = {
        "retCode": 0,
        "retMsg": "OK",
        "result": {"s": "SHIB1000USDT", "b": [["1.9", "5"]], "a": [["2.0", "7"]],
                   "ts": last["msg"]["ts"], "u": last["msg"]["data"]["u"]},
    }  # fmt: skip
    channel = "/v5/market/orderbook?category=linear&symbol=SHIB1000USDT&limit=500"
    rest = {"recv_ns": last["recv_ns"] + 1, "kind": "rest_snapshot", "channel": channel}
    return [*lines, json.dumps({**rest, "msg": body})]


def partitions(root: Path) -> set[str]:
    """`dataset/exchange=/market=/symbol=` of every file written under `root`."""
    return {"/".join(p.relative_to(root).parts[:4]) for p in root.rglob("*.parquet")}


def test_bybit_replay_stores_a_symbol_under_the_tables_name(tmp_path, monkeypatch):
    """Was: replay named rows by the venue (`SHIB1000USDT`) where collect names them by the
    symbol table (`1000SHIBUSDT`), so a replay wrote the same data to another partition."""
    path = write(tmp_path, "shib.jsonl", shib_lines())
    want = {
        f"{ds}/exchange=bybit/market=futures/symbol=1000SHIBUSDT" for ds in ("deltas", "snapshots")
    }
    # as collect: configs/config.yml (and the symbols.yml beside it) by default
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    args = ["replay", "-e", "bybit", "-i", str(path)]
    res = CliRunner().invoke(cli_app, [*args, "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert partitions(out) == want
    assert set(stored(out, "snapshots")["source"]) == {"stream", "replay"}  # ws + REST named
    # or the table beside --config
    monkeypatch.chdir(tmp_path)
    config = make_config(tmp_path / "cfg")
    res = CliRunner().invoke(cli_app, [*args, "--output", "o2", "--config", str(config)])
    assert res.exit_code == 0, res.output
    assert partitions(tmp_path / "o2") == want


def test_replay_symbol_table_errors(tmp_path, monkeypatch, caplog):
    path = write(tmp_path, "shib.jsonl", shib_lines())
    # a --config whose symbols.yml is missing is a usage error naming the file (exit 2)
    res = CliRunner().invoke(
        cli_app, ["replay", "-e", "bybit", "-i", str(path), "-c", str(tmp_path / "config.yml")]
    )
    assert res.exit_code == 2 and f"{tmp_path / 'symbols.yml'}: file not found" in res.output
    # no --config and no configs/ here: the venue's naming rule, with a WARNING saying so
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli_app, ["replay", "-e", "bybit", "-i", str(path), "--output", "o"])
    assert res.exit_code == 0, res.output
    assert "symbols are named by the venue's naming rule" in caplog.text
    assert partitions(tmp_path / "o") == {
        f"{ds}/exchange=bybit/market=futures/symbol=SHIB1000USDT" for ds in ("deltas", "snapshots")
    }


@pytest.mark.parametrize("path", [OKX_XMR, OKX_UNI], ids=["xmr", "uni"])
def test_okx_recordings_checksums_all_match(path):
    lines = lines_of(path)
    expect = okx_expect(lines)
    assert expect["gaps"] == 0
    assert summary_dict("okx", path) == expect


@pytest.mark.parametrize("path", [OKX_XMR, OKX_UNI], ids=["xmr", "uni"])
def test_okx_removed_update_is_a_checksum_gap(tmp_path, path):
    lines = lines_of(path)
    # drop an update that changes the top of the book, then append the snapshot again
    victim = next(
        i
        for i, ln in enumerate(lines)
        if i > 3
        and json.loads(ln)["msg"]["action"] == "update"
        and json.loads(ln)["msg"]["data"][0]["bids"]
    )
    cut = [ln for i, ln in enumerate(lines) if i != victim] + [lines[0]]
    expect = okx_expect(cut)
    assert expect["gaps"] == 1 and expect["resyncs"] == 1
    got = summary_dict("okx", write(tmp_path, "cut.jsonl", cut))
    assert got == expect


def test_okx_writes_contract_rows_under_the_layout(tmp_path):
    summary_dict("okx", OKX_XMR, tmp_path, multipliers=["XMRUSDT=0.1"])
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.parquet"))
    assert files and all(
        str(f).startswith(
            (
                "deltas/exchange=okx/market=futures/symbol=XMRUSDT/year=2021/",
                "snapshots/exchange=okx/market=futures/symbol=XMRUSDT/year=2021/",
            )
        )
        for f in files
    )


def kucoin_lines() -> list[str]:
    """Documented example payloads (exchanges.md), as a recording: REST snapshot at 100,
    then diffs 99..104 (99 and 100 are already in it)."""
    rest = {
        "code": "200000",
        "data": {
            "symbol": "XBTUSDTM",
            "sequence": 100,
            "asks": [[5000.0, 1000], [6000.0, 1983]],
            "bids": [[3200.0, 800], [3100.0, 100]],
            "ts": 1604643655040584408,
        },
    }
    recs = []

    def ws(seq, change):
        msg = {
            "type": "message",
            "topic": "/contractMarket/level2:XBTUSDTM",
            "subject": "level2",
            "data": {"sequence": seq, "change": change, "timestamp": 1604643655041 + seq},
        }
        recs.append(json.dumps({"recv_ns": seq, "kind": "ws", "channel": "level2", "msg": msg}))

    ws(99, "5000.0,sell,83")
    ws(100, "5000.0,sell,84")
    recs.append(
        json.dumps(
            {
                "recv_ns": 1,
                "kind": "rest_snapshot",
                "channel": "/api/v1/level2/snapshot?symbol=XBTUSDTM",
                "msg": rest,
            }
        )
    )
    for seq, change in ((101, "5000.0,sell,85"), (102, "0,buy,0"), (103, "3200.0,buy,0")):
        ws(seq, change)
    return recs


def test_kucoin_example_payloads(tmp_path):
    lines = kucoin_lines()
    path = write(tmp_path, "kc.jsonl", lines)
    # 5 diffs (102 changes no level: its marker row), 4 snapshot levels, no break
    assert summary_dict("kucoin", path) == dict(
        messages=6, rows=5, gaps=0, resyncs=0, snapshot_rows=4
    )
    cut = [ln for ln in lines if '"sequence": 101' not in ln]
    assert summary_dict("kucoin", write(tmp_path, "kc_cut.jsonl", cut)) == dict(
        messages=5, rows=4, gaps=1, resyncs=0, snapshot_rows=4
    )


# --- contract sizes: rows are base units, so a replay needs the multipliers -----------


def okx_instruments(tmp_path: Path, *entries: tuple[str, str, str]) -> Path:
    """An OKX `GET /api/v5/public/instruments?instType=SWAP` body: (instId, ctVal, ctType)."""
    data = [
        {"instType": "SWAP", "instId": inst, "ctVal": ct_val, "ctValCcy": inst.split("-")[0],
         "ctType": ct_type, "lotSz": "1", "tickSz": "0.01", "state": "live"}
        for inst, ct_val, ct_type in entries
    ]  # fmt: skip
    path = tmp_path / "okx-instruments.json"
    path.write_text(json.dumps({"code": "0", "msg": "", "data": data}))
    return path


def stored(root: Path, dataset: str) -> pl.DataFrame:
    return pl.read_parquet(root / dataset / "**" / "*.parquet", hive_partitioning=False)


def assert_scaled(df: pl.DataFrame, multiplier: str) -> None:
    """quantity == raw_quantity x multiplier exactly (the product in decimal)."""
    assert df.height > 0
    for raw, qty in df.select("raw_quantity", "quantity").iter_rows():
        if raw is None:  # the marker row of an update without levels
            assert qty is None
            continue
        assert qty == float(Decimal(repr(raw)) * Decimal(multiplier)), (raw, qty)
    assert (df["quantity"] != df["raw_quantity"]).any()


def test_okx_replay_scales_contracts_with_the_instruments_list(tmp_path):
    """Was: replay stored OKX contracts as base units (multiplier 1, 10x off for XMR)."""
    inst = okx_instruments(tmp_path, ("XMR-USDT-SWAP", "0.1", "linear"), ("BTC-USDT-SWAP",
                           "0.01", "linear"))  # fmt: skip
    out = tmp_path / "out"
    assert run("okx", OKX_XMR, out, instruments=inst) == 0
    assert_scaled(stored(out, "deltas"), "0.1")
    assert_scaled(stored(out, "snapshots"), "0.1")


def test_kucoin_replay_scales_lots_with_multiplier_option(tmp_path):
    path = write(tmp_path, "kc.jsonl", kucoin_lines())
    out = tmp_path / "out"
    # the venue's own name works as well as the stored one
    assert run("kucoin", path, out, multipliers=["XBTUSDTM=0.001"]) == 0
    assert_scaled(stored(out, "deltas"), "0.001")
    assert_scaled(stored(out, "snapshots"), "0.001")


def test_contract_venue_replay_without_multipliers_refuses(tmp_path):
    out = tmp_path / "out"
    for exchange, path in (
        ("okx", OKX_XMR),
        ("kucoin", write(tmp_path, "k.jsonl", kucoin_lines())),
    ):
        res = CliRunner().invoke(
            cli_app, ["replay", "-e", exchange, "-i", str(path), "--output", str(out)]
        )
        assert res.exit_code == 2, res.output
        assert "--instruments FILE" in res.output and "--multiplier SYMBOL=VALUE" in res.output
        assert not out.exists()


def test_symbol_without_multiplier_refuses(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"xmr.jsonl:1: no contract multiplier for okx XMRUSDT"):
        run(
            "okx", write(tmp_path, "xmr.jsonl", lines_of(OKX_XMR)), out, multipliers=["ETHUSDT=0.1"]
        )
    assert not list(tmp_path.rglob("*.parquet"))
    # an inverse swap in the instruments list is refused, not scaled by its USD ctVal
    inst = okx_instruments(tmp_path, ("UNI-USD-SWAP", "10", "inverse"))
    with pytest.raises(UsageError, match="UNIUSD not stored: UNI-USD-SWAP: an inverse swap"):
        run("okx", OKX_UNI, out, instruments=inst)
    assert not list(tmp_path.rglob("*.parquet"))
    # counting only (no output) writes nothing, so needs nothing
    assert replay_summary("okx", OKX_XMR, None).rows > 0


def instrument_record(multiplier: str, recv_ns: int = 0, **msg) -> str:
    """The record a raw capture begins each file with (`storage.rawfile`)."""
    msg = {"symbol": "BTCUSDT", "venue_symbol": "XBTUSDTM", "multiplier": multiplier, **msg}
    rec = {"recv_ns": recv_ns, "kind": "instrument", "channel": "XBTUSDTM", "msg": msg}
    return json.dumps(rec)


def test_capture_instrument_record_gives_the_multiplier_and_options_win(tmp_path):
    """A raw capture says each symbol's contract size: no flags needed; --multiplier (or
    --instruments) still decides when given."""
    path = write(tmp_path, "kc.jsonl", [instrument_record("0.001"), *kucoin_lines()])
    assert run("kucoin", path, tmp_path / "a") == 0
    assert_scaled(stored(tmp_path / "a", "deltas"), "0.001")
    assert_scaled(stored(tmp_path / "a", "snapshots"), "0.001")
    s = replay_summary("kucoin", path, None)
    assert (s.messages, s.instruments) == (6, 1)  # the record is not a book message
    assert run("kucoin", path, tmp_path / "b", multipliers=["XBTUSDTM=0.01"]) == 0
    assert_scaled(stored(tmp_path / "b", "deltas"), "0.01")


def test_capture_multiplier_change_applies_from_its_record_on(tmp_path):
    """A capture spanning a contract-size change (the list read again after a restart): the
    rows before the new record keep the old multiplier, the rows after it take the new."""
    lines = kucoin_lines()
    path = write(
        tmp_path,
        "kc.jsonl",
        [instrument_record("0.001"), *lines[:2], instrument_record("0.002"), *lines[2:]],
    )
    out = tmp_path / "out"
    assert run("kucoin", path, out) == 0
    deltas = stored(out, "deltas")
    assert_scaled(deltas.filter(pl.col("last_update_id") <= 100), "0.001")  # 99, 100
    assert_scaled(deltas.filter(pl.col("last_update_id") > 100), "0.002")  # 101..103
    assert_scaled(stored(out, "snapshots"), "0.002")  # received after the new record


def test_malformed_instrument_record_is_skipped_and_the_symbol_refused(tmp_path, caplog):
    path = write(tmp_path, "kc.jsonl", [instrument_record("-1"), *kucoin_lines()])
    with pytest.raises(UsageError, match=r"kc.jsonl:2: no contract multiplier for kucoin BTCUSDT"):
        run("kucoin", path, tmp_path / "out")
    assert "kc.jsonl:1: skipped: kucoin/BTCUSDT: instrument record: multiplier '-1'" in caplog.text
    assert not list(tmp_path.rglob("*.parquet"))


@pytest.mark.parametrize(
    ("exchange", "kw", "match"),
    [
        ("okx", {"multipliers": ["XMRUSDT"]}, "expected SYMBOL=VALUE"),
        ("okx", {"multipliers": ["XMRUSDT=0"]}, "expected SYMBOL=VALUE"),
        ("okx", {"multipliers": ["XMRUSDT=nan"]}, "expected SYMBOL=VALUE"),
        ("okx", {"instruments": Path("/nonexistent.json")}, "cannot read it"),
        ("binance", {"multipliers": ["BTCUSDT=1"]}, "binance sizes are base units already"),
    ],
)
def test_multiplier_option_errors(tmp_path, exchange, kw, match):
    with pytest.raises(UsageError, match=match):
        run(exchange, OKX_XMR, tmp_path / "out", **kw)


def test_instruments_file_of_another_venue_is_a_usage_error(tmp_path):
    bad = tmp_path / "kucoin.json"
    bad.write_text(json.dumps({"code": "200000", "data": []}))
    with pytest.raises(UsageError, match="cannot be read as okx's instruments list"):
        run("okx", OKX_XMR, tmp_path / "out", instruments=bad)


# --- the wrong --exchange: nothing usable is no replay --------------------------------

SUSHI = REC / "binance/futures_depth_SUSHIUSDT_AKROUSDT_2021-07-22.jsonl"


@pytest.mark.parametrize(
    ("exchange", "path"),
    [
        ("binance", OKX_XMR),
        ("bybit", SUSHI),
        ("bybit", OKX_UNI),
        ("okx", BYBIT500),
        ("kucoin", SUSHI),
        ("kucoin", BYBIT500),
        ("kucoin", OKX_XMR),
    ],
    ids=lambda v: v if isinstance(v, str) else v.parent.name,
)
def test_another_venues_recording_is_an_error_for_every_venue(tmp_path, exchange, path):
    """Found by an audit: under bybit or kucoin another venue's recording exited 0 with
    rows=0 and no warning (their parsers take unknown frames for controls, and replay only
    failed when every record was unreadable, as binance and okx make them)."""
    out = tmp_path / "out"
    args = ["replay", "-e", exchange, "-i", str(path), "--output", str(out)]
    if exchange in ("okx", "kucoin"):
        args += ["--multiplier", "XBTUSDT=1"]
    res = CliRunner().invoke(cli_app, args)
    assert res.exit_code == 1, res.output
    assert " rows=0 " in res.stdout
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {path}: none of its ")
    assert f"could be read as {exchange} book data" in error
    assert "is --exchange right for this recording?" in error
    assert not out.exists()


def bybit_control(n: int) -> str:
    msg = {"success": True, "ret_msg": "pong" if n % 2 else "", "conn_id": "c1",
           "op": "ping" if n % 2 else "subscribe"}  # fmt: skip
    return json.dumps({"recv_ns": n, "kind": "ws", "channel": "orderbook.500.XRPUSDT", "msg": msg})


def test_controls_among_data_are_a_replay_and_controls_alone_are_not(tmp_path):
    """Acks and pongs are normal in a recording: one snapshot among 300 of them replays
    (exit 0); the same controls with no book data are an error, as another venue's file."""
    first = lines_of(BYBIT500)[0]
    controls = [bybit_control(n) for n in range(300)]
    mostly = write(tmp_path, "mostly.jsonl", [*controls[:150], first, *controls[150:]])
    assert run("bybit", mostly, tmp_path / "out") == 0
    assert stored(tmp_path / "out", "snapshots").height == 1000
    only = write(tmp_path, "only.jsonl", controls)
    with pytest.raises(DataError, match="none of its 300 records could be read as bybit book"):
        run("bybit", only, tmp_path / "out2")
    # KuCoin: its welcome, acks and pongs around the documented payloads
    kc = [{"id": "w", "type": "welcome"}, {"id": "1", "type": "ack"}, {"id": "2", "type": "pong"}]
    kc_controls = [json.dumps({"recv_ns": 0, "kind": "ws", "channel": "c", "msg": m}) for m in kc]
    path = write(tmp_path, "kc.jsonl", [*kc_controls, *kucoin_lines(), *kc_controls])
    assert run("kucoin", path, tmp_path / "kc", multipliers=["XBTUSDT=0.001"]) == 0
    assert stored(tmp_path / "kc", "deltas").height == 5
