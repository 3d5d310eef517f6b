"""Simulator send-lag benchmark: the full seed symbol table, clients like the collector's.

Starts the simulator as a separate process exactly as `scripts/soak.py` does (`python -m
cryptoflow.sim --venues binance,bybit,okx,kucoin --symbols ... --depth 1000
--tick-interval 0.1 --<venue>-symbols ...`, every venue/symbol of `configs/symbols.yml`),
then, in this process, for `--duration` seconds (only 127.0.0.x is contacted):

- WebSocket clients (`cryptoflow.net.ws.open_ws` and the venues' stream classes, so the
  URLs and subscribe messages are the collector's): per venue one connection per shard
  of `soak.PER_SHARD` symbols, from source IPs 127.0.0.1, 127.0.0.2, ... (the soak's
  layout), Binance 100 ms diff streams, Bybit/OKX depth 200 / `books`, KuCoin level2;
  keepalives as the collector sends them;
- REST pollers: every symbol's snapshot every 10 s (jittered start) at the soak's depth
  (1000 levels; Bybit 500; OKX `books-full`), from the symbol's shard IP.

Per venue it measures the lag "exchange event time -> received here" of every diff
message (Binance `E`, Bybit `ts`, OKX `data[].ts`, KuCoin `data.timestamp`; the receive
time is taken once per socket read, before parsing), p50/p99/max after `--warmup`, and
messages/s; REST request latency; and the simulator's CPU (utime + stime from
/proc/<pid>/stat, % of one core, after the warm-up) and max RSS (VmHWM).

    /work/venv/bin/python scripts/bench_sim.py [--duration 60] [--warmup 5]
    /work/venv/bin/python scripts/bench_sim.py --tree /tmp/base     # another build's sim
    /work/venv/bin/python scripts/bench_sim.py --profile /tmp/sim.prof   # sim under cProfile

Prints one final line `msgs/s=… lag_p50_s=… lag_p99_s=… sim_cpu_pct=… sim_rss_mb=…` and
writes `bench-results/bench_sim.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import orjson
import trio

from cryptoflow.exchanges.binance.ws import BinanceStream
from cryptoflow.exchanges.bybit.ws import BybitStream
from cryptoflow.exchanges.kucoin.ws import KucoinStream
from cryptoflow.exchanges.okx.ws import OkxStream
from cryptoflow.net.ws import WsClosed, open_ws

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import soak  # noqa: E402  (the soak's symbol table, shard sizes and depths)

VENUES = soak.VENUES
MAX_DURATION = 600.0
SNAPSHOT_INTERVAL = 10.0
STARTUP_TIMEOUT = 60.0
TICK = os.sysconf("SC_CLK_TCK")


def start_sim(
    table: dict, venues: list[str], log: Path, tree: Path, profile: Path | None
) -> tuple[subprocess.Popen, dict]:
    args = soak.sim_command(table, venues, str(soak.VENV_BIN / "python"))
    if profile is not None:
        args[1:1] = ["-m", "cProfile", "-o", str(profile)]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=log.open("wb"), cwd=tree, text=True
    )
    assert proc.stdout is not None
    watchdog = threading.Timer(STARTUP_TIMEOUT, proc.kill)  # bounded: no line, no wait
    watchdog.start()
    try:
        line = proc.stdout.readline()
    finally:
        watchdog.cancel()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"simulator did not start (see {log})")
    return proc, json.loads(line)


def proc_cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def proc_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# --- event time of one diff message (ms), None for anything else ------------------------


def event_ms_binance(obj: dict) -> int | None:
    data = obj.get("data", obj)
    return data.get("E") if isinstance(data, dict) and data.get("e") == "depthUpdate" else None


def event_ms_bybit(obj: dict) -> int | None:
    return obj.get("ts") if obj.get("type") == "delta" else None


def event_ms_okx(obj: dict) -> int | None:
    if obj.get("action") != "update":
        return None
    return int(obj["data"][0]["ts"])


def event_ms_kucoin(obj: dict) -> int | None:
    if obj.get("type") != "message":
        return None
    return obj["data"].get("timestamp")


EVENT_MS = {
    "binance": event_ms_binance,
    "bybit": event_ms_bybit,
    "okx": event_ms_okx,
    "kucoin": event_ms_kucoin,
}


class VenueResult:
    def __init__(self) -> None:
        self.lags: list[float] = []  # s, after the warm-up
        self.messages = 0  # diff messages after the warm-up
        self.other = 0  # snapshots, acks, pongs, heartbeats...
        self.rest_s: list[float] = []
        self.rest_errors = 0
        self.ws_errors: list[str] = []


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


async def ws_client(
    venue: str,
    stream,
    url: str,
    group: list[str],
    ip: str,
    res: VenueResult,
    measure_from: float,
) -> None:
    event_ms = EVENT_MS[venue]
    try:
        async with open_ws(url, source_ip=ip) as ws:
            await stream.on_open(ws, group)
            async with trio.open_nursery() as nursery:
                if stream.keepalive_interval:

                    async def keepalive() -> None:
                        while True:
                            await trio.sleep(stream.keepalive_interval)
                            await stream.keepalive(ws)

                    nursery.start_soon(keepalive)
                while True:
                    burst = await ws.receive_burst()
                    now = time.time()
                    measuring = now >= measure_from
                    for raw in burst:
                        if raw == "pong" or not measuring:
                            continue
                        obj = orjson.loads(raw)
                        e = event_ms(obj) if isinstance(obj, dict) else None
                        if e is None:
                            res.other += 1
                            continue
                        res.messages += 1
                        res.lags.append(now - e / 1000)
    except WsClosed as exc:
        res.ws_errors.append(f"{ip} {exc.code} {exc}")


def rest_request(venue: str, sym: str) -> tuple[str, str, dict]:
    depth = soak.DEPTH[venue]
    if venue == "binance":
        return "GET", "/fapi/v1/depth", {"symbol": sym, "limit": depth}
    if venue == "bybit":
        return "GET", "/v5/market/orderbook", {"category": "linear", "symbol": sym, "limit": depth}
    if venue == "okx":
        path = "/api/v5/market/books-full" if depth > 400 else "/api/v5/market/books"
        return "GET", path, {"instId": sym, "sz": depth}
    return "GET", "/api/v1/level2/snapshot", {"symbol": sym}


async def rest_poller(
    client: httpx.AsyncClient,
    venue: str,
    sym: str,
    res: VenueResult,
    first_delay: float,
    measure_from: float,
) -> None:
    method, path, params = rest_request(venue, sym)
    next_t = trio.current_time() + first_delay
    while True:
        await trio.sleep_until(next_t)
        next_t += SNAPSHOT_INTERVAL
        t0 = time.perf_counter()
        try:
            r = await client.request(method, path, params=params)
            ok = r.status_code == 200
        except httpx.HTTPError:
            ok = False
        if time.time() >= measure_from:
            if ok:
                res.rest_s.append(time.perf_counter() - t0)
            else:
                res.rest_errors += 1


async def kucoin_url(rest_url: str, ip: str) -> str:
    transport = httpx.AsyncHTTPTransport(local_address=ip)
    async with httpx.AsyncClient(base_url=rest_url, transport=transport, timeout=10) as c:
        data = (await c.post("/api/v1/bullet-public")).json()["data"]
    endpoint = data["instanceServers"][0]["endpoint"]
    return f"{endpoint}?token={data['token']}&connectId={uuid.uuid4().hex}"


async def run_clients(
    sim: dict, table: dict, venues: list[str], duration: float, warmup: float
) -> dict[str, VenueResult]:
    results = {v: VenueResult() for v in venues}
    measure_from = time.time() + warmup
    rng = random.Random(1)
    clients: list[httpx.AsyncClient] = []
    with trio.move_on_after(duration):
        async with trio.open_nursery() as nursery:
            for v in venues:
                names = sorted(n for n, row in table.items() if v in row)
                size = soak.PER_SHARD[v]
                for i in range(0, len(names), size):
                    ip = f"127.0.0.{i // size + 1}"
                    group = [table[n][v] for n in names[i : i + size]]
                    symbols = {table[n][v]: n for n in names[i : i + size]}
                    if v == "binance":
                        stream = BinanceStream(sim["ws_url"], "100ms", symbols)
                        url = await stream.url(group)
                    elif v == "bybit":
                        stream = BybitStream(sim["ws_url"], 200, symbols)
                        url = await stream.url(group)
                    elif v == "okx":
                        stream = OkxStream(sim["ws_url"], symbols)
                        url = await stream.url(group)
                    else:
                        stream = KucoinStream(None, symbols)  # type: ignore[arg-type]
                        url = await kucoin_url(sim["rest_url"], ip)
                    nursery.start_soon(
                        ws_client, v, stream, url, group, ip, results[v], measure_from
                    )
                    client = httpx.AsyncClient(
                        base_url=sim["rest_url"],
                        transport=httpx.AsyncHTTPTransport(local_address=ip),
                        timeout=30,
                    )
                    clients.append(client)
                    for sym in group:
                        nursery.start_soon(
                            rest_poller,
                            client,
                            v,
                            sym,
                            results[v],
                            rng.uniform(0, SNAPSHOT_INTERVAL),
                            measure_from,
                        )
    for c in clients:
        with trio.move_on_after(2) as cs:
            cs.shield = True
            await c.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds (max 600)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds not measured")
    ap.add_argument("--venues", default=",".join(VENUES))
    ap.add_argument("--tree", type=Path, default=ROOT, help="source tree whose simulator runs")
    ap.add_argument("--profile", type=Path, default=None, help="run the sim under cProfile")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results/bench_sim.json")
    args = ap.parse_args(argv)
    duration = max(1.0, min(args.duration, MAX_DURATION))
    warmup = min(args.warmup, duration / 2)
    venues = [v for v in args.venues.split(",") if v]
    table = soak.symbol_table()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_sim_{os.getpid()}.log"
    proc, sim = start_sim(table, venues, log, args.tree, args.profile)
    samples: list[tuple[float, float]] = []
    stop = False

    def sampler() -> None:
        while not stop:
            c = proc_cpu_s(proc.pid)
            if c is not None:
                samples.append((time.monotonic(), c))
            time.sleep(0.5)

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.monotonic()
    try:
        results = trio.run(run_clients, sim, table, venues, duration, warmup)
    finally:
        stop = True
        th.join(2)
        rss = proc_hwm_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    steady = [s for s in samples if s[0] - t0 >= warmup] or samples
    cpu_pct = (
        100 * (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
        if len(steady) >= 2 and steady[-1][0] > steady[0][0]
        else None
    )
    measured = duration - warmup
    out: dict = {
        "benchmark": "bench_sim",
        "duration_s": duration,
        "warmup_s": warmup,
        "tree": str(args.tree),
        "profile": str(args.profile) if args.profile else None,
        "symbols": {v: sum(1 for r in table.values() if v in r) for v in venues},
        "venues": {},
        "sim_cpu_pct": cpu_pct,
        "sim_rss_mb": rss,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
    }
    all_lags: list[float] = []
    total = 0
    for v, r in results.items():
        all_lags += r.lags
        total += r.messages
        out["venues"][v] = {
            "msgs_per_s": r.messages / measured,
            "messages": r.messages,
            "other_messages": r.other,
            "lag_p50_s": pct(r.lags, 0.5),
            "lag_p99_s": pct(r.lags, 0.99),
            "lag_max_s": pct(r.lags, 1.0),
            "rest_requests": len(r.rest_s),
            "rest_errors": r.rest_errors,
            "rest_p50_s": pct(r.rest_s, 0.5),
            "rest_p99_s": pct(r.rest_s, 0.99),
            "ws_errors": r.ws_errors,
        }
    out.update(
        msgs_per_s=total / measured,
        lag_p50_s=pct(all_lags, 0.5),
        lag_p99_s=pct(all_lags, 0.99),
        lag_max_s=pct(all_lags, 1.0),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for v, d in out["venues"].items():
        print(
            f"{v:8s} msgs/s={d['msgs_per_s']:.0f} lag p50={d['lag_p50_s'] or 0:.3f} "
            f"p99={d['lag_p99_s'] or 0:.3f} max={d['lag_max_s'] or 0:.3f} s; "
            f"rest n={d['rest_requests']} err={d['rest_errors']} "
            f"p50={d['rest_p50_s'] or 0:.3f} p99={d['rest_p99_s'] or 0:.3f} s"
            + (f"; ws errors {d['ws_errors']}" if d["ws_errors"] else "")
        )
    print(
        f"msgs/s={out['msgs_per_s']:.0f} lag_p50_s={out['lag_p50_s'] or 0:.3f} "
        f"lag_p99_s={out['lag_p99_s'] or 0:.3f} sim_cpu_pct={cpu_pct or 0:.1f} "
        f"sim_rss_mb={rss or 0:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
