"""Build the configured ObjectStore and Spool from settings (no secrets in `describe`)."""

from __future__ import annotations

from pathlib import Path

import trio

from cryptoflow.config_schema import Environment, StorageSection
from cryptoflow.storage.base import ObjectStore
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.s3 import S3Store, make_client, resolve_endpoint
from cryptoflow.storage.spool import Spool


def s3_enabled(storage: StorageSection, env: Environment) -> bool:
    return bool(storage.s3.enabled and env.s3_bucket)


def build_store(
    storage: StorageSection,
    env: Environment,
    output_override: Path | None = None,
    *,
    limiter: trio.CapacityLimiter | None = None,
) -> ObjectStore:
    """S3 when `storage.s3.enabled` and S3_BUCKET is set; else the local tree at
    `output_override` or `storage.local_path`."""
    if s3_enabled(storage, env):
        s3 = storage.s3
        return S3Store(
            make_client(s3, env),
            env.s3_bucket or "",
            prefix=s3.prefix,
            limiter=limiter or trio.CapacityLimiter(max(1, s3.max_concurrency)),
            attempts=s3.upload_retries,
            endpoint_url=resolve_endpoint(s3, env),
        )
    root = output_override if output_override is not None else Path(storage.local_path)
    return LocalStore(root, limiter=limiter)


def build_spool(storage: StorageSection) -> Spool:
    return Spool(Path(storage.spool.path), storage.spool.max_bytes)


def describe(store: ObjectStore) -> str:
    return store.describe()
