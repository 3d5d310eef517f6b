"""`s3://bucket/prefix` roots for the data tools (inspect, verify, book).

Design: list, select, download what is read, then run the local code.

- Listing pushes the filters into the key prefix: `<prefix>/<dataset>/exchange=<ex>/`,
  and when a symbol is given but no market, the markets are enumerated with one
  delimiter listing so the listing prefix still names `market=<m>/symbol=<SYM>/`. Time
  filters are applied on the hour parsed from each key (`storage.layout.parse_key`)
  before anything is downloaded. A month of one symbol is ~720 hourly partitions (a few
  thousand keys, a handful of list pages).
- Objects are downloaded *lazily*, only when a tool actually reads a file
  (`datasets.collect_per_file` / `check_footers` call `materialize`), into a temporary
  cache folder that mirrors the key layout and is removed when the command ends. So
  `book` only fetches the hours it opens (the snapshot hour, the deltas between it and
  --at), while `inspect`/`verify` fetch what their filters select.
- Why not `pl.scan_parquet("s3://...")`? Downloading keeps one code path for local and
  S3 data: the per-file isolation of corrupt files, footer checks and the exact same
  results, with credentials/endpoint handled by the same boto3 construction as the
  uploader (`storage.s3.make_client`), which works with moto and any S3-compatible
  endpoint (polars' object_store needs its own settings for plain-http endpoints).
- Credentials, region and endpoint come from the environment (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_REGION, S3_ENDPOINT_URL, or `.env`); they never appear in
  a message. Errors become one line naming the bucket/prefix: no such bucket, access
  denied, missing credentials, endpoint unreachable (DataError, UsageError for a
  malformed URI or missing credentials).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from cryptoflow.errors import DataError, UsageError
from cryptoflow.storage.layout import join_key, parse_key

if TYPE_CHECKING:
    from cryptoflow.tools.datasets import FileInfo

#: Parallel downloads (boto3 clients are thread-safe).
DOWNLOAD_THREADS = 8


def is_s3(path: str | Path) -> bool:
    return str(path).startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix")."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UsageError(f"{uri}: expected s3://bucket or s3://bucket/prefix")
    return bucket, prefix.strip("/")


class S3Root:
    """A dataset root on S3 plus the local cache its files are downloaded into.

    Use as a context manager (the cache is deleted on exit). `str()` is the URI.
    """

    def __init__(self, uri: str, client: Any | None = None, *, endpoint: str | None = None):
        self.bucket, self.prefix = split_uri(uri)
        self.uri = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.endpoint = endpoint
        self._client = client
        self._tmp: str | None = None

    # --- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> S3Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"S3Root({self.uri!r})"

    @property
    def cache(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="cryptoflow-s3-")
        return Path(self._tmp)

    @property
    def client(self) -> Any:
        if self._client is None:
            from cryptoflow.config import load_environment
            from cryptoflow.config_schema import S3Section
            from cryptoflow.storage.s3 import make_client, resolve_endpoint

            env = load_environment()
            self.endpoint = resolve_endpoint(S3Section(), env)
            self._client = make_client(
                S3Section(max_concurrency=DOWNLOAD_THREADS), env, read_timeout=60.0
            )
        return self._client

    # --- errors -----------------------------------------------------------------------

    def error(self, exc: BaseException, what: str = "") -> Exception:
        """One clear line for a boto3/botocore failure (never a secret in it)."""
        where = what or self.uri
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {}) or {}
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code == "NoSuchBucket":
                return DataError(f"{where}: no such bucket {self.bucket!r}")
            if code in ("AccessDenied", "403", "AllAccessDisabled") or status == 403:
                return DataError(f"{where}: access denied (check the AWS credentials)")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return DataError(f"{where}: credentials rejected by S3 ({code})")
            return DataError(f"{where}: S3 {code or status}: {err.get('Message', '')}".rstrip(": "))
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return UsageError(
                f"{where}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            )
        if isinstance(
            exc,
            botocore.exceptions.EndpointConnectionError
            | botocore.exceptions.ConnectTimeoutError
            | botocore.exceptions.ReadTimeoutError
            | botocore.exceptions.ConnectionClosedError,
        ):
            via = f" {self.endpoint}" if self.endpoint else ""
            return DataError(f"{where}: cannot reach the S3 endpoint{via} ({type(exc).__name__})")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return DataError(f"{where}: {type(exc).__name__}: {exc}")
        return DataError(f"{where}: {type(exc).__name__}: {exc}")

    # --- listing ----------------------------------------------------------------------

    def _list(self, prefix: str, *, delimiter: bool = False) -> list[str]:
        """Keys (or, with `delimiter`, the next-level common prefixes) under `prefix`."""
        out: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                if delimiter:
                    out.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
                else:
                    out.extend(o["Key"] for o in page.get("Contents", []))
        except Exception as exc:
            raise self.error(exc) from None
        return out

    def _prefixes(self, dataset: str, exchange: str | None, market: str | None,
                  symbol: str | None) -> list[str]:  # fmt: skip
        """Listing prefixes naming as many partition keys as the filters allow."""
        base = join_key(self.prefix, dataset) + "/"
        prefixes = [base]
        levels = [("exchange", exchange), ("market", market), ("symbol", symbol)]
        for i, (name, value) in enumerate(levels):
            if value is not None:
                prefixes = [f"{p}{name}={value}/" for p in prefixes]
            elif any(v is not None for _, v in levels[i + 1 :]):
                prefixes = [q for p in prefixes for q in self._list(p, delimiter=True)]
            else:
                break
        return prefixes

    def list_files(
        self,
        dataset: str,
        *,
        exchange: str | None,
        market: str | None,
        symbol: str | None,
        lo: datetime | None,
        hi: datetime | None,
    ) -> list[FileInfo]:
        """FileInfos (local cache paths, not yet downloaded) for matching objects."""
        from cryptoflow.tools.datasets import FileInfo

        out: list[FileInfo] = []
        for prefix in self._prefixes(dataset, exchange, market, symbol):
            for key in self._list(prefix):
                try:
                    kp = parse_key(key)
                except ValueError:
                    continue
                if kp.dataset != dataset or not kp.filename.endswith(".parquet"):
                    continue
                if kp.filename.startswith(".") or kp.prefix != self.prefix:
                    continue
                if (lo is not None and kp.hour < lo) or (hi is not None and kp.hour > hi):
                    continue
                if (exchange and kp.exchange != exchange) or (symbol and kp.symbol != symbol):
                    continue
                if market and kp.market != market:
                    continue
                out.append(
                    FileInfo(
                        self.cache / kp.relative_key, dataset, kp.exchange, kp.market,
                        kp.symbol, kp.hour, uri=f"s3://{self.bucket}/{key}", remote=self,
                    )
                )  # fmt: skip
        return out

    # --- downloading ------------------------------------------------------------------

    def _key(self, f: FileInfo) -> str:
        assert f.uri is not None
        return f.uri[len(f"s3://{self.bucket}/") :]

    def _download(self, f: FileInfo) -> str | None:
        """Fetch one object into its cache path; a reason string if it vanished."""
        if f.path.exists():
            return None
        f.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.path.with_name(f".{f.path.name}.part")
        try:
            self.client.download_file(self.bucket, self._key(f), str(tmp))
        except botocore.exceptions.ClientError as exc:
            code = str((exc.response.get("Error", {}) or {}).get("Code", ""))
            if code in ("NoSuchKey", "404"):
                return "object vanished between listing and download"
            raise self.error(exc, f.uri or "") from None
        except Exception as exc:
            raise self.error(exc, f.uri or "") from None
        tmp.replace(f.path)
        return None

    def materialize(self, files: Sequence[FileInfo], label: str) -> dict[Path, str]:
        """Download every not-yet-cached file of `files`; {path: reason} for vanished ones."""
        from cryptoflow.tools.datasets import progress

        todo = [f for f in files if not f.path.exists()]
        if not todo:
            return {}
        missing: dict[Path, str] = {}
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            futures = [pool.submit(self._download, f) for f in todo]
            pairs = list(zip(todo, futures, strict=True))
            try:
                for f, fut in progress(pairs, f"{label} (download)"):
                    reason = fut.result()
                    if reason is not None:
                        missing[f.path] = reason
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
        return missing
