"""Snapshot lane benchmark: REST depth bodies -> rows -> zstd Parquet, batched as the writer.

The writer flushes a symbol's snapshots every `snapshot_flush_interval` (60 s): with a
1000-level snapshot every 10 s that is 6 snapshots x 2000 rows per flush. This script
replays the recorded Binance REST bodies (BTCUSDT: 2 x 1000 levels) as `--flushes`
such flushes, each flush encoded as the writer does (`storage.layout.files_for_frame`).
Variants, interleaved per repetition:

- `naive`: stdlib `json.loads`, one dict per row, `pl.DataFrame(rows)` per flush, price /
  quantity cast to Float64, zstd Parquet;
- `simple`: each body parsed as it arrives (`binance.parse.parse_rest_snapshot`, orjson)
  + `Normalizer.feed_many` -> column lists, `frame_from_columns` per flush, writer encode
  (the collector's path before poll bodies were deferred; still the path of a body the
  book needs, and of venues without a batch reader);
- `fast`: the collector's path for Binance polls: the bodies kept unparsed and read at
  the flush, all of a flush in one polars call (`pipeline/bodies.frame_from_bodies`,
  as the writer's flush thread runs it), writer encode.

    /work/venv/bin/python scripts/bench_normalize.py [--runs 5] [--flushes 50] [--gc MODE]

`--gc` sets the garbage collector for all variants alike: `default` (CPython's
thresholds), `freeze` (`gc.freeze()` after setup) or `collector` (`runtime._tune_gc`,
what `cryptoflow collect` runs with: freeze after imports, gen-0 threshold 50,000). The
mode is printed on the last line and stored in the JSON.

Prints `rows/s=… ratio_vs_naive=… cpu_pct=… rss_mb=… path=fast gc=…` (the collector's
path for this lane) and writes `bench-results/bench_normalize.json`.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import orjson
import polars as pl

from cryptoflow.exchanges import registry
from cryptoflow.exchanges.binance import parse as binance_parse
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import Dataset, SnapshotBody, SnapshotSource
from cryptoflow.pipeline.bodies import frame_from_bodies
from cryptoflow.pipeline.normalize import Normalizer, frame_from_columns
from cryptoflow.storage import layout
from cryptoflow.tools.recording import iter_records

RECORDING = (
    Path(__file__).resolve().parents[2]
    / "shared/data/recorded/binance/futures_depth_BTCUSDT_2024-08-08.jsonl.gz"
)
EXCHANGE, MARKET, SYMBOL = "binance", "futures", "BTCUSDT"


def load(path: Path) -> tuple[bytes, int]:
    for r in iter_records(path):
        if r.kind == "rest_snapshot":
            return orjson.dumps(r.msg), r.recv_ns
    raise SystemExit(f"no rest_snapshot record in {path}")


def encode(frame: pl.DataFrame) -> int:
    return sum(
        len(d)
        for _, _, d in layout.files_for_frame(Dataset.SNAPSHOTS, EXCHANGE, MARKET, SYMBOL, frame)
    )


def run_naive(bodies: list[tuple[bytes, int]], per_flush: int) -> tuple[int, int]:
    total = size = 0
    for start in range(0, len(bodies), per_flush):
        rows: list[dict] = []
        for body, recv_ns in bodies[start : start + per_flush]:
            obj = json.loads(body)
            for side, key in (("bid", "bids"), ("ask", "asks")):
                for level, (price, qty) in enumerate(obj[key]):
                    rows.append(
                        {
                            "symbol": SYMBOL,
                            "timestamp": obj["E"],
                            "transaction_time": obj["T"],
                            "receive_time": recv_ns,
                            "last_update_id": obj["lastUpdateId"],
                            "side": side,
                            "level": level,
                            "price": price,
                            "quantity": qty,
                        }
                    )
        df = pl.DataFrame(rows).with_columns(
            pl.col("price").cast(pl.Float64), pl.col("quantity").cast(pl.Float64)
        )
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd")
        total += len(rows)
        size += len(buf.getvalue())
    return total, size


def run_simple(bodies: list[tuple[bytes, int]], per_flush: int) -> tuple[int, int]:
    norm = Normalizer({EXCHANGE: RULES})
    total = size = 0
    for start in range(0, len(bodies), per_flush):
        cols: dict[str, list] = {}
        for body, recv_ns in bodies[start : start + per_flush]:
            snap = binance_parse.parse_rest_snapshot(body, SYMBOL, recv_ns, SnapshotSource.POLL)
            for b in norm.feed_many([snap]).batches:
                for name, values in b.columns.items():
                    cols.setdefault(name, []).extend(values)
        frame = frame_from_columns(Dataset.SNAPSHOTS, EXCHANGE, MARKET, SYMBOL, cols)
        total += frame.height
        size += encode(frame)
    return total, size


def run_fast(bodies: list[tuple[bytes, int]], per_flush: int) -> tuple[int, int]:
    codec = registry.get_venue(EXCHANGE).snapshot_codec
    assert codec is not None
    total = size = 0
    for start in range(0, len(bodies), per_flush):
        items = [
            SnapshotBody(EXCHANGE, MARKET, SYMBOL, body, recv_ns)
            for body, recv_ns in bodies[start : start + per_flush]
        ]
        frame, rejected = frame_from_bodies(EXCHANGE, MARKET, SYMBOL, "1", codec, items)
        if frame is None or rejected:
            raise SystemExit(f"the batch read refused the recorded snapshot: {rejected}")
        total += frame.height
        size += encode(frame)
    return total, size


def timed(fn, messages: int) -> dict:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    rows, size = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "rows": rows,
        "messages": messages,
        "parquet_bytes": size,
        "wall_s": wall,
        "cpu_s": cpu,
        "rows_per_s": rows / wall,
        "rows_per_cpu_s": rows / cpu if cpu else None,
        "messages_per_s": messages / wall,
        "cpu_pct": 100 * cpu / wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--input", type=Path, default=RECORDING)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--flushes", type=int, default=50)
    ap.add_argument("--per-flush", type=int, default=6, help="snapshots per writer flush")
    ap.add_argument("--gc", choices=("default", "freeze", "collector"), default="default")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_normalize.json"))
    args = ap.parse_args(argv)

    body, recv_ns = load(args.input)
    n = args.flushes * args.per_flush
    # distinct receive times (10 s apart), same body: as a poller sees an idle book
    bodies = [(body, recv_ns + i * 10_000_000_000) for i in range(n)]
    if args.gc == "freeze":
        gc.freeze()
    elif args.gc == "collector":
        # imported here: its imports (trio, ...) would add to what `default` collects
        from cryptoflow.runtime import _tune_gc

        _tune_gc()
    variants = {
        "naive": lambda: run_naive(bodies, args.per_flush),
        "simple": lambda: run_simple(bodies, args.per_flush),
        "fast": lambda: run_fast(bodies, args.per_flush),
    }
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    variants["fast"]()  # warm-up
    for i in range(args.runs):
        for v, fn in variants.items():
            runs[v].append(timed(fn, n))
        print(
            f"run {i + 1}/{args.runs}: "
            + " ".join(f"{v}={runs[v][-1]['rows_per_s'] / 1e6:.2f}M rows/s" for v in variants),
            file=sys.stderr,
        )
    keys = ("wall_s", "cpu_s", "rows_per_s", "rows_per_cpu_s", "messages_per_s", "cpu_pct")
    summary = {}
    for v, rs in runs.items():
        summary[v] = {k: statistics.median(r[k] for r in rs) for k in keys}
        summary[v].update(rows=rs[0]["rows"], parquet_bytes=rs[0]["parquet_bytes"])
        summary[v]["ratio_vs_naive"] = statistics.median(
            nv["wall_s"] / r["wall_s"] for nv, r in zip(runs["naive"], rs, strict=True)
        )
        summary[v]["cpu_ratio_vs_naive"] = statistics.median(
            nv["cpu_s"] / r["cpu_s"] for nv, r in zip(runs["naive"], rs, strict=True)
        )
    result = {
        "benchmark": "snapshots",
        "input": str(args.input),
        "runs": args.runs,
        "flushes": args.flushes,
        "snapshots_per_flush": args.per_flush,
        "levels_per_snapshot": summary["fast"]["rows"] // n,
        "gc": args.gc,
        "polars_threads": pl.thread_pool_size(),
        "python": platform.python_version(),
        "polars": pl.__version__,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "variants": summary,
        "raw": runs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for v, s in summary.items():
        print(
            f"{v:>7}: {s['rows_per_s'] / 1e6:6.2f} M rows/s wall, "
            f"{(s['rows_per_cpu_s'] or 0) / 1e6:6.2f} M rows/CPU-s, "
            f"{s['messages_per_s']:8.0f} snapshots/s, cpu {s['cpu_s']:.3f} s, "
            f"x{s['ratio_vs_naive']:.2f} naive (wall), x{s['cpu_ratio_vs_naive']:.2f} (cpu)"
        )
    # the lane as the collector runs it for Binance polls: bodies read at the flush
    f = summary["fast"]
    print(
        f"rows/s={f['rows_per_s']:.0f} ratio_vs_naive={f['ratio_vs_naive']:.2f} "
        f"cpu_pct={f['cpu_pct']:.0f} rss_mb={result['peak_rss_mb']:.0f} path=fast gc={args.gc}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
