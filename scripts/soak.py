"""Soak: the full seed symbol table against the simulator, collector cost sampled from /proc.

Starts, as separate processes (only 127.0.0.x is ever contacted):
1. the simulator, `python -m cryptoflow.sim --venues <all it supports> ...`, serving every
   venue/symbol of `configs/symbols.yml` that it can (Binance today; venues it does not
   know yet are skipped and listed in the result);
2. the collector, `cryptoflow collect --duration D`, with a generated config pointing at
   the simulator: 1000-level REST snapshots every 10 s (Bybit: its maximum, 500) and
   100 ms diff streams, shards on source IPs 127.0.0.1, 127.0.0.2, ... so every shard
   stays inside the venue's per-IP request budget (checked with `cryptoflow shards list`).

Every second it samples both processes' CPU time (utime + stime, all threads) and RSS
from /proc/<pid>/stat and /proc/<pid>/status, and at the end reports for each: average
CPU % of one core, max RSS, and the RSS trend (least-squares slope after a warm-up, MB
per minute). Latency "exchange event time -> on disk" is the collector's own per-row
histogram of delta rows (event time -> fsynced in the spool; `cryptoflow_spool_delay_
seconds`), read from its final log line: bucket upper bounds, so p99 <= the figure.
The collector runs the shipped upload batching (60 s), so an object's mtime says nothing
about when its rows were made durable.

    /work/venv/bin/python scripts/soak.py --duration 600      # the issue's 10-minute run
    /work/venv/bin/python scripts/soak.py --duration 3600     # optional 1-hour soak

Also per delta row, from the stored rows: event -> receive ("before_collector": the
simulator and socket buffers, a part of the latency the collector does not control).

Machine calibration (`--calibrate`, the default): the issue's reference figures were taken
on a faster machine, where the naive delta-lane pipeline of `scripts/bench_deltas.py`
(`run_naive`: stdlib json, one dict per row, DataFrame, zstd Parquet) ran the recorded
Binance BTCUSDT stream at about 1.0 M rows/s. So, in this process, before the simulator
starts and again after the collector has stopped (load drift shows as a difference),
that same function runs on the same recording for a few seconds (repeated passes until
>= 3 s of CPU, at most ~8 s a phase), measuring rows per CPU-second (time.process_time,
all threads) and wall rows/s -> `calibration` in the JSON. `naive_rows_s` is the median
of the before/after rows per CPU-second (the naive pipeline runs at ~100 % of one core,
so it is also its wall rate on an idle core). `cpu_pct_at_reference` =
cpu_pct x naive_rows_s / 1.0e6 is an ESTIMATE: the measured collector CPU scaled by this
machine's naive-pipeline speed relative to the issue's 1.0 M rows/s reference, i.e. what
the same soak would be expected to use there if the collector's work sped up in the same
proportion as the naive pipeline. It is there for comparing with the issue's figures; the
measured `cpu_pct` stays the figure of record. No recording (or an import failure): the
calibration is skipped with a one-line note and both fields print `nan`.

Prints one final line `rows/s=… cpu_pct=… rss_mb=… rss_slope_mb_per_min=… sim_cpu_pct=…
delta_latency_p50_s=… delta_latency_p99_s=… in_collector_p99_s=… cpu_s_per_1k_rows=…
naive_rows_s=… cpu_pct_at_reference=… loop_cpu_pct=…` (in_collector: receive -> spooled,
the collector's share; loop_cpu_pct: the collector's main thread alone, i.e. the event
loop, after the warm-up) and writes `bench-results/soak.json`.
`--tree DIR` runs the collector of another source tree (before/after comparisons); the
calibration always runs this tree's `scripts/bench_deltas.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
VENUES = ("binance", "bybit", "okx", "kucoin")
#: symbols per shard (source IP) so 1000-level snapshots every 10 s fit the per-IP budget:
#: Binance 20 weight x 6/min = 120 weight/min/symbol, 2400/min x 0.8 safety -> 16; use 11
PER_SHARD = {"binance": 11, "bybit": 40, "okx": 9, "kucoin": 40}  # OKX: 10 req / 2 s per IP
DEPTH = {"binance": 1000, "bybit": 500, "okx": 1000, "kucoin": 1000}
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
#: issue 9's reference machine: the naive delta-lane pipeline at about 1.0 M rows/s
REFERENCE_NAIVE_ROWS_PER_S = 1.0e6
#: a calibration phase repeats naive passes until this much CPU ... or this much wall time
CALIBRATE_CPU_S = 3.0
CALIBRATE_MAX_WALL_S = 8.0


#: the collector with a gc callback timing every collection (time.perf_counter, main or
#: writer thread alike), written as JSON at exit
GC_STATS_CODE = """
import atexit, gc, json, time
stats = {{g: {{"collections": 0, "seconds": 0.0, "max_ms": 0.0}} for g in (0, 1, 2)}}
started = {{}}
t0 = time.time()
def cb(phase, info):
    if phase == "start":
        if info["generation"] == 2 and "census" not in stats and time.time() - t0 > 30:
            # once: what the full collections walk (tracked objects by type)
            counts = {{}}
            for o in gc.get_objects():
                counts[type(o).__name__] = counts.get(type(o).__name__, 0) + 1
            top = sorted(counts.items(), key=lambda kv: -kv[1])[:12]
            stats["census"] = {{"tracked": sum(counts.values()), "top": top}}
            lens = {{}}
            for o in gc.get_objects():
                if type(o) is list:
                    lens[len(o)] = lens.get(len(o), 0) + 1
            stats["census"]["list_lens"] = sorted(lens.items(), key=lambda kv: -kv[1])[:6]
        started["t"] = time.perf_counter()
    elif "t" in started:
        dt = time.perf_counter() - started.pop("t")
        s = stats[info["generation"]]
        s["collections"] += 1
        s["seconds"] += dt
        s["max_ms"] = max(s["max_ms"], dt * 1000)
