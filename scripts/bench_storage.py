"""Storage benchmarks for docs/storage.md: upload throughput, spool (fsync) overhead per
flush, and the measured data-loss window on SIGKILL.

    /work/venv/bin/python scripts/bench_storage.py                 # everything
    /work/venv/bin/python scripts/bench_storage.py --only spool    # spool | upload | kill
    /work/venv/bin/python scripts/bench_storage.py --kills 5 --files 200

Only 127.0.0.1 targets: moto (in-process server), SeaweedFS `weed mini` (if the binary
is installed), the local simulator. Prints a Markdown table per part.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from cryptoflow.models import Dataset  # noqa: E402
from cryptoflow.storage import layout  # noqa: E402
from cryptoflow.storage.s3 import S3Store  # noqa: E402
from cryptoflow.storage.spool import Spool  # noqa: E402


def delta_frame(rows: int, start: int = 0):
    from conftest import tiny_frame_from_columns

    ids = [start + i // 10 for i in range(rows)]  # ~10 levels per message
    ts = [1_764_000_000_000 + i // 10 for i in range(rows)]
    cols = {
        "timestamp": ts,
        "receive_time": [t * 1_000_000 + 1234 for t in ts],
        "first_update_id": ids,
        "last_update_id": ids,
        "prev_update_id": [i - 1 for i in ids],
        "side": ["bid" if i % 2 else "ask" for i in range(rows)],
        "price": [f"{60000 + (i % 500) * 0.1:.1f}" for i in range(rows)],
        "quantity": [f"{(i % 97) * 0.001:.3f}" for i in range(rows)],
        "raw_quantity": [f"{(i % 97) * 0.001:.3f}" for i in range(rows)],
    }
    return tiny_frame_from_columns(Dataset.DELTAS, "binance", "futures", "BTCUSDT", cols)


def encoded(rows: int, start: int = 0) -> tuple[str, bytes]:
    [(key, _, data)] = layout.files_for_frame(
        Dataset.DELTAS, "binance", "futures", "BTCUSDT", delta_frame(rows, start)
    )
    return key, data


# --- spool ------------------------------------------------------------------------------


def bench_spool(n: int) -> list[str]:
    out = [
        "| flush size | rows | file bytes | write+fsync+rename+dir fsync (median / p90) "
        "| same without fsync | fsync cost |",
        "|---|---|---|---|---|---|",
    ]
    for rows in (1_000, 10_000, 100_000):
        key, data = encoded(rows)
        with tempfile.TemporaryDirectory(dir=REPO) as d:
            spool = Spool(Path(d) / "spool", max_bytes=10**12)
            durable = []
            for i in range(n):
                t = time.perf_counter()
                e = spool.write(key.replace(".parquet", f"-{i}.parquet"), data)
                durable.append(time.perf_counter() - t)
                spool.remove(e)
            plain = []
            p = Path(d) / "plain"
            p.mkdir()
            for i in range(n):
                t = time.perf_counter()
                tmp = p / f".x{i}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, p / f"x{i}")
                plain.append(time.perf_counter() - t)
        md, p90 = statistics.median(durable), sorted(durable)[int(0.9 * n)]
        mp = statistics.median(plain)
        out.append(
            f"| {rows:,} rows | {rows:,} | {len(data):,} | {md * 1e3:.2f} / {p90 * 1e3:.2f} ms "
            f"| {mp * 1e3:.2f} ms | {(md - mp) * 1e3:.2f} ms |"
        )
    return out


# --- upload -----------------------------------------------------------------------------


async def _upload(store: S3Store, files: list[tuple[str, Path]], concurrency: int) -> float:
    limiter = trio.CapacityLimiter(concurrency)

    async def one(key: str, path: Path) -> None:
        async with limiter:
            await store.put_file(key, path)

    t = time.perf_counter()
    async with trio.open_nursery() as n:
        for key, path in files:
            n.start_soon(one, key, path)
    return time.perf_counter() - t


def bench_upload(endpoint: str, label: str, nfiles: int) -> list[str]:
    from storage_support import s3_client

    client = s3_client(endpoint)
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    rows_out = []
    for rows in (1_000, 100_000):
        with tempfile.TemporaryDirectory() as d:
            files = []
            key, data = encoded(rows)
            for i in range(nfiles if rows <= 10_000 else max(10, nfiles // 10)):
                p = Path(d) / f"f{i}.parquet"
                p.write_bytes(data)
                files.append((key.replace(".parquet", f"-{i}.parquet"), p))
            for conc in (1, 4):
                store = S3Store(
                    client, bucket, prefix=f"b{conc}", limiter=trio.CapacityLimiter(conc)
                )
                took = trio.run(_upload, store, files, conc)
                total = len(data) * len(files)
                rows_out.append(
                    f"| {label} | {len(data):,} B ({rows:,} rows) | {len(files)} | {conc} "
                    f"| {len(files) / took:.0f} files/s | {total / took / 1e6:.1f} MB/s "
                    f"| {took / len(files) * 1e3:.1f} ms |"
                )
    return rows_out


# --- SIGKILL loss window ----------------------------------------------------------------


def bench_kill(kills: int) -> list[str]:
    import polars as pl
    from storage_support import Collector, Simulator, chain_loss, read_local_dataset, write_config

    symbols = ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    out = ["| run | run time before kill | loss window per symbol (s) | max |", "|---|---|---|---|"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for k in range(kills):
            sim = Simulator(symbols, seed=str(k))
            run = root / f"r{k}"
            cfg = write_config(run / "cfg", sim=sim, spool=run / "spool", local_path=run / "data")
            col = Collector(cfg, run / "c.log")
            try:
                col.wait_for("connected", 30)
                wait = 3.0 + k * 1.37  # a different phase against the 1 s flush each time
                time.sleep(wait)
                kill_ns = time.time_ns()
                col.proc.send_signal(signal.SIGKILL)
                col.proc.wait(10)
            finally:
                col.kill()
                sim.kill()
            # what survived = the output tree + complete files still in the spool
            spooled = [
                pl.read_parquet(p)
                for p in (run / "spool" / "deltas").rglob("*.parquet")
                if ".tmp-" not in p.name
            ]
            deltas = pl.concat(
                [read_local_dataset(run / "data", "deltas").drop("_key"), *spooled],
                how="vertical_relaxed",
            )
            losses = {s: chain_loss(deltas, s, kill_ns) for s in symbols}
            m = max(losses.values())
            worst = max(worst, m)
            out.append(
                f"| {k + 1} | {wait:.2f} s | "
                + ", ".join(f"{s} {v:.3f}" for s, v in losses.items())
                + f" | {m:.3f} |"
            )
    out.append(f"\nworst loss window over {kills} kills: {worst:.3f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["spool", "upload", "kill"], default=None)
    ap.add_argument("--files", type=int, default=200, help="small files per upload run")
    ap.add_argument("--spool-n", type=int, default=50)
    ap.add_argument("--kills", type=int, default=3)
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    print(f"# bench_storage ({time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs)\n")
    if args.only in (None, "spool"):
        print(f"## spool write per flush (n={args.spool_n}, delta rows, zstd Parquet)\n")
        print("\n".join(bench_spool(args.spool_n)) + "\n")
    if args.only in (None, "upload"):
        from moto.server import ThreadedMotoServer
        from storage_support import SeaweedServer, weed_binary

        print("## upload throughput (put_object + ContentMD5 + head_object verify)\n")
        print("| server | file | files | concurrency | files/s | MB/s | per file |")
        print("|---|---|---|---|---|---|---|")
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        try:
            host, port = moto.get_host_and_port()
            print("\n".join(bench_upload(f"http://{host}:{port}", "moto 5", args.files)))
        finally:
            moto.stop()
        if weed_binary():
            with tempfile.TemporaryDirectory() as d:
                weed = SeaweedServer(Path(d) / "data", Path(d) / "weed.log")
                up = weed.start()
                try:
                    print("\n".join(bench_upload(weed.endpoint, "SeaweedFS", args.files)))
                finally:
                    weed.stop()
                print(f"\n(SeaweedFS `weed mini` ready in {up:.1f} s)")
        else:
            print("\n(SeaweedFS skipped: no `weed` binary)")
        print()
    if args.only in (None, "kill"):
        print(f"## SIGKILL loss window (storage.spool.max_age = 1.0 s, {args.kills} kills)\n")
        print("\n".join(bench_kill(args.kills)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
