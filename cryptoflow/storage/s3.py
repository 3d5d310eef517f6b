"""S3 (or any S3-compatible endpoint) store: verified, idempotent, retried uploads.

- `put_object` with `ContentMD5` (the server rejects a corrupted body), then `head_object`
  checks `ContentLength` and that the ETag equals the MD5 hex (single-part upload; for
  SSE-KMS objects, whose ETag is not the MD5, size + server-side ContentMD5 check suffice).
- botocore errors map to our tree in ONE place (`map_error`): connection errors, timeouts,
  5xx, SlowDown/throttling, ExpiredToken -> StorageUnavailable (retried); NoSuchBucket,
  AccessDenied and other 4xx -> StorageRejected (not retried); BadDigest ->
  UploadVerificationFailed.
- Retries: stamina, capped exponential back-off with jitter, StorageUnavailable only,
  `attempts` configurable. botocore's own retries are disabled. Tests can make waits
  zero with `stamina.set_testing(True)` or pass `wait_initial=0, wait_jitter=0`; under a
  Trio MockClock the waits are virtual anyway. Each failed attempt is logged here with
  the key and the error; stamina's own hooks are turned off (`quiet_stamina`, when an
  S3Store is made): its WARNING `stamina.retry_scheduled` named neither.
- Blocking boto3 calls run in `trio.to_thread.run_sync` behind the CapacityLimiter, and
  are abandoned on cancellation (shutdown deadline) rather than waited for.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import stamina
import trio

from cryptoflow.config_schema import Environment, S3Section
from cryptoflow.errors import (
    StorageError,
    StorageRejected,
    StorageUnavailable,
    UploadVerificationFailed,
)
from cryptoflow.storage.layout import join_key

log = logging.getLogger(__name__)


def quiet_stamina() -> None:
    """No retry hooks: `S3Store.put_file` logs each failed attempt with its details."""
    stamina.instrumentation.set_on_retry_hooks([])


_UNAVAILABLE_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ExpiredToken",
        "ExpiredTokenException",
        "TokenRefreshRequired",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "OperationAborted",
        "500",
        "502",
        "503",
        "504",
    }
)
_VERIFY_CODES = frozenset({"BadDigest", "InvalidDigest", "IncompleteBody"})


def map_error(exc: BaseException, *, what: str = "") -> StorageError:
    """The single translation of boto3/botocore errors into cryptoflow's StorageError tree."""
    where = f"{what}: " if what else ""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        msg = f"{where}S3 {code or status}: {err.get('Message', '')}".rstrip(": ")
        if code in _VERIFY_CODES:
            return UploadVerificationFailed(msg)
        if code in _UNAVAILABLE_CODES or status >= 500 or status == 429:
            return StorageUnavailable(msg)
        return StorageRejected(msg)
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.ParamValidationError
    ):
        return StorageRejected(f"{where}{exc}")
    return StorageUnavailable(f"{where}{type(exc).__name__}: {exc}")


def resolve_endpoint(s3: S3Section, env: Environment) -> str | None:
    return env.s3_endpoint_url or s3.endpoint_url or None


def resolve_region(s3: S3Section, env: Environment) -> str:
    return s3.region or env.aws_region or "us-east-1"


def make_client(
    s3: S3Section,
    env: Environment,
    *,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
) -> Any:
    """A boto3 S3 client from config + environment; botocore retries off (we retry)."""
    endpoint = resolve_endpoint(s3, env)
    session = boto3.session.Session(
        aws_access_key_id=env.aws_access_key_id or None,
        aws_secret_access_key=env.aws_secret_access_key or None,
        region_name=resolve_region(s3, env),
    )
    cfg = botocore.config.Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
        max_pool_connections=max(4, s3.max_concurrency * 2),
        s3={"addressing_style": "path"} if endpoint else None,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=endpoint, config=cfg)


def content_type(key: str) -> str:
    if key.endswith(".jsonl.zst"):
        return "application/zstd"
    return "application/vnd.apache.parquet"


class S3Store:
    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = "",
        limiter: trio.CapacityLimiter | None = None,
        attempts: int = 8,
        wait_initial: float = 0.5,
        wait_max: float = 30.0,
        wait_jitter: float = 1.0,
        timeout: float | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._limiter = limiter or trio.CapacityLimiter(4)
        self.attempts = max(1, attempts)
        quiet_stamina()
        self.wait_initial = wait_initial
        self.wait_max = wait_max
        self.wait_jitter = wait_jitter
        self.timeout = timeout
        self.endpoint_url = endpoint_url

    def describe(self) -> str:
        where = f" via {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{'/' if self.prefix else ''}{where}"

    def full_key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _put_blocking(self, key: str, path: Path) -> None:
        full = self.full_key(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageRejected(f"{path}: source file missing") from exc
        digest = hashlib.md5(data, usedforsecurity=False)
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ContentMD5=base64.b64encode(digest.digest()).decode(),
                ContentLength=len(data),
                ContentType=content_type(key),
            )
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            raise map_error(exc, what=f"s3://{self.bucket}/{full}") from exc
        size = int(head.get("ContentLength", -1))
        if size != len(data):
            raise UploadVerificationFailed(
                f"s3://{self.bucket}/{full}: stored size {size} != sent {len(data)}"
            )
        etag = str(head.get("ETag", "")).strip('"')
        if etag != digest.hexdigest() and head.get("ServerSideEncryption") != "aws:kms":
            raise UploadVerificationFailed(
                f"s3://{self.bucket}/{full}: ETag {etag} != MD5 {digest.hexdigest()}"
            )

    async def put_file(self, key: str, path: Path) -> None:
        async for attempt in stamina.retry_context(
            on=StorageUnavailable,
            attempts=self.attempts,
            timeout=self.timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_jitter=self.wait_jitter,
        ):
            with attempt:
                # abandon_on_cancel: a shutdown deadline must not wait for a hung socket
                # (up to read_timeout). An abandoned put is harmless: the spool file stays,
                # and the next attempt overwrites the same content-named key.
                try:
                    await trio.to_thread.run_sync(
                        self._put_blocking,
                        key,
                        Path(path),
                        limiter=self._limiter,
                        abandon_on_cancel=True,
                    )
                except StorageUnavailable as exc:
                    # each failed attempt, with what and why (stamina's own retry log
                    # line names neither: its hooks are off, see module docstring)
                    log.warning(
                        "s3 upload of %s: attempt %d of %d failed (%s)",
                        key,
                        attempt.num,
                        self.attempts,
                        exc,
                    )
                    raise
