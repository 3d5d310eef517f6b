"""Deployment artefacts: rendered k8s/compose manifests, deploy/compose.yml, Dockerfile,
.dockerignore and the GitHub workflows. No Docker engine needed: the Dockerfile is linted
as text, and its install steps are exercised by CI's `package` job."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from cryptoflow.config_schema import Shard
from cryptoflow.deploy import render
from cryptoflow.deploy.render import (
    RenderError,
    collect_args,
    dns_name,
    grace_seconds,
    read_config_files,
    render_compose,
    render_k8s,
)

ROOT = Path(__file__).resolve().parents[1]
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

SHARDS = [
    Shard(name="main", source_ip=None, symbols={"binance": ["BTCUSDT", "ETHUSDT"], "okx": []}),
    Shard(name="EIP_2", source_ip="10.0.0.5", symbols={"bybit": ["SOLUSDT"], "okx": ["BTCUSDT"]}),
    Shard(name="eip3", source_ip="2001:db8::7", symbols={"kucoin": ["XRPUSDT"]}),
]


def load_all(text: str) -> list[dict]:
    return [d for d in YAML(typ="safe").load_all(text) if d is not None]


def load(path: Path):
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def shard_of(deployment: dict) -> str:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return args[args.index("--shard") + 1]


def check_k8s(text: str, shards: list[Shard], shutdown_timeout: float, port: int) -> None:
    docs = load_all(text)
    deployments = by_kind(docs, "Deployment")
    pvcs = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    # exactly one workload per shard, with the right args, and nothing else
    assert sorted(shard_of(d) for d in deployments) == sorted(s.name for s in shards)
    assert len(pvcs) == len(shards)
    assert {d["kind"] for d in docs} <= {
        "Namespace",
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
    }
    for dep in deployments:
        shard = next(s for s in shards if s.name == shard_of(dep))
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [
            "collect",
            "--exchange",
            "all",
            "--config",
            "/etc/cryptoflow/config.yml",
            "--shard",
            shard.name,
        ]
        assert DNS_LABEL.match(dep["metadata"]["name"]) and len(dep["metadata"]["name"]) <= 63
        assert spec["replicas"] == 1
        assert spec["strategy"] == {"type": "Recreate"}
        assert (
            spec["selector"]["matchLabels"].items()
            <= spec["template"]["metadata"]["labels"].items()
        )
        # hostNetwork iff the shard binds a source IP; then pinned to the IP's node
        assert pod.get("hostNetwork", False) is bool(shard.source_ip)
        assert ("nodeSelector" in pod) is bool(shard.source_ip)
        if shard.source_ip:
            assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
            assert shard.source_ip in text  # the comment names the IP to schedule by
        grace = pod["terminationGracePeriodSeconds"]
        assert isinstance(grace, int) and grace > shutdown_timeout
        ann = spec["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/port"] == str(port)
        # restart only a dead process (/livez); a stale symbol or a full spool (/healthz)
        # makes the pod not ready, never restarts it
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": port}
        assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
        assert container["envFrom"][0]["secretRef"]["name"]
        # spool on this shard's own PVC, config from the ConfigMap
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
        assert claim in pvcs
        assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]
        assert "configMap" in volumes["config"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/var/lib/cryptoflow"] == "state"
        assert mounts["/etc/cryptoflow"] == "config"
        assert pod["securityContext"]["runAsNonRoot"] is True
    claims = [
        d["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"]
        for d in deployments
    ]
    assert len(set(claims)) == len(claims)  # never two writers on one spool


def assert_liveness_healthcheck(test: list[str], port: int) -> None:
    """The container healthcheck asks /livez (is the process alive), never /healthz: an
    unhealthy container may be restarted, and /healthz is 503 for one stale symbol."""
    code = " ".join(test)
    assert f"http://127.0.0.1:{port}/livez" in code and "/healthz" not in code


def check_compose(
    text: str, shards: list[Shard], shutdown_timeout: float, port: int = 9108
) -> None:
    doc = load_all(text)[0]
    services = doc["services"]
    assert len(services) == len(shards)
    seen = []
    for name, svc in services.items():
        assert DNS_LABEL.match(name)
        cmd = svc["command"]
        seen.append(cmd[cmd.index("--shard") + 1])
        assert cmd[:5] == ["collect", "--exchange", "all", "--config", "/etc/cryptoflow/config.yml"]
        assert svc["network_mode"] == "host"
        assert svc["profiles"] == [name]
        assert svc["restart"] == "unless-stopped"
        assert _seconds(svc["stop_grace_period"]) > shutdown_timeout
        assert_liveness_healthcheck(svc["healthcheck"]["test"], port)
        state = [v for v in svc["volumes"] if v.endswith(":/var/lib/cryptoflow")]
        assert len(state) == 1 and state[0].split(":")[0] in doc["volumes"]
    assert sorted(seen) == sorted(s.name for s in shards)
    volumes = [v for svc in services.values() for v in svc["volumes"] if "/var/lib" in v]
    assert len(set(volumes)) == len(volumes)


def _seconds(value: str | int) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(value))
    assert m and any(m.groups()), value
    return int(m.group(1) or 0) * 60 + int(m.group(2) or 0)


# --- render_k8s / render_compose on hand-made shards ---------------------------------------


def test_render_k8s_one_workload_per_shard() -> None:
    text = render_k8s(SHARDS, "ghcr.io/acme/cryptoflow:1.0", shutdown_timeout=30.0)
    check_k8s(text, SHARDS, 30.0, 9108)
    docs = load_all(text)
    assert by_kind(docs, "Namespace")[0]["metadata"]["name"] == "cryptoflow"
    assert all(d["metadata"].get("namespace", "cryptoflow") == "cryptoflow" for d in docs)
    images = {
        d["spec"]["template"]["spec"]["containers"][0]["image"] for d in by_kind(docs, "Deployment")
    }
    assert images == {"ghcr.io/acme/cryptoflow:1.0"}
    assert not by_kind(docs, "ConfigMap")  # only with config_files


def test_render_k8s_settings_flow_through() -> None:
    text = render_k8s(
        SHARDS,
        "img:1",
        "prod",
        shutdown_timeout=90.5,
        metrics_port=9200,
        config_files={"config.yml": "metrics:\n  enabled: true\n", "ip_shards.yml": "shards: []\n"},
        spool_size="50Gi",
        storage_class="local-path",
    )
    check_k8s(text, SHARDS, 90.5, 9200)
    docs = load_all(text)
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] != "Namespace"} == {"prod"}
    (cm,) = by_kind(docs, "ConfigMap")
    assert cm["data"]["config.yml"] == "metrics:\n  enabled: true\n"
    for dep in by_kind(docs, "Deployment"):
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 91 + 15
    for pvc in by_kind(docs, "PersistentVolumeClaim"):
        assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"
        assert pvc["spec"]["storageClassName"] == "local-path"


def test_render_compose_one_service_per_shard() -> None:
    text = render_compose(SHARDS, "ghcr.io/acme/cryptoflow:1.0", shutdown_timeout=30.0)
    check_compose(text, SHARDS, 30.0)
    doc = load_all(text)[0]
    svc = doc["services"]["eip-2"]
    assert svc["command"][-2:] == ["--shard", "EIP_2"]
    assert "ghcr.io/acme/cryptoflow:1.0" in svc["image"]
    assert svc["env_file"] == ["../.env"]
    assert "../configs:/etc/cryptoflow:ro" in svc["volumes"]
    assert grace_seconds(120) == 135


def test_names_are_dns_safe_and_collisions_are_errors() -> None:
    assert dns_name("EIP_2") == "eip-2"
    assert dns_name("  Tokyo.Main ") == "tokyo-main"
    assert DNS_LABEL.match(dns_name("x" * 200))
    with pytest.raises(RenderError, match="both become"):
        render_k8s([Shard("a_b", None, {}), Shard("A-B", None, {})], "img")
    with pytest.raises(RenderError):
        render_compose([Shard("__", None, {})], "img")
    with pytest.raises(RenderError, match="no shards"):
        render_k8s([], "img")


def test_port_0_is_no_port_for_a_probe() -> None:
    """Port 0 ("any free port") in a probe, containerPort or healthcheck is invalid."""
    with pytest.raises(RenderError, match="metrics port 0 cannot be probed"):
        render_k8s(SHARDS, "img", metrics_port=0)
    with pytest.raises(RenderError, match="metrics port 0 cannot be probed"):
        render_compose(SHARDS, "img", metrics_port=0)


def test_collect_args_and_read_config_files(tmp_path: Path) -> None:
    assert collect_args("s1") == [
        "collect",
        "--exchange",
        "all",
        "--config",
        "/etc/cryptoflow/config.yml",
        "--shard",
        "s1",
    ]
    (tmp_path / "prod.yml").write_text("a: 1\n")
    (tmp_path / "ip_shards.yml").write_text("shards: []\n")
    files = read_config_files(tmp_path / "prod.yml")
    assert files == {"config.yml": "a: 1\n", "ip_shards.yml": "shards: []\n"}


# --- no drift from the shipped configs/ip_shards.yml --------------------------------------


def _shipped_settings():
    from cryptoflow.config import load_settings

    path = ROOT / "configs" / "config.yml"
    return load_settings(path, env={}), path


def test_shipped_shards_render_without_drift() -> None:
    settings, path = _shipped_settings()
    shards = list(settings.shards)
    timeout = settings.app.cryptoflow.shutdown_timeout
    port = settings.app.metrics.port
    text = render.render_k8s_for_settings(settings, "img:test", config_path=path)
    check_k8s(text, shards, timeout, port)
    (cm,) = by_kind(load_all(text), "ConfigMap")
    assert cm["data"]["ip_shards.yml"] == (path.parent / "ip_shards.yml").read_text()
    compose = render.render_compose_for_settings(settings, "img:test")
    check_compose(compose, shards, timeout, port)
    # the raw file lists the same shard names the manifests were rendered from
    raw = load(path.parent / "ip_shards.yml")
    assert sorted(s["name"] for s in raw["shards"]) == sorted(s.name for s in shards)


# --- deploy/compose.yml -------------------------------------------------------------------


def test_compose_file() -> None:
    doc = load(ROOT / "deploy" / "compose.yml")
    (svc,) = doc["services"].values()
    assert svc["network_mode"] == "host"
    assert svc["restart"] == "unless-stopped"
    assert svc["env_file"] == ["../.env"]
    assert _seconds(svc["stop_grace_period"]) > 30
    assert svc["command"][0] == "collect"
    assert "--config" in svc["command"]
    assert "/etc/cryptoflow/config.yml" in svc["command"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert mounts["/etc/cryptoflow"] == "../configs"
    assert svc["volumes"][0].endswith(":ro")
    assert mounts["/var/lib/cryptoflow"] in doc["volumes"]
    assert_liveness_healthcheck(svc["healthcheck"]["test"], 9108)
    assert (ROOT / "configs").is_dir()  # the mounted directory exists in the repo


# --- Dockerfile (textual lint: no Docker engine here) -------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instr, rest in dockerfile():
        if instr == "FROM":
            result.append([])
        if result:
            result[-1].append((instr, rest))
    return result


def test_dockerfile_base_user_entrypoint() -> None:
    steps = dockerfile()
    args = {r.split("=")[0]: r.split("=", 1)[1] for i, r in steps if i == "ARG" and "=" in r}
    froms = [r.split()[0] for i, r in steps if i == "FROM"]
    bases = [args.get(f.strip("${}"), f) for f in froms]
    assert bases and all(b == "python:3.11-slim" for b in bases), bases
    final = stages()[-1]
    users = [r for i, r in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [r for i, r in final if i == "ENTRYPOINT"] == ['["cryptoflow"]']
    (cmd,) = [r for i, r in final if i == "CMD"]
    assert json.loads(cmd)[:1] == ["collect"] and "/etc/cryptoflow/config.yml" in json.loads(cmd)
    (health,) = [r for i, r in final if i == "HEALTHCHECK"]
    assert "'/livez'" in health and "/healthz" not in health and "urllib" in health
    assert ("STOPSIGNAL", "SIGTERM") in final
    vols = [r for i, r in final if i == "VOLUME"]
    assert vols and "/var/lib/cryptoflow" in vols[0]
    assert ("WORKDIR", "/var/lib/cryptoflow") in final


def test_dockerfile_installs_the_project_with_pip_from_copied_files() -> None:
    steps = dockerfile()
    copied: set[str] = set()
    for instr, rest in steps:
        if instr == "COPY" and "--from" not in rest:
            parts = shlex.split(rest)
            copied.update(p.rstrip("/") for p in parts[:-1])
    # everything the package build needs is in the image's build context
    assert {"pyproject.toml", "cryptoflow", "configs"} <= copied
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)
    if readme:
        assert readme.group(1) in copied
    runs = " ".join(r for i, r in steps if i == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs)
    # .dockerignore keeps secrets out and does not hide what the build copies
    ignore = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ".env" in ignore
    for path in copied:
        assert path not in ignore and f"{path}/" not in ignore


# --- workflows ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ci", "image", "deploy"])
def test_workflows_parse(name: str) -> None:
    doc = load(ROOT / ".github" / "workflows" / f"{name}.yml")
    assert doc["jobs"]
    assert True in doc or "on" in doc  # YAML 1.1 may read the `on:` key as True
    for job in doc["jobs"].values():
        assert job["runs-on"] and job["steps"]


def test_ci_runs_the_ci_script_on_push() -> None:
    doc = load(ROOT / ".github" / "workflows" / "ci.yml")
    triggers = doc.get("on", doc.get(True))
    assert "push" in triggers
    runs = [s.get("run", "") for job in doc["jobs"].values() for s in job["steps"]]
    assert any("bash .ci/run" in r for r in runs)


def test_image_pushes_to_ghcr_and_deploy_reads_one_env_secret() -> None:
    image = (ROOT / ".github" / "workflows" / "image.yml").read_text()
    assert "ghcr.io" in image and "tags:" in image
    deploy = (ROOT / ".github" / "workflows" / "deploy.yml").read_text()
    assert "secrets.ENV }}" in deploy
    assert "docker compose -f deploy/compose.yml" in deploy
    assert ".env" in deploy


def test_settings_warnings_name_the_fix() -> None:
    from cryptoflow.config_schema import (
        AppConfig,
        Environment,
        MetricsSection,
        Settings,
        SpoolSection,
        StorageSection,
    )

    bad = Settings(
        app=AppConfig(
            metrics=MetricsSection(enabled=False, host="127.0.0.1"),
            storage=StorageSection(spool=SpoolSection(path="/srv/spool")),
        ),
        shards=SHARDS,
        symbols={},
        env=Environment(),
    )
    k8s = "\n".join(render.settings_warnings(bad, "k8s"))
    assert "metrics.enabled: true" in k8s
    assert "metrics.host: 0.0.0.0" in k8s
    assert "storage.spool.path" in k8s
    assert "one profile per host" in "\n".join(render.settings_warnings(bad, "compose"))
    good = Settings(
        app=AppConfig(metrics=MetricsSection(enabled=True, host="0.0.0.0")),
        shards=SHARDS[:1],
        symbols={},
        env=Environment(),
    )
    assert render.settings_warnings(good, "k8s") == []
    assert render.settings_warnings(good, "compose") == []
