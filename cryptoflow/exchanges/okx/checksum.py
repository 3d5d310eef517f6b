"""OKX order-book checksum: signed CRC32 of the top 25 levels, interleaved.

OKX's documented algorithm (WS "Order book channel", Checksum): take the best 25 bids
(highest first) and the best 25 asks (lowest first) of the book after applying the
message, build ``bid1_px:bid1_sz:ask1_px:ask1_sz:bid2_px:...`` (when one side is shorter
the other side's remaining levels follow alone), CRC32 it and read the result as a
signed 32-bit integer. Prices and sizes are the strings exactly as OKX sent them.

Live frames carry ``checksum: 0`` since 23 Jun 2026: only a non-zero checksum is
checked (`should_check`).
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Final

from cryptoflow.models import Level

DEPTH: Final = 25


def okx_checksum(bids: Sequence[Level], asks: Sequence[Level]) -> int:
    """Checksum of a book given best-first: `bids` highest first, `asks` lowest first.

    Only the first 25 of each side are used, so a whole sorted book may be passed.
    """
    parts: list[str] = []
    nb, na = min(len(bids), DEPTH), min(len(asks), DEPTH)
    for i in range(max(nb, na)):
        if i < nb:
            p, s = bids[i][0], bids[i][1]
            parts.append(f"{p}:{s}")
        if i < na:
            p, s = asks[i][0], asks[i][1]
            parts.append(f"{p}:{s}")
    crc = zlib.crc32(":".join(parts).encode())
    return crc - (1 << 32) if crc >= (1 << 31) else crc


def top_levels(side: Mapping[str, str], *, bids: bool, depth: int = DEPTH) -> list[Level]:
    """Best `depth` levels of a {price string: size string} side, best first."""
    pick: Iterable[str]
    if bids:
        pick = heapq.nlargest(depth, side, key=Decimal)
    else:
        pick = heapq.nsmallest(depth, side, key=Decimal)
    return [(p, side[p]) for p in pick]


def book_checksum(bids: Mapping[str, str], asks: Mapping[str, str]) -> int:
    """Checksum of a book kept as {price string: size string} per side (unsorted)."""
    return okx_checksum(top_levels(bids, bids=True), top_levels(asks, bids=False))


def should_check(checksum: int | None) -> bool:
    """OKX sends 0 when it no longer computes the field; None = not sent at all."""
    return checksum is not None and checksum != 0
