"""WebSocket receive-path benchmark: server frames -> messages, wsproto vs our decoder.

Feeds the same stream of server-to-client frames, in 64 KiB chunks cut anywhere (frames
straddle chunk boundaries, as socket reads do), through:

- `wsproto`: wsproto's client `Connection` (`receive_data` + `events()`), with the
  dispatch and fragment joining our client did with it (the baseline).
- `decoder`: `cryptoflow.net.ws.FrameDecoder.feed`, the pure parse step of our client.

No sockets: only the per-frame parse cost. Frames are KuCoin level2-like text messages
(~170-290 bytes), built once by wsproto's server side (not timed); both variants must
yield exactly those messages. Each repetition runs both variants (interleaved, so
machine load hits both alike); figures are medians over the repetitions,
`ratio_vs_wsproto` the median of the per-repetition wall-time ratios (paired).

    /work/venv/bin/python scripts/bench_ws.py [--frames 100000] [--runs 5]

Prints one final line `frames/s=… ratio_vs_wsproto=… cpu_pct=… rss_mb=…` (the decoder)
and writes `bench-results/bench_ws.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, Message, TextMessage

from cryptoflow.net.ws import RECEIVE_BYTES
from cryptoflow.net.wsframe import FrameDecoder


def make_messages(n: int, seed: int = 1) -> list[str]:
    """KuCoin futures level2 messages; one in five is a longer depth-style message."""
    rng = random.Random(seed)
    out = []
    for sn in range(1_000_000, 1_000_000 + n):
        price = f"{60000 + rng.randint(-5000, 5000) / 10:.1f}"
        side = rng.choice(("buy", "sell"))
        ts = 1_700_000_000_000 + sn
        if rng.random() < 0.2:
            bids = ",".join(f'["{price}","{rng.randint(1, 9999)}"]' for _ in range(3))
            out.append(
                '{"type":"message","topic":"/contractMarket/level2Depth5:XBTUSDTM",'
                f'"subject":"level2","sn":{sn},"data":{{"bids":[{bids}],"asks":[{bids}],'
                f'"sequence":{sn},"timestamp":{ts}}}}}'
            )
        else:
            out.append(
                '{"type":"message","topic":"/contractMarket/level2:XBTUSDTM",'
                f'"subject":"level2","sn":{sn},"data":{{"sequence":{sn},'
                f'"change":"{price},{side},{rng.randint(0, 99999)}","timestamp":{ts}}}}}'
            )
    return out


def make_chunks(messages: list[str], chunk: int) -> list[bytes]:
    """The messages as unmasked server frames (wsproto's server side), cut into reads."""
    server = Connection(ConnectionType.SERVER)
    stream = b"".join(server.send(Message(data=m)) for m in messages)
    return [stream[i : i + chunk] for i in range(0, len(stream), chunk)]


def run_wsproto(chunks: list[bytes]) -> list[str | bytes]:
    """What our client did per read with wsproto before the hand-written decoder."""
    conn = Connection(ConnectionType.CLIENT)
    out: list[str | bytes] = []
    parts: list = []
    for chunk in chunks:
        conn.receive_data(chunk)
        for event in conn.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                data = event.data
                if event.message_finished and not parts:
                    out.append(data if isinstance(data, str) else bytes(data))
                    continue
                parts.append(data)
                if event.message_finished:
                    out.append(("" if isinstance(data, str) else b"").join(parts))
                    parts.clear()
    return out


def run_decoder(chunks: list[bytes]) -> list[str | bytes]:
    decoder = FrameDecoder(16 * 1024 * 1024)
    out: list[str | bytes] = []
    for chunk in chunks:
        decoder.feed(chunk, out)
    return out


def timed(fn: Callable[[list[bytes]], list], chunks: list[bytes], expected: list[str]) -> dict:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(chunks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if out != expected:
        raise SystemExit(f"{fn.__name__} returned other messages than were sent")
    frames = len(out)
    return {
        "frames": frames,
        "wall_s": wall,
        "cpu_s": cpu,
        "frames_per_s": frames / wall,
        "us_per_frame": 1e6 * wall / frames,
        "cpu_us_per_frame": 1e6 * cpu / frames,
        "cpu_pct": 100 * cpu / wall,
    }


def summarize(runs: list[dict]) -> dict:
    keys = ("wall_s", "cpu_s", "frames_per_s", "us_per_frame", "cpu_us_per_frame", "cpu_pct")
    return {"frames": runs[0]["frames"]} | {k: statistics.median(r[k] for r in runs) for k in keys}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=RECEIVE_BYTES, help="bytes per read")
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench_ws.json"))
    args = ap.parse_args(argv)

    messages = make_messages(args.frames)
    chunks = make_chunks(messages, args.chunk)
    stream_bytes = sum(map(len, chunks))
    variants = {"wsproto": run_wsproto, "decoder": run_decoder}
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for fn in variants.values():  # warm-up
        fn(chunks[:10])
    for i in range(args.runs):
        for name, fn in variants.items():
            runs[name].append(timed(fn, chunks, messages))
        print(
            f"run {i + 1}/{args.runs}: "
            + " ".join(f"{v}={runs[v][-1]['us_per_frame']:.2f} µs/frame" for v in variants),
            file=sys.stderr,
        )
    result: dict = {
        "benchmark": "ws_receive",
        "frames": args.frames,
        "stream_bytes": stream_bytes,
        "mean_frame_bytes": stream_bytes / args.frames,
        "chunk_bytes": args.chunk,
        "chunks": len(chunks),
        "runs": args.runs,
        "python": platform.python_version(),
        "wsproto": version("wsproto"),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "variants": {v: summarize(r) for v, r in runs.items()},
        "raw": runs,
    }
    for v in variants:
        result["variants"][v]["ratio_vs_wsproto"] = statistics.median(
            w["wall_s"] / r["wall_s"] for w, r in zip(runs["wsproto"], runs[v], strict=True)
        )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(
        f"{args.frames} frames, {result['mean_frame_bytes']:.0f} B/frame on the wire, "
        f"{len(chunks)} reads of {args.chunk} B"
    )
    for v, s in result["variants"].items():
        print(
            f"{v:>8}: {s['frames_per_s']:10.0f} frames/s, {s['us_per_frame']:6.2f} µs/frame, "
            f"cpu {s['cpu_s']:.3f} s ({s['cpu_pct']:.0f}%), x{s['ratio_vs_wsproto']:.1f} wsproto"
        )
    head = result["variants"]["decoder"]
    print(
        f"frames/s={head['frames_per_s']:.0f} ratio_vs_wsproto={head['ratio_vs_wsproto']:.2f} "
        f"cpu_pct={head['cpu_pct']:.0f} rss_mb={result['peak_rss_mb']:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