gc.callbacks.append(cb)
atexit.register(lambda: open({out!r}, "w").write(json.dumps(stats)))
import cryptoflow.runtime, cryptoflow.cli, polars, httpx, trio_websocket
{freeze}
cryptoflow.cli.main()
"""


def proc_sample(pid: int) -> tuple[float, float] | None:
    """(CPU seconds so far, RSS MB) of a process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        statm = Path(f"/proc/{pid}/statm").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / TICK, int(statm[1]) * PAGE / 2**20


def thread_cpu(pid: int, tid: int) -> float | None:
    """CPU seconds so far of one thread (the collector's main thread runs the event loop:
    stream parsing, normalizing, the writer's intake), or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y), per minute."""
    if len(points) < 3:
        return 0.0
    ts, ys = [p[0] for p in points], [p[1] for p in points]
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / var if var else 0.0


def summarize(samples: list[tuple[float, float, float]], warmup: float) -> dict:
    """samples: (t, cpu seconds, rss MB) -> average CPU %, max RSS, RSS slope."""
    if len(samples) < 2:
        return {}
    (t0, c0, _), (t1, c1, _) = samples[0], samples[-1]
    steady = [(t, r) for t, _, r in samples if t - t0 >= warmup] or [(t, r) for t, _, r in samples]
    return {
        "cpu_pct_avg": 100 * (c1 - c0) / (t1 - t0),
        "cpu_s": c1 - c0,
        "rss_mb_max": max(r for _, _, r in samples),
        "rss_mb_last": samples[-1][2],
        "rss_mb_after_warmup_first": steady[0][1],
        "rss_slope_mb_per_min": slope(steady),
        "samples": len(samples),
    }


