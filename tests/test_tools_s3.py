"""inspect / verify / book on `s3://bucket/prefix` (moto on 127.0.0.1): same answers as
on the local tree they were uploaded from, selective downloads, one-line errors."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import polars as pl
import pytest
from datagen import generate
from rich.console import Console
from typer.testing import CliRunner

from cryptoflow.cli import app
from cryptoflow.errors import DataError, UsageError
from cryptoflow.models import Dataset
from cryptoflow.tools import book, compact, inspect, remote, verify
from cryptoflow.tools.datasets import list_files, open_root

PREFIX = "archive/v1"


def _upload(bucket, local: Path, prefix: str = PREFIX) -> int:  # type: ignore[no-untyped-def]
    """Put every file of a local tree under `prefix` in the bucket, as the uploader would."""
    client = bucket.client()
    n = 0
    for p in sorted(local.rglob("*.parquet")):
        rel = p.relative_to(local).as_posix()
        client.upload_file(str(p), bucket.name, f"{prefix}/{rel}" if prefix else rel)
        n += 1
    return n


def _keys(bucket, prefix: str = PREFIX) -> set[str]:  # type: ignore[no-untyped-def]
    return {f"s3://{bucket.name}/{k}" for k in bucket.keys(prefix)}


@pytest.fixture
def s3env(s3_bucket, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """The moto bucket's credentials/endpoint in the environment (this test only), a
    private temp dir (to see the download cache go away) and a cwd without a .env."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": s3_bucket.region,
        "S3_ENDPOINT_URL": s3_bucket.endpoint_url,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return s3_bucket


@pytest.fixture
def uploaded(s3env, tmp_path):  # type: ignore[no-untyped-def]
    """Two symbols, a recorded gap, a missing hour; uploaded under PREFIX."""
    local = tmp_path / "local"
    g = generate(local, start="2026-01-02T00:30:00Z", minutes=60, gap_at_s=300, gap_messages=200)
    generate(local, start="2026-01-02T03:10:00Z", minutes=5, seed=3)
    generate(local, start="2026-01-02T00:40:00Z", minutes=10, symbol="ETHUSDT", seed=5)
    n = _upload(s3env, local)
    assert n > 20
    return local, f"s3://{s3env.name}/{PREFIX}", g


def _console() -> Console:
    return Console(width=250)


def _out(capsys, path: str) -> str:  # type: ignore[no-untyped-def]
    """Captured output with the root replaced, lines stripped (titles are centered)."""
    out = capsys.readouterr().out.replace(path, "<ROOT>")
    return "\n".join(line.strip() for line in out.splitlines())


def _cache_dirs(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "tmp").glob("cryptoflow-s3-*"))


# --- same results as local -----------------------------------------------------------


def test_listing_matches_local(uploaded) -> None:  # type: ignore[no-untyped-def]
    local, uri, _ = uploaded
    for kw in (
        {},
        dict(symbol="ethusdt"),
        dict(exchange="BINANCE", symbol="BTCUSDT"),
        dict(exchange="binance", market="futures", start_ms=1767315600000),  # from 01:00
        dict(symbol="BTCUSDT", start_ms=1767313800000, end_ms=1767315599999),
    ):
        with open_root(uri) as root:
            for ds in Dataset.SNAPSHOTS, Dataset.DELTAS, Dataset.GAPS:
                got = [(f.stream, f.hour, f.name) for f in list_files(root, ds, **kw)]
                want = [(f.stream, f.hour, f.name) for f in list_files(local, ds, **kw)]
                assert got == want, (ds, kw)
                assert all(f.uri and f.uri.startswith(uri + "/") for f in list_files(root, ds))


