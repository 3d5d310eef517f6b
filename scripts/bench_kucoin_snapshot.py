"""KuCoin REST snapshot parse: the collector's path against the reference (every number
through `Decimal`), on a 1000 + 1000-level body shaped like the simulator's.

KuCoin sends prices and sizes as JSON numbers, so the body is decoded with stdlib `json`
(``parse_float=str``, exact text) and every value is put in canonical decimal form.
`reference` runs `Decimal` for every value (what `canonical_decimal` did before the fast
path); `collector` is `parse_rest_snapshot` as the collector runs it. Both give the same
levels (checked here, and in tests/test_perf_equivalence.py).

    /work/venv/bin/python scripts/bench_kucoin_snapshot.py --runs 5

Prints one final line `rows/s=… ratio_vs_naive=… cpu_pct=… rss_mb=…` (naive = reference)
and writes `bench-results/bench_kucoin_snapshot.json`.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import time
from pathlib import Path

import orjson

from cryptoflow.exchanges.kucoin import parse, rules


def body(levels: int = 1000, seed: int = 1) -> bytes:
    rng = random.Random(seed)

    def side(start: float, step: float) -> list:
        # like the simulator: float prices (some "x.0", not canonical), int lot sizes
        return [
            [round(start + i * step, 1) if i % 3 else int(start + i * step), rng.randint(1, 5000)]
            for i in range(levels)
        ]

    data = {
        "symbol": "XBTUSDTM",
        "sequence": 123,
        "asks": side(27690.5, 0.1),
        "bids": side(27690.4, -0.1),
        "ts": 1_700_000_000_000_123_456,
    }
    return orjson.dumps({"code": "200000", "data": data})


def _num_text(v: object) -> str:
    """The parser before the fast path: every float text through `Decimal`."""
    if type(v) is int:
        return str(v)
    if type(v) is str:
        return rules._canonical_decimal_slow(v)
    raise ValueError(v)


def _levels(raw: object) -> list:
    if type(raw) is not list:
        raise ValueError(raw)
    out = []
    for lv in raw:
        if type(lv) is not list or len(lv) < 2:
            raise ValueError(lv)
        out.append((_num_text(lv[0]), _num_text(lv[1])))
    return out


def reference(raw: bytes) -> tuple[list, list]:
    """`parse_rest_snapshot`'s level work as it was (per value `_num_text` -> Decimal)."""
    obj = json.loads(raw, parse_float=str)["data"]
    return _levels(obj["bids"]), _levels(obj["asks"])


def collector(raw: bytes) -> tuple[list, list]:
    s = parse.parse_rest_snapshot(raw, "BTCUSDT", 0)
    return s.bids, s.asks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bodies", type=int, default=100, help="snapshots per run")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_kucoin_snapshot.json"))
    args = ap.parse_args(argv)
    raw = body()
    assert reference(raw) == collector(raw), "the fast path changed the output"
    rows = 2000 * args.bodies
    results: dict[str, list[tuple[float, float]]] = {"reference": [], "collector": []}
    for _ in range(args.runs):  # interleaved: both see the same machine load
        for name, fn in (("reference", reference), ("collector", collector)):
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(args.bodies):
                fn(raw)
            results[name].append((time.perf_counter() - t0, time.process_time() - c0))
    summary = {
        name: {
            "wall_rows_per_s": statistics.median(rows / w for w, _ in runs),
            "rows_per_cpu_s": statistics.median(rows / c for _, c in runs),
            "ms_per_snapshot": statistics.median(1000 * w / args.bodies for w, _ in runs),
        }
        for name, runs in results.items()
    }
    ratio = statistics.median(
        r / c for (r, _), (c, _) in zip(results["reference"], results["collector"], strict=True)
    )
    wall = sum(w for runs in results.values() for w, _ in runs)
    cpu = sum(c for runs in results.values() for _, c in runs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"benchmark": "kucoin_snapshot", "runs": args.runs, "variants": summary}
    out["ratio_vs_naive"] = ratio
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    for name, s in summary.items():
        print(
            f"{name:10s} {s['ms_per_snapshot']:.2f} ms/snapshot "
            f"{s['wall_rows_per_s'] / 1e6:.2f} M rows/s "
            f"{s['rows_per_cpu_s'] / 1e6:.2f} M rows/CPU-s"
        )
    print(
        f"rows/s={summary['collector']['wall_rows_per_s']:.0f} ratio_vs_naive={ratio:.2f} "
        f"cpu_pct={100 * cpu / wall:.0f} rss_mb={rss_mb:.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