def symbol_table() -> dict[str, dict[str, str]]:
    """normalized -> {venue: venue symbol} for enabled rows of configs/symbols.yml."""
    table = YAML(typ="safe").load((ROOT / "configs/symbols.yml").read_text())["symbols"]
    return {
        name: {v: row[v] for v in VENUES if row.get(v)}
        for name, row in table.items()
        if row.get("enabled", True)
    }


def sim_command(table: dict, venues: list[str], python: str) -> list[str]:
    """The simulator's command line: every venue/symbol of the table (also bench_sim)."""
    args = [
        python,
        "-m",
        "cryptoflow.sim",
        "--host",
        "127.0.0.1",
        "--venues",
        ",".join(venues),
        "--symbols",
        ",".join(sorted({row["binance"] for row in table.values() if "binance" in row})),
        "--depth",
        "1000",
        "--tick-interval",
        "0.1",
    ]
    for v in venues:
        if v != "binance":
            args += [f"--{v}-symbols", ",".join(sorted(r[v] for r in table.values() if v in r))]
    return args


def start_sim(table: dict, venues: list[str], log: Path) -> tuple[subprocess.Popen, dict]:
    args = sim_command(table, venues, str(VENV_BIN / "python"))
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=log.open("wb"), cwd=ROOT, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise RuntimeError(f"simulator did not start (see {log})")
    return proc, json.loads(line)


def write_config(
    workdir: Path,
    sim: dict,
    table: dict,
    venues: list[str],
    tree: Path = ROOT,
    ws_reconnect_after: float | None = None,
) -> Path:
    """The collector's config from `tree`'s shipped one (its schema: a --tree build may
    not know newer keys)."""
    yaml = YAML()
    cfg = yaml.load((tree / "configs/config.yml").read_text())
    cfg["cryptoflow"]["exchanges"] = venues
    cfg["reader"]["snapshot_interval"] = 10.0
    if ws_reconnect_after is not None:
        cfg["reader"]["ws_reconnect_after"] = ws_reconnect_after
    for v in VENUES:
        src = cfg["source"][v]
        src.update(
            snapshot_interval=None,
            depth_limit=DEPTH[v],
            stream_speed="100ms",
            rest_url=sim["rest_url"],
            ws_url=sim["ws_url"],
        )
    cfg["storage"]["local_path"] = str(workdir / "data")
    cfg["storage"]["spool"]["path"] = str(workdir / "spool")
    cfg["storage"]["s3"]["enabled"] = False
    cfg["logging"]["output"] = str(workdir / "collector.log")
    if "metrics" in cfg:
        cfg["metrics"]["enabled"] = False
    with (workdir / "config.yml").open("w") as f:
        yaml.dump(cfg, f)
    shards: list[dict] = []
    for v in venues:
        names = sorted(n for n, row in table.items() if v in row)
        chunks = [names[i : i + PER_SHARD[v]] for i in range(0, len(names), PER_SHARD[v])]
        for i, chunk in enumerate(chunks):
            while len(shards) <= i:
                shards.append(
                    {
                        "name": f"ip{len(shards) + 1}",
                        "source_ip": f"127.0.0.{len(shards) + 1}",
                        "symbols": {},
                    }
                )
            shards[i]["symbols"][v] = chunk
    with (workdir / "ip_shards.yml").open("w") as f:
        yaml.dump({"shards": shards}, f)
    (workdir / "symbols.yml").write_text((ROOT / "configs/symbols.yml").read_text())
    return workdir / "config.yml"


def before_collector_latencies(data: Path) -> list[float]:
    """Per stored delta row: receive time - event time, s (simulator + socket buffers)."""
    import polars as pl

    files = list((data / "deltas").rglob("*.parquet"))
    if not files:
        return []
    d = pl.scan_parquet(files).select("timestamp", "receive_time").collect()
    ev = d["timestamp"].dt.epoch("ms") / 1e3
    rc = d["receive_time"].dt.epoch("us") / 1e6
    return (rc - ev).to_list()


