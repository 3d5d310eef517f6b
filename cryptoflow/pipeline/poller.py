"""The snapshot lane's reader: one task per symbol polling the REST depth snapshot.

Schedule: slot k is at `start + k * interval` plus a little jitter, so polls never drift.
`start` is a random phase within the first interval, so a shard's symbols poll spread
over the interval: started together (within the jitter), 125 pollers fired 1000-level
snapshots in one burst every 10 s, ~0.5 s of parsing and frame building on the event
loop that held delta flushes back (1-2 % of delta rows spooled > 1 s after their event)
and spent the rate budget in spikes. The first snapshot comes within one interval.

If a poll (or a blocked send: the channel is full because the writer is slow) overruns
its slot, missed slots are skipped, not piled up: back-pressure delays polls, it never
queues them.

Counting (`PollStats`, the `cryptoflow_polls_total` outcomes): a body the fetch already
finds malformed (Bybit, OKX and KuCoin parse there a body that is not certainly a
success; any venue's body the HTTP client cannot decode) is `ok` and `malformed`, like
one the normalizer or the writer's flush finds malformed later: the request worked, the
body did not. Only a poll without a usable answer (transport, 4xx/5xx, an error code in
the body) is `failed`.

Graceful stop (`stopping` set): no new poll starts, but a poll in flight is finished and
its snapshot kept: the venue may already have answered it, and a collector that stops on
a schedule (`--duration`, a rolling deploy) should store what it was sent. The runtime
bounds that wait (`reader.request_timeout`).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from cryptoflow.errors import ExchangeError, MalformedMessage, RateLimited
from cryptoflow.models import DepthSnapshot, SnapshotBody

log = logging.getLogger("cryptoflow.poller")


@attrs.define
class PollStats:
    polls: int = 0
    ok: int = 0  # a response came (its body may still be bad: `malformed`)
    failed: int = 0
    #: of `ok`: bodies found malformed when parsed (by the fetch, the normalizer, or at the
    #: writer's flush for bodies read there); counted then, so every counter only grows
    malformed: int = 0
    throttled: int = 0
    skipped_slots: int = 0
    last_error: str = ""


async def poll_snapshots(
    fetch: Callable[[], Awaitable[DepthSnapshot | SnapshotBody]],
    out: trio.MemorySendChannel[DepthSnapshot | SnapshotBody],
    *,
    exchange: str,
    symbol: str,
    interval: float,
    jitter: float = 0.0,
    rng: random.Random | None = None,
    stats: PollStats | None = None,
    stopping: trio.Event | None = None,
) -> None:
    rng = rng or random.Random()
    stats = stats if stats is not None else PollStats()
    async with out:
        start = trio.current_time() + rng.uniform(0, interval)
        slot = 0
        while True:
            offset = rng.uniform(-jitter, jitter) if jitter else 0.0
            due = max(start + slot * interval + offset, start)
            if stopping is None:
                await trio.sleep_until(due)
            else:
                with trio.move_on_at(due):
                    await stopping.wait()
                if stopping.is_set():
                    return
            stats.polls += 1
            try:
                snapshot = await fetch()
            except RateLimited as exc:
                stats.throttled += 1
                stats.last_error = str(exc)
                log.warning("snapshot throttled: %s", _where(exc, exchange, symbol))
            except MalformedMessage as exc:
                # the venue answered, the body is bad: counted as when the normalizer or
                # the flush finds it so (it was `failed` when the fetch found it)
                stats.ok += 1
                stats.malformed += 1
                stats.last_error = str(exc)
                log.warning("snapshot failed: %s", _where(exc, exchange, symbol))
            except ExchangeError as exc:
                stats.failed += 1
                stats.last_error = str(exc)
                log.warning("snapshot failed: %s", _where(exc, exchange, symbol))
            else:
                stats.ok += 1
                await out.send(snapshot)
                # do not keep it alive through the sleep: one snapshot per symbol held for
                # the whole interval is ~2,000 level lists each that every full GC walks
                del snapshot
            elapsed_slots = math.floor((trio.current_time() - start) / interval)
            next_slot = max(slot + 1, elapsed_slots + 1)
            stats.skipped_slots += next_slot - slot - 1
            slot = next_slot


def _where(exc: ExchangeError, exchange: str, symbol: str) -> str:
    """Our errors already name exchange/symbol when raised with them; add them otherwise."""
    return str(exc) if exc.symbol else f"{exchange}/{symbol}: {exc}"
