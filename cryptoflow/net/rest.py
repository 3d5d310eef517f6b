"""The REST edge shared by the venues: budget, send, and error mapping in one place.

A venue subclass says how much a request weighs and how its throttle/ban signals look
(`interpret`); everything else — waiting on the shard's `RateBudget`, mapping httpx
failures to `cryptoflow.errors`, timing — is the same for every venue.
"""

from __future__ import annotations

import time

import httpx

from cryptoflow.errors import (
    IPBanned,
    MalformedMessage,
    RateLimited,
    RequestRejected,
    ServerError,
    TransportError,
)
from cryptoflow.net.ratelimit import RateBudget


def retry_after_seconds(resp: httpx.Response, default: float) -> float:
    value = resp.headers.get("Retry-After")
    try:
        return max(float(value), 0.0) if value is not None else default
    except ValueError:
        return default


class VenueRest:
    """Base of each venue's REST client. Subclasses set `exchange` and may override
    `interpret` for venue-specific signals (usage headers, error bodies)."""

    exchange = ""

    def __init__(self, client: httpx.AsyncClient, budget: RateBudget) -> None:
        self.client = client
        self.budget = budget

    async def get(
        self, path: str, params: dict[str, str | int], *, weight: int, symbol: str = ""
    ) -> tuple[bytes, int]:
        """GET within the budget; returns (body, receive time ns) or raises our errors."""
        return await self._send("GET", path, params, weight=weight, symbol=symbol)

    async def post(self, path: str, *, weight: int, symbol: str = "") -> tuple[bytes, int]:
        return await self._send("POST", path, None, weight=weight, symbol=symbol)

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str | int] | None,
        *,
        weight: int,
        symbol: str,
    ) -> tuple[bytes, int]:
        await self.budget.acquire(weight)
        request = self.client.build_request(method, path, params=params)
        try:
            streamed = resp = await self.client.send(request, stream=True)
            try:
                await streamed.aread()
            except httpx.RequestError as exc:  # the answer came; its body not (all) read
                if not streamed.is_success:  # the status says what happened (429, 5xx...)
                    resp = _without_body(streamed)
                elif isinstance(exc, httpx.DecodingError):
                    raise self._undecodable(path, symbol, exc) from exc
                else:  # a 2xx body cut short or timed out: the transport's failure
                    raise
            finally:
                await streamed.aclose()
        except httpx.TimeoutException as exc:
            raise TransportError(
                f"timeout on {path}: {exc!r}", exchange=self.exchange, symbol=symbol
            ) from exc
        except httpx.DecodingError as exc:  # decoded before `send` returned (eager transports)
            raise self._undecodable(path, symbol, exc) from exc
        except httpx.RequestError as exc:  # transport failures, too many redirects...
            raise TransportError(
                f"{type(exc).__name__} on {path}: {exc}", exchange=self.exchange, symbol=symbol
            ) from exc
        receive_ns = time.time_ns()
        self.interpret(resp, symbol)
        return resp.content, receive_ns

    def _undecodable(self, path: str, symbol: str, exc: httpx.DecodingError) -> MalformedMessage:
        """A 2xx answer whose body cannot be decoded: the venue answered, the body is bad."""
        return MalformedMessage(
            f"undecodable response body on {path}: {exc}", exchange=self.exchange, symbol=symbol
        )

    def interpret(self, resp: httpx.Response, symbol: str) -> None:
        """Map the HTTP status to the budget and the error tree (generic rules)."""
        status = resp.status_code
        if status == 429:
            wait = retry_after_seconds(resp, 60.0)
            self.budget.throttle(wait)
            raise RateLimited(
                f"HTTP 429, retry after {wait:g}s",
                retry_after=wait,
                exchange=self.exchange,
                symbol=symbol,
            )
        if status == 418:
            wait = retry_after_seconds(resp, 120.0)
            self.budget.ban(wait)
            raise IPBanned(
                f"HTTP 418 IP banned for {wait:g}s",
                retry_after=wait,
                exchange=self.exchange,
                symbol=symbol,
            )
        if status >= 500:
            raise ServerError(
                f"HTTP {status} from {resp.request.url.path}",
                status=status,
                exchange=self.exchange,
                symbol=symbol,
            )
        if status >= 400:
            raise RequestRejected(
                f"HTTP {status} from {resp.request.url.path}: {resp.text[:200]}",
                status=status,
                exchange=self.exchange,
                symbol=symbol,
            )


def _without_body(resp: httpx.Response) -> httpx.Response:
    """`resp` with an empty body, for an error status whose body cannot be read (cut
    short, timed out) or decoded: the status and headers (`Retry-After`, a venue's reset)
    still decide the outcome, as for any 429 or 5xx. Before, such a 429 counted as a
    malformed body or a transport failure, and the budget was not told to wait."""
    headers = [(k, v) for k, v in resp.headers.multi_items() if k.lower() != "content-encoding"]
    return httpx.Response(resp.status_code, headers=headers, content=b"", request=resp.request)
