"""One exception tree for the whole service.

Every failure that crosses a module boundary is one of these, so the CLI can turn it into
one clear line (and an exit code) and the pipeline can decide per class whether a task
retries, resyncs or stops. Venue and storage backends translate their library errors
(httpx, boto3, OSError) into this tree in exactly one place each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CryptoflowError(Exception):
    """Base of every error cryptoflow raises on purpose."""


# --- configuration -------------------------------------------------------------------


class ConfigError(CryptoflowError):
    """The configuration cannot be used. `problems` holds every finding, one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems) if self.problems else "invalid configuration")


class UsageError(CryptoflowError):
    """A command-line argument is wrong (unknown exchange, unknown shard, bad path...)."""


# --- exchanges -----------------------------------------------------------------------


class ExchangeError(CryptoflowError):
    """Something went wrong talking to, or understanding, an exchange."""

    def __init__(self, message: str, *, exchange: str = "", symbol: str = "") -> None:
        self.exchange = exchange
        self.symbol = symbol
        self.message = message  # without the place: for an error re-raised with more words
        where = "/".join(p for p in (exchange, symbol) if p)
        super().__init__(f"{where}: {message}" if where else message)


class MalformedMessage(ExchangeError):
    """A payload that does not have the shape the venue documents (bad JSON, missing field)."""


class TransportError(ExchangeError):
    """Connection refused/reset, timeout, TLS failure: the request may be retried."""


class ServerError(ExchangeError):
    """The venue answered 5xx: state unknown, retry later with back-off."""

    def __init__(self, message: str, *, status: int, exchange: str = "", symbol: str = "") -> None:
        self.status = status
        super().__init__(message, exchange=exchange, symbol=symbol)


class RequestRejected(ExchangeError):
    """The venue answered 4xx (not a throttle): our request is wrong; retrying will not help."""

    def __init__(self, message: str, *, status: int, exchange: str = "", symbol: str = "") -> None:
        self.status = status
        super().__init__(message, exchange=exchange, symbol=symbol)


class RateLimited(ExchangeError):
    """The venue told us to slow down (Binance 429, OKX 50011, KuCoin 429000...).

    `retry_after` is in seconds; the caller's rate budget must not send before it passes.
    """

    def __init__(
        self, message: str, *, retry_after: float, exchange: str = "", symbol: str = ""
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, exchange=exchange, symbol=symbol)


class IPBanned(RateLimited):
    """The venue banned this source IP (Binance 418, Bybit 403) until `retry_after` passes."""


class UnknownSymbol(ExchangeError):
    """The venue does not list a configured instrument."""


# --- storage -------------------------------------------------------------------------


class StorageError(CryptoflowError):
    """A write, upload or read against the local tree or S3 failed."""


class StorageUnavailable(StorageError):
    """The backend cannot be reached right now (connection refused, 5xx, slow-down)."""


class StorageRejected(StorageError):
    """The backend refused the request for a reason retries will not fix (no bucket, 403)."""


class UploadVerificationFailed(StorageError):
    """The stored object's size or checksum does not match what we sent."""


class SpoolFull(StorageError):
    """The spool reached its configured size limit; new data is refused, not dropped.
    `nbytes`: what the refused write needed (the writer retries it once that fits)."""

    def __init__(self, message: str, nbytes: int = 0) -> None:
        super().__init__(message)
        self.nbytes = nbytes


class UnsafePartition(StorageError):
    """A partition value (exchange, market, symbol) or key that is not a safe path
    component: refused before any path is built from it, as it could name a place
    outside the spool or the output tree (`storage.layout.check_partition`)."""


class CorruptSpoolFile(StorageError):
    """A spool file is unreadable or truncated; it is quarantined, never uploaded."""


class UnplaceableTime(StorageError, ValueError):
    """An event time the layout cannot partition (`year=YYYY` holds years 0001-9999 only):
    such rows are set aside in the spool's quarantine, never written or uploaded."""


#: failures of the machine, not of the data (a full or failing disk, memory exhausted for
#: a moment): the same work may succeed later, so what it was about is kept for a retry,
#: never quarantined or set aside as if it were bad
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OSError, MemoryError)


# --- data tools ----------------------------------------------------------------------


class DataError(CryptoflowError):
    """Stored data is missing, corrupt or cannot answer the question (inspect/verify/book)."""


class UnreadableTail(DataError):
    """A compressed recording cannot be read past `line_no` (the file was cut short, or
    its data is corrupt from there on); the lines before it were read and are good, so a
    replay keeps them and reports this as one bad record."""

    def __init__(self, message: str, line_no: int) -> None:
        self.line_no = line_no
        super().__init__(message)


@contextlib.contextmanager
def single_error_unwrapped() -> Iterator[None]:
    """A nursery's ExceptionGroup of exactly one Exception comes out as that exception,
    so callers (and the CLI's error mapping) see e.g. a ServerError, not a group.

    A group holding nothing but KeyboardInterrupts (nested or not) comes out as one
    KeyboardInterrupt: Ctrl-C that reached a task inside a nursery is still Ctrl-C (exit
    130), not an 80-line `BaseExceptionGroup` traceback and exit 1."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        _interrupts, rest = group.split(KeyboardInterrupt)
        if rest is None:
            raise KeyboardInterrupt from None
        raise
