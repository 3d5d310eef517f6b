"""Shared fixtures: a real S3 API (moto server mode on 127.0.0.1).

- `s3_server` (session): starts `ThreadedMotoServer` on a free port, yields its endpoint
  URL (`http://127.0.0.1:<port>`). No environment variable is set.
- `clock` (function): a MockClock for the writer's timing tests that never jumps while a
  worker thread runs (`threadclock.py`); pytest-trio runs a test on it when asked for.
- `s3_bucket` (function): a fresh, uniquely named bucket on that server; yields an
  `S3Bucket` with the name, endpoint, fake credentials as an `Environment`, and
  `client()` to build a boto3 client with those credentials passed explicitly.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from cryptoflow.config_schema import Environment

TEST_REGION = "us-east-1"
TEST_KEY_ID = "testing"
TEST_SECRET = "testing"


@attrs.frozen
class S3Bucket:
    name: str
    endpoint_url: str
    region: str = TEST_REGION

    @property
    def env(self) -> Environment:
        """An Environment pointing at this bucket on the test server."""
        return Environment(
            aws_access_key_id=TEST_KEY_ID,
            aws_secret_access_key=TEST_SECRET,
            aws_region=self.region,
            s3_bucket=self.name,
            s3_endpoint_url=self.endpoint_url,
        )

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=TEST_KEY_ID,
            aws_secret_access_key=TEST_SECRET,
        )

    def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.name, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[S3Bucket]:
    bucket = S3Bucket(name=f"test-{uuid.uuid4().hex[:16]}", endpoint_url=s3_server)
    client = bucket.client()
    client.create_bucket(Bucket=bucket.name)
    yield bucket
    try:  # best effort: keep the shared server small
        for key in bucket.keys():  # noqa: SIM118 (a method, not a dict)
            client.delete_object(Bucket=bucket.name, Key=key)
        client.delete_bucket(Bucket=bucket.name)
    except Exception:
        pass


# --- a stand-in for normalize.frame_from_columns (writer/spool tests) -----------------

_NS_COLUMNS = {"receive_time", "detected_at"}


def tiny_frame_from_columns(dataset, exchange, market, symbol, columns, multiplier="1"):
    """RowBatch columns -> a frame with exactly models.SCHEMAS[dataset] (test builder)."""
    import polars as pl

    from cryptoflow.models import SCHEMAS

    schema = SCHEMAS[dataset]
    n = len(next(iter(columns.values()))) if columns else 0
    data = {"exchange": [exchange] * n, "market": [market] * n, "symbol": [symbol] * n}
    exprs = []
    for name, dtype in schema.items():
        if name in data:
            continue
        values = columns.get(name, [None] * n)
        if isinstance(dtype, pl.Datetime):
            unit = "ns" if name in _NS_COLUMNS else "ms"
            data[name] = pl.Series(name, values, dtype=pl.Int64)
            exprs.append(pl.from_epoch(name, time_unit=unit).cast(dtype).alias(name))
        elif dtype == pl.Float64:
            data[name] = pl.Series(
                name,
                values,
                dtype=pl.String
                if values and isinstance(next((v for v in values if v is not None), None), str)
                else None,
            )
            exprs.append(pl.col(name).cast(pl.Float64))
        else:
            data[name] = pl.Series(name, values)
            exprs.append(pl.col(name).cast(dtype))
    frame = pl.DataFrame(data).with_columns(exprs)
    if "quantity" in schema and "quantity" not in columns and "raw_quantity" in columns:
        frame = frame.with_columns((pl.col("raw_quantity") * float(multiplier)).alias("quantity"))
    return frame.select(list(schema.keys()))


@pytest.fixture
def frame_builder():
    return tiny_frame_from_columns


@pytest.fixture
def clock(monkeypatch):
    """Virtual time that jumps after 20 ms of real idleness, never during a worker thread
    (flushes and uploads run in threads: see tests/threadclock.py)."""
    import threadclock

    return threadclock.install(monkeypatch)
