"""The ops HTTP endpoint: `/metrics` (Prometheus text), `/healthz` and `/livez` (JSON), on
trio + h11.

`serve_ops` binds 127.0.0.1:9108 by default (`metrics.host/port` in config.yml). Each
request is answered on the trio thread (reading the stats is a few dict walks), then the
connection is closed. `GET` and `HEAD` only.

`/healthz` answers 200 `{"status": "ok"}`, or 503 `{"status": "unhealthy", "reasons": [...]}`
when any of:
- `stale`: a symbol lane that has received data at least once has received nothing for
  more than `stale_after` seconds (the `snapshots` lane only where a REST poller runs for
  the symbol, since without one snapshots come only on resync); only usable snapshots
  count there (`BookSync.on_unread_snapshot`), so every poll malformed turns it stale;
- `never_received`: a lane a shard runs (`ShardStats.symbols` x `ShardStats.lanes`) has
  received nothing at all `stale_after` seconds after the shard started: its connection
  never opened (a `source_ip` not on this host, DNS, the venue refusing), the venue
  refused that symbol's subscription, or every poll failed. The grace runs from the
  start, not from the last (re)connect: a connection dropped for stalls (no data for
  `ws_stall_timeout`) and reopened would otherwise keep restarting it, and the lane
  would never be judged;
- `spool_over_limit`: the spool holds more than its `max_bytes`;
- `spool_full`: the spool refused the writer's last flush as full (it refuses writes
  *before* passing its limit, so `spool_over_limit` alone never fires for that): rows
  pile up in memory until uploads free room;
- `writer_backpressure`: the writer has paused its input (its memory cap is reached,
  with the spool refusing new files).
It is for readiness and alerting, never for restarts: a restart cures none of these (one
venue's silent symbol, an S3 outage) but gaps every symbol and loses the rows the writer
holds in memory when the spool is full.

`/livez` answers 200 `{"status": "alive"}` whenever it is answered at all: the request is
served on the trio thread, so an answer proves the process and its event loop run. That is
what a liveness probe / container healthcheck may restart on (no answer = wedged). The
writer needs no check of its own: it runs unsupervised in the run's root nursery, so if it
dies the whole process ends and the probe's connection is refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import h11
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from cryptoflow.ops.metrics import (
    Freshness,
    build_registry,
    iter_symbols,
    split_label,
    watched_lanes,
)

log = logging.getLogger(__name__)

READ_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 16 * 1024


def check_health(
    result: Any,
    *,
    stale_after: float = 60.0,
    spool: Any = None,
    freshness: Freshness | None = None,
) -> list[dict[str, Any]]:
    """Reasons the run is unhealthy (empty list = healthy)."""
    freshness = freshness or Freshness()
    reasons: list[dict[str, Any]] = []
    ages: dict[tuple[str, ...], float | None] = {}
    for view in iter_symbols(result):
        for lane in watched_lanes(view):
            age = ages[(*view.key, lane)] = freshness.age(view, lane)
            if age is not None and age > stale_after:
                reasons.append(
                    {
                        "reason": "stale",
                        "exchange": view.exchange,
                        "shard": view.shard,
                        "symbol": view.symbol,
                        "lane": lane,
                        "age_seconds": round(age, 3),
                        "stale_after": stale_after,
                    }
                )
    reasons += _never_received(result, ages, now=freshness.clock(), grace=stale_after)
    spool = spool if spool is not None else getattr(result, "spool", None)
    if spool is not None:
        used, limit = int(getattr(spool, "bytes", 0)), getattr(spool, "max_bytes", None)
        if limit is not None and used > limit:
            reasons.append({"reason": "spool_over_limit", "bytes": used, "max_bytes": int(limit)})
    writer = getattr(result, "writer", None) if result is not None else None
    if writer is not None and getattr(writer, "spool_refusing", False):
        reasons.append(
            {
                "reason": "spool_full",
                "spool_bytes": int(getattr(writer, "spool_bytes", 0)),
                "buffered_rows": int(getattr(writer, "buffered_rows", 0)),
            }
        )
    if writer is not None and getattr(writer, "backpressure", False):
        reasons.append(
            {
                "reason": "writer_backpressure",
                "buffered_rows": int(getattr(writer, "buffered_rows", 0)),
                "spool_bytes": int(getattr(writer, "spool_bytes", 0)),
            }
        )
    return reasons


def _never_received(
    result: Any, ages: dict[tuple[str, ...], float | None], *, now: float, grace: float
) -> list[dict[str, Any]]:
    """Lanes a shard runs that have received nothing `grace` seconds after it started.

    `ages` holds the age of every lane the stale check looked at (None: nothing received);
    a symbol no stats know of yet (its connection never opened) is missing there. Shards
    without a start time (`ShardStats.started` None: stats built by hand) are not judged.
    `now` is on the clock of `started` (trio's, in the run).
    """
    reasons: list[dict[str, Any]] = []
    for label, shard in list(getattr(result, "shards", {}).items()):
        started = getattr(shard, "started", None)
        if started is None or now - started <= grace:
            continue
        exchange, shard_name = split_label(label)
        for symbol in getattr(shard, "symbols", ()):
            for lane in getattr(shard, "lanes", ()):
                if ages.get((exchange, shard_name, symbol, lane)) is None:
                    reasons.append(
                        {
                            "reason": "never_received",
                            "exchange": exchange,
                            "shard": shard_name,
                            "symbol": symbol,
                            "lane": lane,
                            "waited_seconds": round(now - started, 3),
                            "stale_after": grace,
                        }
                    )
    return reasons


class OpsApp:
    """Routes requests; holds the registry and the freshness tracker shared by both paths."""

    def __init__(
        self,
        result_getter: Callable[[], Any],
        *,
        stale_after: float = 60.0,
        spool: Any = None,
        freshness: Freshness | None = None,
    ) -> None:
        self.result_getter = result_getter
        self.stale_after = stale_after
        self.spool = spool
        self.freshness = freshness or Freshness(clock=trio.current_time)
        self.registry, self.collector = build_registry(
            result_getter, spool=spool, freshness=self.freshness
        )

    def handle(self, method: str, target: str) -> tuple[int, str, bytes]:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/livez":
            return 200, "application/json", b'{"status": "alive"}\n'
        if path == "/healthz":
            reasons = check_health(
                self.result_getter(),
                stale_after=self.stale_after,
                spool=self.spool,
                freshness=self.freshness,
            )
            if reasons:
                body = {"status": "unhealthy", "reasons": reasons}
                return 503, "application/json", json.dumps(body).encode() + b"\n"
            return 200, "application/json", b'{"status": "ok"}\n'
        if path == "/":
            return 200, "text/plain; charset=utf-8", b"cryptoflow: /metrics /healthz /livez\n"
        return 404, "text/plain; charset=utf-8", b"not found\n"

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        try:
            with trio.move_on_after(READ_TIMEOUT):
                request = await _next_request(conn, stream)
                if request is None:
                    return
                method = request.method.decode("ascii", "replace")
                status, ctype, body = self.handle(method, request.target.decode("latin-1"))
                headers = [
                    ("Content-Type", ctype),
                    ("Content-Length", str(len(body))),
                    ("Connection", "close"),
                ]
                if status == 405:
                    headers.append(("Allow", "GET, HEAD"))
                out = conn.send(h11.Response(status_code=status, headers=headers))
                if method != "HEAD":
                    out += conn.send(h11.Data(data=body))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one bad request must never take the endpoint down
            log.exception("ops endpoint: request failed")
        finally:
            await trio.aclose_forcefully(stream)


async def _next_request(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)  # b"" = EOF
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed or anything unexpected


async def open_ops_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind `host:port` for `serve_ops`. Raises `OSError` (`socket.gaierror` for a host
    that does not resolve): the run binds before it starts collecting, so that becomes
    a config error rather than a failure inside the running service."""
    return await trio.open_tcp_listeners(port, host=host)


async def serve_ops(
    result_getter: Callable[[], Any],
    *,
    host: str = "127.0.0.1",
    port: int = 9108,
    stale_after: float = 60.0,
    spool: Any = None,
    listeners: Sequence[trio.SocketListener] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/metrics`, `/healthz` and `/livez` until cancelled; `task_status.started(bound_port)`.

    `result_getter()` returns the live `RunResult` (or None before the run exists);
    `spool` is the `Spool` (anything with `.bytes` and `.max_bytes`), else `result.spool`.
    `listeners` from `open_ops_listeners` are served (and closed at the end) instead of
    binding `host:port` here.
    """
    app = OpsApp(result_getter, stale_after=stale_after, spool=spool)
    if listeners is None:
        listeners = await open_ops_listeners(host, port)
    bound = listeners[0].socket.getsockname()[1]
    log.info("ops endpoint on http://%s:%d (/metrics, /healthz, /livez)", host, bound)
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(app.serve_connection, listeners, handler_nursery=nursery)
