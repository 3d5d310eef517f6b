"""REST budget per shard: the shipped config fits; 33 Binance symbols at 10 s do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from configtools import make_config
from typer.testing import CliRunner

from cryptoflow.cli import app
from cryptoflow.config import load_settings
from cryptoflow.exchanges.limits import snapshot_cost
from cryptoflow.tools.shards import budget

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "config.yml"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner(env={"TYPER_USE_RICH": "0", "COLUMNS": "140"})


def test_snapshot_costs() -> None:
    assert snapshot_cost("binance", 1000) == (20, 2400)
    assert snapshot_cost("binance", 500) == (10, 2400)
    assert snapshot_cost("binance", 100) == (5, 2400)
    assert snapshot_cost("binance", 50) == (2, 2400)
    assert snapshot_cost("bybit", 500) == (1, 7200)
    assert snapshot_cost("okx", 400) == (1, 1200)
    assert snapshot_cost("okx", 1000) == (1, 300)
    assert snapshot_cost("kucoin", 1000)[1] == 4000


def test_shipped_budget_numbers(tmp_path: Path) -> None:
    (tmp_path / ".env").touch()
    settings = load_settings(SHIPPED, env={}, env_file=tmp_path / ".env")
    rows = {r.exchange: r for r in budget(settings)}
    b = rows["binance"]
    # 33 symbols x (60/25 polls + 0.1 resync) x weight 20
    assert (b.symbol_count, b.requests_per_minute, b.weight_per_minute) == (33, 82.5, 1650)
    assert (b.limit_per_minute, b.status, b.source_ip) == (2400, "OK", "default")
    y = rows["bybit"]  # resync is a resubscribe on Bybit: no REST allowance
    assert (y.symbol_count, y.weight_per_minute, y.limit_per_minute, y.status) == (
        33,
        198,
        7200,
        "OK",
    )
    o = rows["okx"]  # depth 1000 -> books-full, 10 requests / 2 s
    assert (o.symbol_count, o.weight_per_minute, o.limit_per_minute, o.status) == (
        27,
        162,
        300,
        "OK",
    )
    k = rows["kucoin"]
    assert (k.symbol_count, k.requests_per_minute, k.weight_per_minute) == (32, 195.2, 585.6)
    assert k.status == "OK"
    assert [r.exchange for r in budget(settings, "okx")] == ["okx"]


def test_shipped_cli_exit_0(runner: CliRunner) -> None:
    result = runner.invoke(app, ["shards", "list", "--config", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    assert "binance" in result.output and "1650" in result.output and "OVER" not in result.output


def _at_ten_seconds(tmp_path: Path) -> Path:
    for name in ("config.yml", "ip_shards.yml", "symbols.yml"):
        shutil.copy(REPO / "configs" / name, tmp_path / name)
    cfg = tmp_path / "config.yml"
    text = cfg.read_text()
    assert "    snapshot_interval: 25.0\n" in text
    cfg.write_text(text.replace("    snapshot_interval: 25.0\n", "    snapshot_interval: 10.0\n"))
    (tmp_path / ".env").touch()
    return cfg


def test_33_binance_symbols_at_10s_over(tmp_path: Path, runner: CliRunner) -> None:
    cfg = _at_ten_seconds(tmp_path)
    settings = load_settings(cfg, env={}, env_file=tmp_path / ".env")
    (b,) = budget(settings, "binance")
    assert b.weight_per_minute == pytest.approx(33 * (6 + 0.1) * 20)  # 4026 > 2400
    assert b.status == "OVER"
    result = runner.invoke(app, ["shards", "list", "--config", str(cfg), "--exchange", "binance"])
    assert result.exit_code == 1
    assert "OVER" in result.output


def test_near_when_past_safety(tmp_path: Path) -> None:
    cfg = _at_ten_seconds(tmp_path)
    cfg.write_text(
        cfg.read_text().replace("    snapshot_interval: 10.0\n", "    snapshot_interval: 20.0\n")
    )
    (b,) = budget(load_settings(cfg, env={}, env_file=tmp_path / ".env"), "binance")
    assert (b.weight_per_minute, b.status) == (2046, "NEAR")  # 85% > weight_safety 0.8


def test_unknown_exchange_and_format(runner: CliRunner) -> None:
    result = runner.invoke(app, ["shards", "list", "--config", str(SHIPPED), "--exchange", "ftx"])
    assert result.exit_code == 2
    assert "binance, bybit, okx, kucoin" in result.output
    result = runner.invoke(app, ["shards", "list", "--config", str(SHIPPED), "--format", "yaml"])
    assert result.exit_code == 2
    assert "expected table, k8s or compose" in result.output


def test_k8s_and_compose_formats_render_every_shard(runner: CliRunner) -> None:
    from ruamel.yaml import YAML

    result = runner.invoke(app, ["shards", "list", "--config", str(SHIPPED), "--format", "k8s"])
    assert result.exit_code == 0, result.output
    docs = list(YAML(typ="safe").load_all(result.stdout))
    deployments = [d for d in docs if d and d.get("kind") == "Deployment"]
    assert len(deployments) == 1  # the shipped config has one shard, "main"
    args = deployments[0]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--shard", "main"]
    result = runner.invoke(app, ["shards", "list", "--config", str(SHIPPED), "--format", "compose"])
    assert result.exit_code == 0, result.output
    compose = YAML(typ="safe").load(result.stdout)
    assert len(compose["services"]) == 1


@pytest.mark.parametrize("fmt", ["k8s", "compose"])
def test_the_renderers_fail_an_over_budget_shard_as_the_table_does(
    tmp_path: Path, runner: CliRunner, fmt: str
) -> None:
    """Found by the CLI audit: the table said OVER and exited 1, while `--format k8s`
    rendered the same shard with exit 0 and no word of it (CI deploys what it renders).
    The manifest is still whole on stdout; the reason is on stderr; exit 1."""
    from ruamel.yaml import YAML

    cfg = _at_ten_seconds(tmp_path)
    result = runner.invoke(app, ["shards", "list", "--config", str(cfg), "--format", fmt])
    assert result.exit_code == 1, result.output
    over = (
        "warning: over budget: main/binance: 4026 > 2400/min per IP; raise "
        "source.binance.snapshot_interval or move symbols to a shard with another source_ip"
    )
    assert over in result.stderr.splitlines()
    assert "over budget" not in result.stdout
    docs = [d for d in YAML(typ="safe").load_all(result.stdout) if d]
    if fmt == "k8s":
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"] == [
            "cryptoflow-main"
        ]
    else:
        assert len(docs) == 1 and len(docs[0]["services"]) == 1


@pytest.mark.parametrize("fmt", ["k8s", "compose"])
def test_metrics_port_0_is_refused_by_the_renderers(
    tmp_path: Path, runner: CliRunner, fmt: str
) -> None:
    """`metrics.port: 0` (any free port, for a local run) rendered probes, a containerPort
    and a healthcheck on port 0: a Deployment Kubernetes refuses, a healthcheck that never
    passes. Rendering refuses it in one line naming the key where it is written."""
    cfg = make_config(
        tmp_path,
        overrides={"metrics.enabled": True, "metrics.host": "0.0.0.0", "metrics.port": 0},
    )
    lines = cfg.read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if text.startswith("  port: 0 "))
    result = runner.invoke(app, ["shards", "list", "--config", str(cfg), "--format", fmt])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"{cfg}:{line}: metrics.port: 0 means any free port")
    assert result.output.count("\n") == 1 and "expected 1..65535" in result.output
    # a local run may still use it: the budget table is unaffected
    result = runner.invoke(app, ["shards", "list", "--config", str(cfg)])
    assert result.exit_code == 0, result.output


def test_the_k8s_readme_describes_the_renderer_as_it_is(tmp_path: Path) -> None:
    """deploy/k8s/README.md named renderer options the command does not have: it now
    says they are the Python function's keyword arguments; both halves must stay true."""
    from ruamel.yaml import YAML

    from cryptoflow.deploy.render import render_k8s_for_settings

    readme = (REPO / "deploy" / "k8s" / "README.md").read_text()
    assert "`shards list --format k8s` has no options for them" in readme
    help_text = CliRunner(env={"TYPER_USE_RICH": "0"}).invoke(app, ["shards", "list", "--help"])
    for option in ("--spool-size", "--storage-class", "--image", "--namespace"):
        assert option not in help_text.output
    (tmp_path / ".env").touch()
    settings = load_settings(SHIPPED, env={}, env_file=tmp_path / ".env")
    text = render_k8s_for_settings(
        settings, image="img:1", namespace="ns", spool_size="50Gi", storage_class="local-path"
    )
    docs = [d for d in YAML(typ="safe").load_all(text) if d]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["metadata"]["namespace"] == "ns"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
    assert pvc["spec"]["storageClassName"] == "local-path"
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "img:1"
