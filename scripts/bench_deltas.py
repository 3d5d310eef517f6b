"""Delta lane benchmark: recorded Binance frames -> parse + book sync + flatten -> zstd Parquet.

Runs, in one process and interleaved (so machine load hits all alike), on the recorded
BTCUSDT stream (443,521 diff levels in 6,551 frames):

- `naive`: stdlib `json.loads` per frame, one dict per row (with the `pu` continuity
  check), `pl.DataFrame(rows)`, price/qty cast to Float64, zstd Parquet. The reference
  shape of issue 9.
- `simple`: the project's per-frame path (`binance.parse.parse_ws_message` -> orjson,
  `Normalizer.feed_many` -> column lists, `frame_from_columns`), encoded exactly as the
  writer does (`storage.layout.keys_for_frame` + `storage.parquet.encode`).
- `fast`: the batch path (`Normalizer.feed_frames`: polars `read_ndjson` on a batch of
  raw frames, header-only book sync, rows by `explode`), same encode.

Frames are the recording's payloads as bytes (compact JSON, as received); building them
is not timed. Each repetition runs every variant once; the figures are medians over the
repetitions, `ratio_vs_naive` the median of the per-repetition ratios (paired).

    /work/venv/bin/python scripts/bench_deltas.py [--runs 5] [--batch 2000] [--gc freeze]

Prints one final line `rows/s=… ratio_vs_naive=… cpu_pct=… rss_mb=…` (the fast path)
and writes `bench-results/bench_deltas.json`.
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

from cryptoflow.exchanges.binance import parse as binance_parse
from cryptoflow.exchanges.binance.rules import RULES
from cryptoflow.models import Dataset, SnapshotSource
from cryptoflow.pipeline.normalize import Normalizer, frame_from_columns, frame_from_wire
from cryptoflow.storage import layout
from cryptoflow.tools.recording import iter_records

RECORDING = (
    Path(__file__).resolve().parents[2]
    / "shared/data/recorded/binance/futures_depth_BTCUSDT_2024-08-08.jsonl.gz"
)
EXCHANGE, MARKET = "binance", "futures"


def load(path: Path) -> list[tuple[str, bytes, int, str]]:
    """(kind, payload bytes as received, recv_ns, channel) per record."""
    return [(r.kind, orjson.dumps(r.msg), r.recv_ns, r.channel) for r in iter_records(path)]


def encode_frame(symbol: str, frame: pl.DataFrame, dataset: Dataset = Dataset.DELTAS) -> int:
    """What a writer flush does with a frame (`layout.files_for_frame`: split by event
    hour, zstd Parquet encode, content-hashed key); bytes produced."""
    return sum(
        len(data) for _, _, data in layout.files_for_frame(dataset, EXCHANGE, MARKET, symbol, frame)
    )


# --- variants: each returns (delta rows, messages, parquet bytes) ----------------------


def run_naive(records: list) -> tuple[int, int, int]:
    rows: list[dict] = []
    last_u: dict[str, int] = {}
    breaks = messages = 0
    for kind, payload, recv_ns, _ in records:
        if kind != "ws":
            continue
        messages += 1
        d = json.loads(payload)["data"]
        sym = d["s"]
        if sym in last_u and d["pu"] != last_u[sym]:
            breaks += 1
        last_u[sym] = d["u"]
        for side, key in (("bid", "b"), ("ask", "a")):
            for price, qty in d[key]:
                rows.append(
                    {
                        "symbol": sym,
                        "timestamp": d["E"],
                        "transaction_time": d["T"],
                        "receive_time": recv_ns,
                        "first_update_id": d["U"],
                        "last_update_id": d["u"],
                        "prev_update_id": d["pu"],
                        "side": side,
                        "price": price,
                        "quantity": qty,
                    }
                )
    df = pl.DataFrame(rows).with_columns(
        pl.col("price").cast(pl.Float64), pl.col("quantity").cast(pl.Float64)
    )
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd")
    return len(rows), messages, len(buf.getvalue())


def _rest(payload: bytes, recv_ns: int, channel: str):
    symbol = channel.split("symbol=", 1)[1].split("&", 1)[0]
    return binance_parse.parse_rest_snapshot(payload, symbol, recv_ns, SnapshotSource.REPLAY)


def run_simple(records: list, batch: int) -> tuple[int, int, int]:
    norm = Normalizer({EXCHANGE: RULES})
    cols: dict[str, dict[str, list]] = {}
    rows = messages = 0
    items: list = []

    def process() -> None:
        nonlocal rows
        out = norm.feed_many(items)
        items.clear()
        rows += out.counters["delta_rows"]
        for b in out.batches:
            if b.dataset is Dataset.DELTAS:
                held = cols.setdefault(b.symbol, {name: [] for name in b.columns})
                for name, values in b.columns.items():
                    held[name].extend(values)

    for kind, payload, recv_ns, channel in records:
        messages += 1
        if kind == "ws":
            items.extend(binance_parse.parse_ws_message(payload, recv_ns))
        else:
            items.append(_rest(payload, recv_ns, channel))
        if len(items) >= batch:
            process()
    process()
    size = 0
    for symbol, c in cols.items():
        size += encode_frame(
            symbol, frame_from_columns(Dataset.DELTAS, EXCHANGE, MARKET, symbol, c)
        )
    return rows, messages, size


def run_fast(records: list, batch: int) -> tuple[int, int, int]:
    norm = Normalizer({EXCHANGE: RULES})
    parts: dict[str, list[pl.DataFrame]] = {}
    rows = messages = 0
    frames: list[bytes] = []
    recv: list[int] = []

    def process() -> None:
        nonlocal rows
        if not frames:
            return
        out = norm.feed_frames(EXCHANGE, MARKET, frames, recv)
        if out is None:  # the batch needs the simple path
            raise SystemExit("fast path refused a recorded batch: see tests/test_fastpath.py")
        frames.clear()
        recv.clear()
        rows += out.counters["delta_rows"]
        for fb in out.frames:
            parts.setdefault(fb.symbol, []).append(fb.frame)

    for kind, payload, recv_ns, channel in records:
        messages += 1
        if kind == "ws":
            frames.append(payload)
            recv.append(recv_ns)
            if len(frames) >= batch:
                process()
        else:  # keep arrival order: frames before the snapshot go first
            process()
            norm.feed_many([_rest(payload, recv_ns, channel)])
    process()
    size = 0
    for symbol, frs in parts.items():
        wire = pl.concat(frs, rechunk=False)
        size += encode_frame(
            symbol, frame_from_wire(Dataset.DELTAS, EXCHANGE, MARKET, symbol, wire)
        )
    return rows, messages, size


def timed(fn, *args) -> dict:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    rows, messages, size = fn(*args)
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


def summarize(runs: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "rows_per_s", "rows_per_cpu_s", "messages_per_s", "cpu_pct")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    out.update(rows=runs[0]["rows"], messages=runs[0]["messages"])
    out["parquet_bytes"] = runs[0]["parquet_bytes"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--input", type=Path, default=RECORDING)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2000, help="frames per feed call")
    ap.add_argument("--gc", choices=("default", "freeze"), default="default")
    ap.add_argument("--variants", default="naive,simple,fast")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_deltas.json"))
    args = ap.parse_args(argv)

    records = load(args.input)
    if args.gc == "freeze":
        gc.freeze()  # the loaded recording is long-lived: keep it out of every collection
    variants = {
        "naive": lambda: run_naive(records),
        "simple": lambda: run_simple(records, args.batch),
        "fast": lambda: run_fast(records, args.batch),
    }
    chosen = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict]] = {v: [] for v in chosen}
    variants["fast"]() if "fast" in chosen else None  # warm-up (polars thread pool, imports)
    for i in range(args.runs):
        for v in chosen:
            runs[v].append(timed(variants[v]))
        print(
            f"run {i + 1}/{args.runs}: "
            + " ".join(f"{v}={runs[v][-1]['rows_per_s'] / 1e6:.2f}M rows/s" for v in chosen),
            file=sys.stderr,
        )
    result: dict = {
        "benchmark": "deltas",
        "input": str(args.input),
        "runs": args.runs,
        "batch_frames": args.batch,
        "gc": args.gc,
        "polars_threads": pl.thread_pool_size(),
        "python": platform.python_version(),
        "polars": pl.__version__,
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "variants": {v: summarize(r) for v, r in runs.items()},
        "raw": runs,
    }
    if "naive" in chosen:
        for v in chosen:
            ratios = [r["wall_s"] for r in runs["naive"]]
            result["variants"][v]["ratio_vs_naive"] = statistics.median(
                n / r["wall_s"] for n, r in zip(ratios, runs[v], strict=True)
            )
            result["variants"][v]["cpu_ratio_vs_naive"] = statistics.median(
                n["cpu_s"] / r["cpu_s"] for n, r in zip(runs["naive"], runs[v], strict=True)
            )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for v, s in result["variants"].items():
        print(
            f"{v:>7}: {s['rows_per_s'] / 1e6:6.2f} M rows/s wall, "
            f"{(s['rows_per_cpu_s'] or 0) / 1e6:6.2f} M rows/CPU-s, "
            f"{s['messages_per_s']:9.0f} msg/s, cpu {s['cpu_s']:.3f} s, "
            f"x{s.get('ratio_vs_naive', float('nan')):.2f} naive (wall), "
            f"x{s.get('cpu_ratio_vs_naive', float('nan')):.2f} (cpu)"
        )
    head = result["variants"]["fast" if "fast" in chosen else chosen[-1]]
    print(
        f"rows/s={head['rows_per_s']:.0f} ratio_vs_naive={head.get('ratio_vs_naive', 0):.2f} "
        f"cpu_pct={head['cpu_pct']:.0f} rss_mb={result['peak_rss_mb']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