SPOOL_DELAY_RE = re.compile(
    r"delta rows event -> spooled: p50 <= ([0-9.inf]+)s, p99 <= ([0-9.inf]+)s \((\d+) rows\); "
    r"receive -> spooled: p50 <= ([0-9.inf]+)s, p99 <= ([0-9.inf]+)s"
)


def spool_delay(log_path: Path) -> dict:
    """The collector's event -> spooled histogram summary (its final writer log line)."""
    if not log_path.exists():  # e.g. a --tree build that logs elsewhere
        return {}
    for line in reversed(log_path.read_text().splitlines()):
        m = SPOOL_DELAY_RE.search(line)
        if m:
            return {
                "p50_le": float(m[1]),
                "p99_le": float(m[2]),
                "rows": int(m[3]),
                "from_receive_p50_le": float(m[4]),
                "from_receive_p99_le": float(m[5]),
            }
    return {}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def load_calibration() -> tuple[object, list] | str:
    """(bench_deltas module, recorded BTCUSDT stream) or why the calibration is skipped."""
    scripts = str(Path(__file__).resolve().parent)
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    try:
        import bench_deltas  # the naive pipeline, reused as is (imports cryptoflow, polars)
    except Exception as exc:
        return f"bench_deltas import failed: {type(exc).__name__}: {exc}"
    if not bench_deltas.RECORDING.exists():
        return f"recording absent: {bench_deltas.RECORDING}"
    try:
        return bench_deltas, bench_deltas.load(bench_deltas.RECORDING)
    except Exception as exc:
        return f"recording unreadable: {type(exc).__name__}: {exc}"


def calibrate(bench_deltas, records: list) -> dict:
    """`bench_deltas.run_naive` over the recording, repeated until CALIBRATE_CPU_S of CPU
    (or CALIBRATE_MAX_WALL_S): median per-pass rows per CPU-second and wall rows/s."""
    passes: list[dict] = []
    t0, c0 = time.perf_counter(), time.process_time()
    while not passes or (
        time.process_time() - c0 < CALIBRATE_CPU_S
        and time.perf_counter() - t0 < CALIBRATE_MAX_WALL_S
    ):
        passes.append(bench_deltas.timed(bench_deltas.run_naive, records))
    return {
        "rows_per_cpu_s": statistics.median(p["rows_per_cpu_s"] or 0.0 for p in passes),
        "rows_per_s": statistics.median(p["rows_per_s"] for p in passes),
        "passes": len(passes),
        "rows_per_pass": passes[0]["rows"],
        "cpu_s": time.process_time() - c0,
        "wall_s": time.perf_counter() - t0,
        "loadavg": os.getloadavg(),
        "per_pass": [
            {k: round(p[k], 3) for k in ("wall_s", "cpu_s", "rows_per_s", "rows_per_cpu_s")}
            for p in passes
        ],
    }


def calibration_phase(loaded: tuple[object, list] | str | None, when: str) -> dict | None:
    """One calibration phase, with its one-line note on stderr; None when skipped."""
    if loaded is None or isinstance(loaded, str):
        return None
    try:
        cal = calibrate(*loaded)
    except Exception as exc:  # reporting only: never fail the soak for it
        print(f"calibration {when}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    print(
        f"calibration {when}: naive {cal['rows_per_cpu_s'] / 1e6:.3f} M rows/CPU-s, "
        f"{cal['rows_per_s'] / 1e6:.3f} M rows/s wall ({cal['passes']} passes, "
        f"{cal['cpu_s']:.1f} s CPU, {cal['wall_s']:.1f} s)",
        file=sys.stderr,
    )
    return cal


