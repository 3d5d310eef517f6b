"""HTTP clients bound to a shard's source IP.

Per tooling-notes: when a transport is passed, httpx ignores the client's own `limits`,
so they are set on the transport; `retries=0` because retrying is our decision (budget,
back-off), not the transport's.
"""

from __future__ import annotations

import httpx


def make_http_client(
    base_url: str, *, source_ip: str | None, timeout: float, max_connections: int = 20
) -> httpx.AsyncClient:
    transport = httpx.AsyncHTTPTransport(
        local_address=source_ip,
        retries=0,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=10),
    )
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": "cryptoflow"},
    )
