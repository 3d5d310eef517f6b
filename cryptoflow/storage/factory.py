"""Build the configured ObjectStore and Spool from settings (no secrets in `describe`)."""

from __future__ import annotations

from pathlib import Path

import attrs
import trio

from cryptoflow.config_schema import Environment, StorageSection
from cryptoflow.errors import ConfigError, UsageError
from cryptoflow.storage.base import ObjectStore
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.s3 import S3Store, make_client, resolve_endpoint
from cryptoflow.storage.spool import Spool, check_spool_dir


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


def local_root(
    storage: StorageSection, env: Environment, output_override: Path | None = None
) -> Path | None:
    """The local tree `build_store` moves files into; None when they go to S3."""
    if s3_enabled(storage, env):
        return None
    return output_override if output_override is not None else Path(storage.local_path)


def _overlap(spool: Path, output: Path) -> str | None:
    """ "same", "spool inside" or "output inside" (resolved: `.`, `..` and symlinks do
    not hide it), or None when neither folder holds the other."""
    spool, output = spool.resolve(), output.resolve()
    if spool == output:
        return "same"
    if output in spool.parents:
        return "spool inside"
    if spool in output.parents:
        return "output inside"
    return None


_AS_OUTPUT = {"same": "is the spool folder", "spool inside": "contains the spool"}
_AS_SPOOL = {"same": "is the same folder as", "spool inside": "is inside"}


def check_spool_apart(
    storage: StorageSection,
    env: Environment,
    output_override: Path | None = None,
    config_path: str | Path = "",
) -> None:
    """Refuse a spool and a local output tree that overlap (exit 2).

    Uploaded files land in the output tree with the spool's own layout: output = spool
    made every upload a file the spool deleted as uploaded (the run reported the rows
    uploaded, none were left); a spool holding the output took the uploaded files for
    waiting ones at each start and moved them one level deeper; an output holding the
    spool mixes in-flight files into the data. Raises UsageError for `--output`,
    ConfigError naming the key's file:line for the configured paths.
    """
    from cryptoflow.config import key_location

    output = local_root(storage, env, output_override)
    if output is None:
        return
    spool = Path(storage.spool.path)
    relation = _overlap(spool, output)
    if relation is None:
        return
    where = key_location(config_path, "storage.spool.path") if config_path else ""
    if output_override is not None:
        raise UsageError(
            f"--output {str(output)!r}: {_AS_OUTPUT.get(relation, 'is inside the spool')} "
            f"({where or 'storage.spool.path'} {storage.spool.path!r}); expected an output folder "
            "apart from the spool"
        )
    problem = (
        f"{storage.spool.path!r} {_AS_SPOOL.get(relation, 'contains')} storage.local_path "
        f"{storage.local_path!r}; expected two folders apart (uploaded files would be taken for "
        "spool files, or spool files for data)"
    )
    raise ConfigError([f"{where}: {problem}" if where else f"storage.spool.path: {problem}"])


def check_output_writable(
    storage: StorageSection,
    env: Environment,
    output_override: Path | None = None,
    config_path: str | Path = "",
    *,
    create: bool = True,
) -> None:
    """A local output tree must be creatable and writable before anything is collected
    or flushed: else every upload fails (one error per file) and the rows wait in the
    spool while the run looks fine. Raises UsageError for `--output`, ConfigError naming
    storage.local_path's file:line (exit 2 both). Nothing to check when files go to S3.
    `create=False` (validate-config): the same verdict, nothing created."""
    from cryptoflow.config import key_location

    root = local_root(storage, env, output_override)
    if root is None:
        return
    problem = LocalStore(root).check_writable(create=create)
    if problem is None:
        return
    if output_override is not None:
        raise UsageError(f"--output {str(output_override)!r}: {problem}")
    where = key_location(config_path, "storage.local_path") if config_path else "storage.local_path"
    raise ConfigError([f"{where}: {problem}"])


def build_spool(storage: StorageSection, *, create: bool = True) -> Spool:
    return Spool(Path(storage.spool.path), storage.spool.max_bytes, create=create)


def simulated_storage(
    storage: StorageSection,
    env: Environment,
    output: Path | None,
    config_path: str | Path = "",
) -> StorageSection:
    """The storage of a `collect --simulate` run: the local tree at `--output` (required)
    with a spool of its own, `<output>.spool` beside it; S3 off.

    Made-up books must never reach the configured store: with S3 enabled, `--simulate`
    used to upload them to the bucket (and ignore `--output`), mixed in with real data and
    not marked. The configured spool is left alone too, both ways: a real run's files
    waiting there were moved into the simulated output, and simulated files left there
    (a stop past `shutdown_timeout`, a kill) were uploaded by the next real run. The
    simulated spool belongs to its output, so what one run leaves goes there on the next.
    Raises UsageError (exit 2) naming `--output` for every place that cannot be used.
    """
    if output is None:
        raise UsageError(
            "--simulate needs --output DIR: simulated books are stored only there, never in "
            "S3, storage.local_path or storage.spool.path"
        )
    as_local = attrs.evolve(storage, s3=attrs.evolve(storage.s3, enabled=False))
    check_spool_apart(as_local, env, output, config_path)  # not in or around the real spool
    spool = simulated_spool_path(output)
    if _overlap(Path(storage.spool.path), spool) is not None:
        raise UsageError(
            f"--output {str(output)!r}: its spool {str(spool)!r} (--simulate) overlaps "
            f"storage.spool.path {storage.spool.path!r}; expected a folder apart from it"
        )
    problem = LocalStore(output).check_writable()
    if problem is not None:
        raise UsageError(f"--output {str(output)!r}: {problem}")
    errors, _warnings = check_spool_dir(spool, storage.spool.max_bytes)  # warned at start
    if errors:
        prefix = f"storage.spool.path {str(spool)!r}: "
        raise UsageError(
            f"--output {str(output)!r}: its spool {str(spool)!r} (--simulate) cannot be "
            f"used: {errors[0].removeprefix(prefix)}"
        )
    return attrs.evolve(
        as_local, local_path=str(output), spool=attrs.evolve(storage.spool, path=str(spool))
    )


def simulated_spool_path(output: Path) -> Path:
    """`<output>.spool`, beside the output folder (`./data` -> `./data.spool`): apart from
    it, as every spool must be (`check_spool_apart`)."""
    if output.name in ("", ".", ".."):  # `.`, `..`, `/`: name the folder itself
        output = output.resolve()
    if not output.name:
        raise UsageError(f"--output {str(output)!r}: expected a folder below the root")
    return output.with_name(output.name + ".spool")


def describe(store: ObjectStore) -> str:
    return store.describe()
