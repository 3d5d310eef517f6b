"""HTTP clients bound to a shard's source IP.

Per tooling-notes: when a transport is passed, httpx ignores the client's own `limits`,
so they are set on the transport; `retries=0` because retrying is our decision (budget,
back-off), not the transport's. A failed connect is reworded with its cause and the
source IP (`net/connect.py`): httpx's own message hides a source IP that is not on
this host.
"""

from __future__ import annotations

import socket

import httpx

from cryptoflow.net.connect import describe_connect_failure


class _BoundTransport(httpx.AsyncHTTPTransport):
    """The transport with connect errors that name their cause and the source IP."""

    def __init__(self, *, source_ip: str | None, **kwargs) -> None:
        super().__init__(local_address=source_ip, **kwargs)
        self.source_ip = source_ip

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectError as exc:
            text = describe_connect_failure(exc, self.source_ip)
            raise httpx.ConnectError(text, request=request) from exc


def source_ip_problem(address: str) -> str | None:
    """Why connections cannot be bound to `address` on this host (None: they can).

    An address the host does not have fails here with EADDRNOTAVAIL, as every REST and
    WebSocket connection of its shard would.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def make_http_client(
    base_url: str, *, source_ip: str | None, timeout: float, max_connections: int = 20
) -> httpx.AsyncClient:
    transport = _BoundTransport(
        source_ip=source_ip,
        retries=0,
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=10),
    )
    return httpx.AsyncClient(
        base_url=base_url,
        transport=transport,
        timeout=httpx.Timeout(timeout),
        headers={"User-Agent": "cryptoflow"},
    )