def test_inspect_same_as_local(uploaded, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local, uri, _ = uploaded
    assert inspect.run(str(local), console=_console()) == 0
    want = _out(capsys, str(local))
    assert inspect.run(uri, console=_console()) == 0
    got = _out(capsys, uri)
    assert got == want
    assert "1 h (no files)" in got and "ETHUSDT" in got
    assert not _cache_dirs(tmp_path)  # the download cache is gone
    # filters
    kw = dict(symbol="BTCUSDT", start="2026-01-02T00:31:00Z", end="2026-01-02T00:50:00Z")
    assert inspect.run(str(local), console=_console(), **kw) == 0
    want = _out(capsys, str(local))
    assert inspect.run(uri, console=_console(), **kw) == 0
    assert _out(capsys, uri) == want


def test_verify_same_as_local(uploaded, capsys) -> None:  # type: ignore[no-untyped-def]
    local, uri, _ = uploaded
    # the second BTCUSDT run restarts the update ids: plenty of problems, all the same
    code = verify.run(str(local), console=_console())
    want = _out(capsys, str(local))
    assert verify.run(uri, console=_console()) == code == 1
    got = _out(capsys, uri)
    assert got == want
    assert "known gap" in got and "conflicting message" in got
    assert verify.run(uri, exchange="binance", symbol="ETHUSDT") == 0
    assert "OK" in capsys.readouterr().out


def test_book_same_as_local_and_selective(uploaded, s3env, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    local, uri, g = uploaded
    fetched: list[str] = []
    real = remote.S3Root._download

    def counting(self, f):  # type: ignore[no-untyped-def]
        fetched.append(f.uri)
        return real(self, f)

    monkeypatch.setattr(remote.S3Root, "_download", counting)
    ts, _ = g.snapshots[-10]
    at = ts + 3_300
    want, wfacts = book.rebuild(local, "binance", "BTCUSDT", at)
    with open_root(uri) as root:
        got, gfacts = book.rebuild(root, "binance", "BTCUSDT", at)
    assert gfacts == wfacts and gfacts["messages"] > 0
    assert got.equals(want)
    keys = _keys(s3env)
    assert fetched and len(fetched) < len(keys) / 2, (len(fetched), len(keys))  # selective
    for u in fetched:  # only AT's hour (files starting after AT skipped) and the gaps
        assert u in keys and "symbol=BTCUSDT" in u
        if "/gaps/" not in u:
            assert "/hour=01/" in u and int(u.rsplit("-", 2)[1]) <= at, u
    # through run(): printed table and a Parquet output
    out = tmp_path / "book.parquet"
    assert book.run(uri, "binance", "btcusdt", str(at), depth=3, output=out) == 0
    assert pl.read_parquet(out).select("side", "price", "quantity").rows() == (
        want.filter(pl.col("level") < 3).sort("side", "level", descending=[True, False])
        .select("side", "price", "quantity").rows()
    )  # fmt: skip
    with pytest.raises(DataError, match="gap"):  # inside the gap (at its end, a snapshot
        book.run(uri, "binance", "BTCUSDT", str((g.gap[2] + g.gap[3]) // 2))  # heals it)
    with pytest.raises(DataError, match="no snapshots"):
        book.run(uri, "binance", "BTCUSDT", "2026-01-01T00:00:00Z")


# --- CLI -----------------------------------------------------------------------------


def test_cli_on_s3(uploaded, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, uri, g = uploaded
    runner = CliRunner(env={"COLUMNS": "250"})
    res = runner.invoke(app, ["inspect", uri, "--symbol", "ETHUSDT"])
    assert res.exit_code == 0, res.output
    assert "ETHUSDT" in res.output and "BTCUSDT" not in res.output.replace(uri, "")
    res = runner.invoke(app, ["verify", uri, "--symbol", "ETHUSDT"])
    assert res.exit_code == 0, res.output
    assert "OK" in res.output
    res = runner.invoke(app, ["verify", uri])  # restarted ids of the 2nd BTCUSDT run
    assert res.exit_code == 1 and "conflicting message" in res.output
    ts, _ = g.snapshots[5]
    res = runner.invoke(
        app, ["book", uri, "-e", "binance", "-s", "BTCUSDT", "--at", str(ts + 1234), "--depth", "2"]
    )
    assert res.exit_code == 0, res.output
    assert "snapshot" in res.output
    res = runner.invoke(app, ["compact", uri])
    assert res.exit_code == 2
    assert "local folders only" in res.output
    assert not _cache_dirs(tmp_path)
    assert "testing" not in res.output


def test_help_mentions_s3() -> None:
    runner = CliRunner(env={"COLUMNS": "250"})
    for cmd in ("inspect", "verify", "book"):
        out = runner.invoke(app, [cmd, "--help"]).output
        assert "s3://" in out
    assert "local" in runner.invoke(app, ["compact", "--help"]).output


# --- errors --------------------------------------------------------------------------


def test_missing_bucket(s3env) -> None:  # type: ignore[no-untyped-def]
    uri = "s3://no-such-bucket-cryptoflow/x"
    for call in (
        lambda: inspect.run(uri),
        lambda: verify.run(uri),
        lambda: book.run(uri, "binance", "BTCUSDT", "2026-01-02T00:00:00Z"),
    ):
        with pytest.raises(DataError, match="no such bucket 'no-such-bucket-cryptoflow'"):
            call()
    res = CliRunner().invoke(app, ["verify", uri])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "error: s3://no-such-bucket-cryptoflow/x: no such bucket 'no-such-bucket-cryptoflow'"
    ]


def test_empty_prefix(uploaded) -> None:  # type: ignore[no-untyped-def]
    _, uri, _ = uploaded
    bucket = remote.split_uri(uri)[0]
    with pytest.raises(DataError, match=f"s3://{bucket}/nothing/here: no data found"):
        inspect.run(f"s3://{bucket}/nothing/here")
    with pytest.raises(DataError, match="no snapshots or deltas"):
        verify.run(f"s3://{bucket}/archive")  # a parent of the data, not the root
    with pytest.raises(DataError, match="no data found"):
        inspect.run(uri, symbol="SOLUSDT")
    with pytest.raises(UsageError):
        inspect.run("s3:///prefix")


def test_data_at_bucket_root(s3env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    generate(tmp_path / "l", minutes=3)
    _upload(s3env, tmp_path / "l", prefix="")
    assert verify.run(f"s3://{s3env.name}") == 0
    assert verify.run(f"s3://{s3env.name}/") == 0


def test_corrupt_object(uploaded, s3env, capsys) -> None:  # type: ignore[no-untyped-def]
    _, uri, g = uploaded
    part = "exchange=binance/market=futures/symbol=BTCUSDT/year=2026/month=01/day=02/hour=00"
    key = f"{PREFIX}/snapshots/{part}/BTCUSDT-9-9-9-9.parquet"
    s3env.client().put_object(Bucket=s3env.name, Key=key, Body=b"PAR1 junk")
    assert inspect.run(uri, console=Console(width=500)) == 1
    out = capsys.readouterr().out
    assert "unreadable" in out and f"s3://{s3env.name}/{key}" in out
    assert verify.run(uri, console=Console(width=500)) == 1
    out = capsys.readouterr().out
    assert "unreadable file" in out and f"s3://{s3env.name}/{key}" in out
    with pytest.raises(DataError, match=r"unreadable snapshot file\(s\): s3://.*BTCUSDT-9-9-9-9"):
        book.run(uri, "binance", "BTCUSDT", str(g.snapshots[3][0] + 1000))


def test_unreachable_endpoint(s3env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        inspect.run(f"s3://{s3env.name}/x")


def test_compact_refuses_s3(s3env) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UsageError, match="local folders only"):
        compact.run(f"s3://{s3env.name}/x")


def test_error_lines_name_the_root() -> None:
    import botocore.exceptions

    root = remote.S3Root("s3://bkt/some/prefix/", client=object(), endpoint="http://127.0.0.1:1")
    assert str(root) == "s3://bkt/some/prefix"

    def client_error(code: str, status: int) -> Exception:
        return botocore.exceptions.ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "ListObjectsV2",
        )

    err = root.error(client_error("AccessDenied", 403))
    assert (
        isinstance(err, DataError)
        and str(err) == "s3://bkt/some/prefix: access denied (check the AWS credentials)"
    )
    assert "no such bucket 'bkt'" in str(root.error(client_error("NoSuchBucket", 404)))
    err = root.error(botocore.exceptions.NoCredentialsError())
    assert isinstance(err, UsageError) and "AWS_ACCESS_KEY_ID" in str(err)
    err = root.error(botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert str(err) == (
        "s3://bkt/some/prefix: cannot reach the S3 endpoint http://127.0.0.1:1 "
        "(EndpointConnectionError)"
    )