def calibration_result(
    loaded: tuple[object, list] | str | None,
    before: dict | None,
    after: dict | None,
    cpu_pct: float | None,
) -> dict:
    """The JSON `calibration` block (see the module docstring)."""
    if loaded is None:
        return {"skipped": "--no-calibrate"}
    if isinstance(loaded, str):
        return {"skipped": loaded}
    measured = [p["rows_per_cpu_s"] for p in (before, after) if p and p["rows_per_cpu_s"]]
    naive = statistics.median(measured) if measured else None
    out: dict = {
        "recording": str(loaded[0].RECORDING),
        "reference_naive_rows_per_s": REFERENCE_NAIVE_ROWS_PER_S,
        "naive_rows_per_cpu_s_before": before["rows_per_cpu_s"] if before else None,
        "naive_rows_per_cpu_s_after": after["rows_per_cpu_s"] if after else None,
        "naive_rows_per_s_before": before["rows_per_s"] if before else None,
        "naive_rows_per_s_after": after["rows_per_s"] if after else None,
        "naive_rows_per_cpu_s": naive,
        # < 1: this machine is slower than the reference for identical work
        "speed_vs_reference": naive / REFERENCE_NAIVE_ROWS_PER_S if naive else None,
        # an estimate (measured cpu_pct x speed_vs_reference); cpu_pct is the figure of record
        "cpu_pct_at_reference": cpu_pct * naive / REFERENCE_NAIVE_ROWS_PER_S
        if naive and cpu_pct is not None
        else None,
        "before": before,
        "after": after,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=600.0, help="collector run, seconds")
    ap.add_argument("--warmup", type=float, default=30.0, help="excluded from the RSS trend")
    ap.add_argument("--venues", default=",".join(VENUES), help="venues to try on the simulator")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    ap.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    ap.add_argument(
        "--gc",
        choices=("default", "stats", "freeze", "tuned"),
        default="default",
        help="freeze: the collector calls gc.freeze() after its imports; tuned: that and "
        "gc.set_threshold(50_000, 20, 20) (experiments). "
        "Both count the collector's garbage collections and their time per generation "
        "(-> <workdir>/gc.json); default: no callback (the plain collector)",
    )
    ap.add_argument(
        "--tree",
        type=Path,
        default=ROOT,
        help="source tree whose collector runs (default: this one); for before/after runs "
        "against e.g. `git archive HEAD | tar -x -C /tmp/base`",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run the collector under cProfile (main thread; slower) -> <workdir>/collector.prof",
    )
    ap.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run bench_deltas' naive pipeline on the recorded BTCUSDT stream before the "
        "simulator starts and after the collector stops (a few s each) -> `calibration` in "
        "the JSON, `naive_rows_s` and `cpu_pct_at_reference` (an estimate: cpu_pct scaled "
        "to the issue's 1.0 M rows/s reference machine) on the final line",
    )
    ap.add_argument(
        "--ws-reconnect-after",
        type=float,
        default=None,
        help="replace every WebSocket connection after this many seconds (the collector's "
        "`reader.ws_reconnect_after`, 23 h by default): planned reconnects under load, "
        "their gaps counted in the `gaps` rows",
    )
    args = ap.parse_args(argv)

    loaded: tuple[object, list] | str | None = None
    if args.calibrate:
        loaded = load_calibration()
        if isinstance(loaded, str):
            print(f"calibration skipped: {loaded}", file=sys.stderr)
    cal_before = calibration_phase(loaded, "before")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cryptoflow-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    table = symbol_table()
    wanted = [v for v in args.venues.split(",") if v]
    sim_proc, sim = None, {}
    for attempt in (wanted, ["binance"]):  # venues the simulator does not know yet: skip
        try:
            sim_proc, sim = start_sim(table, attempt, workdir / "sim.log")
            break
        except (RuntimeError, json.JSONDecodeError) as exc:
            print(f"simulator with {attempt}: {exc}", file=sys.stderr)
    if sim_proc is None:
        return 1
    venues = [v for v in wanted if v in sim.get("venues", {"binance": []})]
    skipped = [v for v in wanted if v not in venues]
    cfg = write_config(workdir, sim, table, venues, Path(args.tree), args.ws_reconnect_after)
    shards = subprocess.run(
        [str(VENV_BIN / "cryptoflow"), "shards", "list", "-c", str(cfg)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    print(shards.stdout + shards.stderr, file=sys.stderr)
    # `python -m cryptoflow` from the tree's root: that tree's code runs (not the editable
    # install's), so two builds can be compared under the same conditions
    entry = [str(VENV_BIN / "python"), "-m", "cryptoflow"]
    if args.gc in ("stats", "freeze", "tuned"):
        freeze = {"stats": "", "freeze": "gc.freeze()"}.get(
            args.gc, "gc.freeze(); gc.set_threshold(50_000, 20, 20)"
        )
        code = GC_STATS_CODE.format(out=str(workdir / "gc.json"), freeze=freeze)
        entry = [str(VENV_BIN / "python"), "-c", code]
    if args.profile:
        entry = [str(VENV_BIN / "python"), "-m", "cProfile", "-o", str(workdir / "collector.prof")]
        entry += ["-m", "cryptoflow"]
    collector = subprocess.Popen(
        [
            *entry,
            "collect",
            "-c",
            str(cfg),
            "--duration",
            str(args.duration),
            "--output",
            str(workdir / "data"),
        ],
        cwd=args.tree,
        stdout=(workdir / "collector.out").open("wb"),
        stderr=subprocess.STDOUT,
    )
    coll_samples: list[tuple[float, float, float]] = []
    sim_samples: list[tuple[float, float, float]] = []
    loop_samples: list[tuple[float, float]] = []
    t_start = time.monotonic()
    try:
        while collector.poll() is None:
            now = time.monotonic() - t_start
            for pid, into in ((collector.pid, coll_samples), (sim_proc.pid, sim_samples)):
                s = proc_sample(pid)
                if s is not None:
                    into.append((now, *s))
            loop_cpu = thread_cpu(collector.pid, collector.pid)
            if loop_cpu is not None:
                loop_samples.append((now, loop_cpu))
            if now > args.duration + 120:  # the collector should have stopped by now
                collector.send_signal(signal.SIGTERM)
            time.sleep(1.0)
    finally:
        if collector.poll() is None:
            collector.send_signal(signal.SIGTERM)
            collector.wait(60)
        sim_proc.send_signal(signal.SIGTERM)
        try:
            sim_proc.wait(20)
        except subprocess.TimeoutExpired:
            sim_proc.kill()
    # after both processes have stopped, as before they started: only the load differs
    cal_after = calibration_phase(loaded, "after")
    # the collector's own cost while collecting: drop start-up (imports, first snapshots)
    steady = [s for s in coll_samples if s[0] >= args.warmup] or coll_samples
    loop_steady = [s for s in loop_samples if s[0] >= args.warmup] or loop_samples
    loop_cpu_pct = (
        100 * (loop_steady[-1][1] - loop_steady[0][1]) / (loop_steady[-1][0] - loop_steady[0][0])
        if len(loop_steady) > 1
        else None
    )
    rows = {}
    try:
        import polars as pl

        for ds in ("deltas", "snapshots", "gaps"):
            files = list((workdir / "data" / ds).rglob("*.parquet"))
            rows[ds] = pl.scan_parquet(files).select(pl.len()).collect().item() if files else 0
        # `gaps` counts breaks: the `start` row each symbol gets at the start is apart
        files = list((workdir / "data" / "gaps").rglob("*.parquet"))
        if files:
            starts = pl.scan_parquet(files).filter(pl.col("kind") == "start")
            rows["starts"] = starts.select(pl.len()).collect().item()
            rows["gaps"] -= rows["starts"]
    except Exception as exc:  # reporting only
        rows["error"] = str(exc)
    elapsed = coll_samples[-1][0] - coll_samples[0][0] if coll_samples else 0.0
    try:
        before = before_collector_latencies(workdir / "data")
    except Exception as exc:  # reporting only
        print(f"delta row latencies: {exc}", file=sys.stderr)
        before = []
    result = {
        "benchmark": "soak",
        "duration_s": args.duration,
        "gc": args.gc,
        "ws_reconnect_after": args.ws_reconnect_after,
        "elapsed_s": elapsed,
        "venues": venues,
        "venues_skipped": skipped,
        "symbols": {v: sum(1 for r in table.values() if v in r) for v in venues},
        "collector_exit": collector.returncode,
        "collector": summarize(steady, args.warmup),
        "collector_with_startup": summarize(coll_samples, args.warmup),
        "simulator": summarize(sim_samples, args.warmup),
        # the main thread alone (the event loop), same window as "collector"
        "collector_loop_cpu_pct": loop_cpu_pct,
        # (s since start, MB) every second: where the peak falls (a flush, the shutdown)
        "collector_rss_series": [[round(t, 1), round(r, 1)] for t, _, r in coll_samples],
        "rows": rows,
        "rows_per_s": sum(v for v in rows.values() if isinstance(v, int)) / elapsed
        if elapsed
        else None,
        # per delta row: event -> fsynced in the spool (the collector's histogram; bucket
        # upper bounds) and event -> received (stored receive_time)
        "delta_latency_s": {
            "event_to_spooled": spool_delay(workdir / "collector.log"),
            "before_collector": {
                "p50": pct(before, 0.5),
                "p99": pct(before, 0.99),
                "max": pct(before, 1.0),
                "rows": len(before),
            },
        },
        "workdir": str(workdir),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "shards": shards.stdout,
    }
    result["calibration"] = calibration_result(
        loaded, cal_before, cal_after, result["collector"].get("cpu_pct_avg")
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    c = result["collector"]
    # the collector's own CPU over the whole run (start-up included) per 1,000 rows written
    total_rows = sum(v for v in rows.values() if isinstance(v, int))
    cpu_all = result["collector_with_startup"].get("cpu_s", 0.0)
    result["collector_cpu_s_per_1k_rows"] = 1000 * cpu_all / total_rows if total_rows else None
    result["tree"] = str(args.tree)
    args.out.write_text(json.dumps(result, indent=2))
    spooled = result["delta_latency_s"]["event_to_spooled"]
    keys = ("venues", "venues_skipped", "rows", "delta_latency_s")
    print(json.dumps({k: result[k] for k in keys}))
    print(f"simulator: {json.dumps(result['simulator'])}")
    cal = result["calibration"]
    print(f"calibration: {json.dumps(cal)}")
    naive_rows_s = cal.get("naive_rows_per_cpu_s") or float("nan")
    at_reference = cal.get("cpu_pct_at_reference")
    at_reference = float("nan") if at_reference is None else at_reference
    print(
        f"rows/s={result['rows_per_s'] or 0:.0f} cpu_pct={c.get('cpu_pct_avg', 0):.1f} "
        f"rss_mb={c.get('rss_mb_max', 0):.0f} "
        f"rss_slope_mb_per_min={c.get('rss_slope_mb_per_min', 0):.2f} "
        f"sim_cpu_pct={result['simulator'].get('cpu_pct_avg', 0):.1f} "
        f"delta_latency_p50_s={spooled.get('p50_le', float('nan')):g} "
        f"delta_latency_p99_s={spooled.get('p99_le', float('nan')):g} "
        f"in_collector_p99_s={spooled.get('from_receive_p99_le', float('nan')):g} "
        f"cpu_s_per_1k_rows={result['collector_cpu_s_per_1k_rows'] or 0:.3f} "
        f"naive_rows_s={naive_rows_s:.0f} cpu_pct_at_reference={at_reference:.1f} "
        f"loop_cpu_pct={result['collector_loop_cpu_pct'] or float('nan'):.1f}"
    )
    return 0 if collector.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
