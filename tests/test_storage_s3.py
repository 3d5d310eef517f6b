from __future__ import annotations

import hashlib
import socket

import pytest
import stamina

from cryptoflow.config_schema import Environment, S3Section, StorageSection
from cryptoflow.errors import StorageRejected, StorageUnavailable
from cryptoflow.storage.factory import build_store
from cryptoflow.storage.local import LocalStore
from cryptoflow.storage.s3 import S3Store, make_client

KEY = (
    "snapshots/exchange=binance/market=futures/symbol=BTCUSDT/"
    "year=2025/month=03/day=04/hour=10/BTCUSDT-1-2-3-4.parquet"
)


def store_for(bucket, **kw) -> S3Store:
    s3 = S3Section(enabled=True, prefix="pre", endpoint_url=bucket.endpoint_url)
    return S3Store(make_client(s3, bucket.env), bucket.name, prefix="pre", **kw)


async def test_put_verifies_and_is_idempotent(s3_bucket, tmp_path):
    src = tmp_path / "f.parquet"
    src.write_bytes(b"PAR1" + b"x" * 1000 + b"PAR1")
    store = store_for(s3_bucket)
    await store.put_file(KEY, src)
    await store.put_file(KEY, src)  # a retried upload overwrites the same key
    assert s3_bucket.keys() == [f"pre/{KEY}"]
    obj = s3_bucket.client().get_object(Bucket=s3_bucket.name, Key=f"pre/{KEY}")
    body = obj["Body"].read()
    assert hashlib.md5(body).hexdigest() == hashlib.md5(src.read_bytes()).hexdigest()
    assert src.exists()  # S3 store leaves the spool copy for the caller to remove
    assert "testing" not in store.describe()


async def test_missing_bucket_is_rejected_without_retries(s3_server, s3_bucket, tmp_path):
    src = tmp_path / "f.parquet"
    src.write_bytes(b"data")
    store = store_for(s3_bucket, attempts=5)
    store.bucket = "no-such-bucket-here"
    with pytest.raises(StorageRejected, match="NoSuchBucket"):
        await store.put_file(KEY, src)


async def test_connection_refused_is_unavailable_after_bounded_retries(tmp_path, caplog):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    env = Environment(
        aws_access_key_id="a", aws_secret_access_key="b", aws_region="us-east-1", s3_bucket="bkt"
    )
    s3 = S3Section(enabled=True, endpoint_url=f"http://127.0.0.1:{port}")
    calls = []
    store = S3Store(make_client(s3, env, connect_timeout=1), "bkt", attempts=3)
    orig = store._put_blocking

    def counting(*a):
        calls.append(1)
        return orig(*a)

    store._put_blocking = counting
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with stamina.set_testing(True, attempts=3), pytest.raises(StorageUnavailable):
        await store.put_file(KEY, src)  # set_testing: no real sleeping
    assert len(calls) == 3
    # every failed attempt says which object and why (stamina's own line said neither)
    tries = [r.getMessage() for r in caplog.records if r.name == "cryptoflow.storage.s3"]
    assert len(tries) == 3 and all(f"s3 upload of {KEY}: attempt" in t for t in tries)
    assert "attempt 1 of 3 failed (" in tries[0]
    assert not [r for r in caplog.records if r.name == "stamina"]


async def test_factory_picks_backend(s3_bucket, tmp_path):
    storage = StorageSection(local_path=str(tmp_path / "data"))
    local = build_store(storage, Environment(), None)
    assert isinstance(local, LocalStore) and local.root == tmp_path / "data"
    assert isinstance(build_store(storage, Environment(), tmp_path / "o"), LocalStore)
    s3 = StorageSection(s3=S3Section(enabled=True, prefix="p"))
    store = build_store(s3, s3_bucket.env, None)
    assert isinstance(store, S3Store)
    assert store.describe().startswith(f"s3://{s3_bucket.name}/p/")
    assert "testing" not in store.describe()
    assert isinstance(build_store(s3, Environment(), None), LocalStore)  # no bucket


async def test_local_store_moves_atomically(tmp_path):
    src = tmp_path / "spool" / "a.parquet"
    src.parent.mkdir()
    src.write_bytes(b"abc")
    store = LocalStore(tmp_path / "out")
    await store.put_file(KEY, src)
    assert (tmp_path / "out" / KEY).read_bytes() == b"abc"
    assert not src.exists()
