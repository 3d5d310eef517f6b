"""Standalone simulator process.

    python -m cryptoflow.sim --symbols BTCUSDT,ETHUSDT --port 0 --ws-port 0
    python -m cryptoflow.sim --venues binance,bybit,okx,kucoin --symbols BTCUSDT,ETHUSDT

Prints one JSON line on stdout once both ports listen:
``{"rest_url": "http://127.0.0.1:P", "ws_url": "ws://127.0.0.1:P2", "rest_port": P,
"ws_port": P2, "symbols": [...], "venues": {venue: [instrument ids]}, "pid": N}``, then
runs until SIGTERM/SIGINT (exit 0).
Faults and stats are driven over HTTP: ``POST /_sim/faults``, ``GET /_sim/stats``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import trio

from cryptoflow.sim.server import serve_simulator


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m cryptoflow.sim", description="Local exchange simulator."
    )
    ap.add_argument("--symbols", default="BTCUSDT,ETHUSDT", help="comma-separated")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="REST port (0 = ephemeral)")
    ap.add_argument("--ws-port", type=int, default=0, help="WebSocket port (0 = ephemeral)")
    ap.add_argument("--seed", default="0")
    ap.add_argument("--tick-interval", type=float, default=0.1)
    ap.add_argument("--ping-interval", type=float, default=180.0, help="0 = no server pings")
    ap.add_argument("--pong-timeout", type=float, default=10.0)
    ap.add_argument("--weight-limit", type=int, default=2400)
    ap.add_argument("--weight-window", type=float, default=60.0)
    ap.add_argument("--ban-seconds", type=float, default=120.0)
    ap.add_argument("--depth", type=int, default=1000, help="max levels per side")
    ap.add_argument("--connection-lifetime", type=float, default=0, help="0 = unlimited")
    ap.add_argument("--recorded-dir", default=None, help="seed books from recorded snapshots")
    ap.add_argument("--venues", default="binance", help="comma-separated: binance,bybit,okx,kucoin")
    for v, ex in (("bybit", "BTCUSDT"), ("okx", "BTC-USDT-SWAP"), ("kucoin", "XBTUSDTM")):
        ap.add_argument(
            f"--{v}-symbols",
            default="",
            help=f"comma-separated {v} instrument ids (e.g. {ex}); default: --symbols mapped",
        )
    ap.add_argument(
        "--okx-no-snapshot", action="store_true", help="OKX: no in-stream snapshot message"
    )
    return ap.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    seed: int | str = int(args.seed) if args.seed.lstrip("-").isdigit() else args.seed
    async with trio.open_nursery() as nursery:
        sim = await nursery.start(
            lambda task_status: serve_simulator(
                symbols=[s.strip().upper() for s in args.symbols.split(",") if s.strip()],
                seed=seed,
                tick_interval=args.tick_interval,
                ping_interval=args.ping_interval or None,
                pong_timeout=args.pong_timeout,
                weight_limit=args.weight_limit,
                weight_window=args.weight_window,
                ban_seconds=args.ban_seconds,
                depth=args.depth,
                recorded_dir=args.recorded_dir,
                connection_lifetime=args.connection_lifetime or None,
                venues=[v.strip() for v in args.venues.split(",") if v.strip()],
                venue_symbols={
                    v: [s.strip() for s in getattr(args, f"{v}_symbols").split(",") if s.strip()]
                    for v in ("bybit", "okx", "kucoin")
                    if getattr(args, f"{v}_symbols")
                },
                okx_snapshot_in_stream=not args.okx_no_snapshot,
                host=args.host,
                port=args.port,
                ws_port=args.ws_port,
                task_status=task_status,
            )
        )
        line = {
            "rest_url": sim.rest_url,
            "ws_url": sim.ws_url,
            "rest_port": sim.rest_port,
            "ws_port": sim.ws_port,
            "symbols": sim.symbols,
            "venues": {name: list(m.books) for name, m in sim.markets.items()},
            "pid": os.getpid(),
        }
        print(json.dumps(line), flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    trio.run(_run, _parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
