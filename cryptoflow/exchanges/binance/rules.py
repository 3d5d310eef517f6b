"""Binance USD-M diff-depth sequence rules for the shared book-sync machine.

Binance ids map directly onto the normalized ones (first=U, last=u, prev=pu), and its
documented rules (drop `u < L`, first applied `U <= L <= u`, then `pu == previous u`) are
the machine's defaults; resync = fetch a new REST snapshot while keeping the stream open.
"""

from __future__ import annotations

from cryptoflow.book.sync import SyncRules

RULES = SyncRules(venue="binance", resync_by="rest")
