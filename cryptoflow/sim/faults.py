"""Fault injection and accounting for the simulator.

A fault is queued with :meth:`Faults.add` (Python) or ``POST /_sim/faults`` (JSON, same
fields) and consumed by the next matching REST response or outgoing WS event. Each
application is counted in ``Faults.applied[kind]``.

REST kinds (next ``count`` matching responses):
  ``rest_429``  429 + Retry-After=``retry_after`` (the IP is then "told to wait": a request
                before it elapses gets a real 418 ban)
  ``rest_418``  418 + Retry-After=``retry_after`` (the IP is banned for that long)
  ``rest_5xx``  ``status`` (default 503)
  ``rest_slow`` response delayed by ``delay`` seconds (then served normally)
  ``rest_malformed``       200 with a truncated JSON body
  ``rest_missing_fields``  200 with ``fields`` (default ["lastUpdateId"]) removed
  ``rest_undecodable``     200 with ``Content-Encoding: gzip`` on a body that is not gzip
                           (an HTTP client cannot decode it)
WS kinds (next ``count`` outgoing events of ``symbol``, or of any symbol if None):
  ``ws_drop``          the event is not sent (a real sequence gap; the book advanced)
  ``ws_duplicate``     the event is sent twice
  ``ws_out_of_order``  the event is held back and sent after the next one
  ``ws_close``         a close frame (``code``, default 1001 "going away", as a venue sends
                       before maintenance; ``reason``) instead of the event, then the TCP
                       connection is closed after the client's close answer (at most 1 s)
  ``ws_abort``         the TCP connection is closed without a close frame instead of
                       sending (the client sees the connection end abnormally: 1006)
  ``ws_stall``         no frames for ``seconds`` (changes accumulate, then one event)
  ``ws_malformed``     a non-JSON text frame is sent before the event
  ``ws_ping``          a server ping is sent before the event (pong recorded in stats)
Optional ``path`` (REST) restricts a fault to one route path, ``symbol`` to one symbol,
``venue`` to one venue module (default: any).
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

REST_FAULTS = frozenset(
    {
        "rest_429",
        "rest_418",
        "rest_5xx",
        "rest_slow",
        "rest_malformed",
        "rest_missing_fields",
        "rest_undecodable",
    }
)
WS_FAULTS = frozenset(
    {
        "ws_drop",
        "ws_duplicate",
        "ws_out_of_order",
        "ws_close",
        "ws_abort",
        "ws_stall",
        "ws_malformed",
        "ws_ping",
    }
)
FAULT_KINDS = REST_FAULTS | WS_FAULTS


@dataclass
class Fault:
    kind: str
    count: int = 1
    symbol: str | None = None
    path: str | None = None
    venue: str | None = None
    retry_after: int = 5
    status: int = 503
    delay: float = 2.0
    seconds: float = 2.0
    fields: list[str] = field(default_factory=lambda: ["lastUpdateId"])
    code: int = 1001
    reason: str = "simulator fault: close"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Faults:
    def __init__(self) -> None:
        self.pending: list[Fault] = []
        self.applied: dict[str, int] = defaultdict(int)
        self.applied_by_symbol: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, kind: str, count: int = 1, **params: Any) -> Fault:
        """Queue a fault; see the module docstring for kinds and parameters."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        unknown = set(params) - {
            "symbol",
            "path",
            "venue",
            "retry_after",
            "status",
            "delay",
            "seconds",
            "fields",
            "code",
            "reason",
        }
        if unknown:
            raise ValueError(f"unknown fault parameter(s): {sorted(unknown)}")
        if params.get("symbol"):
            params["symbol"] = str(params["symbol"]).upper()
        f = Fault(kind=kind, count=count, **params)
        self.pending.append(f)
        return f

    def clear(self) -> None:
        self.pending.clear()

    def _take(self, kinds: frozenset[str], venue: str, symbol: str | None, path: str | None):
        out: list[Fault] = []
        for f in list(self.pending):
            if f.kind not in kinds or any(o.kind == f.kind for o in out):
                continue
            if f.venue and f.venue != venue:
                continue
            if f.symbol and f.symbol != (symbol or "").upper():
                continue
            if f.path and path is not None and f.path != path:
                continue
            f.count -= 1
            if f.count <= 0:
                self.pending.remove(f)
            self.applied[f.kind] += 1
            self.applied_by_symbol[symbol or "*"][f.kind] += 1
            out.append(f)
        return out

    def take_rest(self, venue: str, path: str, symbol: str | None) -> list[Fault]:
        """Faults to apply to this REST response (at most one per kind), consumed."""
        return self._take(REST_FAULTS, venue, symbol, path)

    def take_ws(self, venue: str, symbol: str) -> list[Fault]:
        """Faults to apply to this outgoing WS event (at most one per kind), consumed."""
        return self._take(WS_FAULTS, venue, symbol, None)

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": dict(self.applied),
            "applied_by_symbol": {k: dict(v) for k, v in self.applied_by_symbol.items()},
            "pending": [f.to_json() for f in self.pending],
        }


@dataclass
class SymbolStats:
    rest_snapshots: int = 0  # complete, well-formed 200 depth responses
    rest_levels: int = 0  # bid + ask levels in those responses
    ws_events: int = 0  # diff events sent (a duplicate counts twice)
    ws_levels: int = 0  # levels in the events sent
    ws_ticks: int = 0  # book ticks covered by the events sent
    ws_drops: int = 0  # events dropped by a ws_drop fault
    ticks: int = 0  # book ticks so far
    last_update_id: int = 0


@dataclass
class ClientStats:
    requests: deque = field(default_factory=lambda: deque(maxlen=20_000))
    window_start: float = 0.0
    used_weight: int = 0
    throttled_until: float = 0.0  # trio clock; a request before this -> ban
    banned_until: float = 0.0  # trio clock
    bans: int = 0
    violations: int = 0  # requests sent while throttled or banned

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "used_weight": self.used_weight,
            "throttled_for": max(0.0, self.throttled_until - now),
            "banned_for": max(0.0, self.banned_until - now),
            "bans": self.bans,
            "violations": self.violations,
            "requests": list(self.requests),
        }


class Stats:
    """Counters a test can assert on. ``to_json()`` is what ``GET /_sim/stats`` returns."""

    def __init__(self) -> None:
        self.symbols: dict[str, SymbolStats] = defaultdict(SymbolStats)
        self.clients: dict[str, ClientStats] = defaultdict(ClientStats)
        self.ws = {
            "connections": 0,
            "open": 0,
            "messages_received": 0,
            "pings_sent": 0,
            "pongs_received": 0,
            "pings_unanswered": 0,
            "closed_by_fault": 0,
            "aborted_by_fault": 0,
            "closed_by_lifetime": 0,
        }

    def log_request(
        self,
        ip: str,
        method: str,
        target: str,
        status: int,
        weight: int,
        violation: str | None,
    ) -> None:
        self.clients[ip].requests.append(
            {
                "t": time.time(),
                "mono": trio.current_time(),
                "method": method,
                "target": target,
                "status": status,
                "weight": weight,
                "violation": violation,
            }
        )

    def to_json(self) -> dict[str, Any]:
        now = trio.current_time()
        return {
            "symbols": {k: asdict(v) for k, v in self.symbols.items()},
            "clients": {k: v.to_json(now) for k, v in self.clients.items()},
            "ws": dict(self.ws),
        }
