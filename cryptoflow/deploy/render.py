"""Render deployment manifests from the IP shards, so they never drift from `ip_shards.yml`.

Pure functions: they take the shards and the few settings they need as plain arguments
and return YAML text. `cryptoflow shards list --format k8s|compose` prints them.

Kubernetes (`render_k8s`): a Namespace, optionally a ConfigMap with the config files, and
per shard one PersistentVolumeClaim (its spool and local data) and one Deployment
(replicas 1, strategy Recreate: exactly one writer per shard and spool, never two during a
rollout). A shard with a `source_ip` runs with `hostNetwork: true` and a nodeSelector on
the node that owns that IP.

`metrics.port: 0` ("any free port", for local runs) is refused (`check_settings`,
`_checked_port`): the probes and the healthcheck must know the port in advance.

Compose (`render_compose`): one service per shard, each in a Compose profile named after
the shard, with its own state volume; meant for one shard per host
(`docker compose -f compose.shards.yml --profile <shard> up -d`).
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import LiteralScalarString

from cryptoflow.config import key_location
from cryptoflow.config_schema import Settings, Shard
from cryptoflow.errors import ConfigError

DEFAULT_IMAGE = "ghcr.io/cryptoflow/cryptoflow:latest"
IMAGE_ENV = "CRYPTOFLOW_IMAGE"  # overrides DEFAULT_IMAGE in default_image()
CONFIG_DIR = "/etc/cryptoflow"  # where the image expects the config files
CONFIG_FILE = f"{CONFIG_DIR}/config.yml"
STATE_DIR = "/var/lib/cryptoflow"  # the image's WORKDIR: ./spool and ./data live here
CONFIG_FILE_NAMES = ("config.yml", "ip_shards.yml", "symbols.yml")
GRACE_MARGIN = 15  # seconds on top of shutdown_timeout before the kill
APP = "cryptoflow"
SHARD_LABEL = "cryptoflow.io/shard"
NODE_LABEL_PREFIX = "shard.cryptoflow.io/"  # + shard name: the node owning its source IP
_MAX_NAME = 63 - len("cryptoflow-") - len("-spool")


class RenderError(ValueError):
    """The shards cannot be rendered (empty, duplicate or unusable names)."""


def default_image(environ: Mapping[str, str] | None = None) -> str:
    """The image to render: `$CRYPTOFLOW_IMAGE` if set, else `DEFAULT_IMAGE`."""
    env = os.environ if environ is None else environ
    return env.get(IMAGE_ENV) or DEFAULT_IMAGE


def dns_name(name: str) -> str:
    """A DNS-1123 label for a shard name: lowercase, [a-z0-9-], no edge hyphens."""
    out = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = out[:_MAX_NAME].rstrip("-")
    if not out:
        raise RenderError(f"shard name {name!r} has no letters or digits to build a name from")
    return out


def collect_args(shard_name: str, config_file: str = CONFIG_FILE) -> list[str]:
    """The container arguments (after the `cryptoflow` entrypoint) that run one shard."""
    return ["collect", "--exchange", "all", "--config", config_file, "--shard", shard_name]


def grace_seconds(shutdown_timeout: float) -> int:
    """Seconds to wait after SIGTERM before SIGKILL: the drain deadline plus a margin."""
    return math.ceil(shutdown_timeout) + GRACE_MARGIN


def read_config_files(config_path: Path) -> dict[str, str]:
    """config.yml and the ip_shards.yml / symbols.yml beside it, name -> text (for a ConfigMap).

    Files that do not exist are skipped.
    """
    folder = Path(config_path).parent
    names = [Path(config_path).name, *[n for n in CONFIG_FILE_NAMES if n != "config.yml"]]
    out: dict[str, str] = {}
    for name in names:
        path = folder / name
        if path.is_file():
            out["config.yml" if name == Path(config_path).name else name] = path.read_text(
                encoding="utf-8"
            )
    return out


def _checked_port(port: int) -> int:
    """The metrics port as the manifests use it: a probe, containerPort or healthcheck on
    port 0 is invalid (Kubernetes refuses the Deployment; the healthcheck never passes)."""
    if not 1 <= port <= 65535:
        raise RenderError(f"metrics port {port} cannot be probed, expected 1..65535")
    return port


def check_settings(settings: Settings, fmt: str, config_path: Path | str | None = None) -> None:
    """Raise ConfigError (`file:line: metrics.port: ...`) for settings no manifest can use.

    `metrics.port: 0` means "any free port": fine for a local run (the log names the port
    bound), but the kubelet probes, the Prometheus annotation and the Compose healthcheck
    need to know the port in advance. `fmt` is "k8s" or "compose".
    """
    port = settings.app.metrics.port
    if port != 0:
        return
    path = config_path or settings.config_path
    where = key_location(path, "metrics.port") if path else "metrics.port"
    needs = (
        "the rendered probes, containerPort and prometheus.io/port need"
        if fmt == "k8s"
        else "the rendered healthcheck needs"
    )
    raise ConfigError(
        [
            f"{where}: 0 means any free port, which only a local run can use; {needs} "
            "a fixed port, expected 1..65535 (9108 by default)"
        ]
    )


def _checked_names(shards: Sequence[Shard]) -> list[tuple[Shard, str]]:
    if not shards:
        raise RenderError("no shards to render (ip_shards.yml lists none)")
    seen: dict[str, str] = {}
    out = []
    for shard in shards:
        dns = dns_name(shard.name)
        if dns in seen:
            raise RenderError(
                f"shards {seen[dns]!r} and {shard.name!r} both become {dns!r}; rename one"
            )
        seen[dns] = shard.name
        out.append((shard, dns))
    return out


def _literal(text: str) -> str:
    """Block style for file contents, unless YAML cannot keep them exactly that way."""
    if not text.endswith("\n") or any(line != line.rstrip() for line in text.splitlines()):
        return text
    return LiteralScalarString(text)


def _symbols_summary(shard: Shard) -> str:
    parts = [f"{ex}={len(syms)}" for ex, syms in shard.symbols.items() if syms]
    return ", ".join(parts) or "no symbols"


def _dump(docs: Sequence[tuple[str, Any]]) -> str:
    """Multi-document YAML, each document preceded by its comment lines."""
    yaml = YAML()
    yaml.default_flow_style = False
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    chunks = []
    for comment, doc in docs:
        buf = io.StringIO()
        yaml.dump(doc, buf)
        head = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
        chunks.append(head + buf.getvalue())
    return "---\n" + "---\n".join(chunks)


#: liveness restarts the pod, so it asks only "is the process alive" (`/livez`); `/healthz`
#: (a stale symbol, a full spool) only marks the pod unready: a restart would gap every
#: symbol and drop the rows held in memory, and cures neither
LIVENESS_PATH = "/livez"
READINESS_PATH = "/healthz"


def _health_probe(metrics_port: int, path: str, *, period: int, failures: int, delay: int) -> dict:
    return {
        "httpGet": {"path": path, "port": metrics_port},
        "initialDelaySeconds": delay,
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _deployment(
    shard: Shard,
    dns: str,
    *,
    image: str,
    namespace: str,
    shutdown_timeout: float,
    metrics_port: int,
    config_map: str,
    secret_name: str,
) -> CommentedMap:
    name = f"{APP}-{dns}"
    labels = {"app.kubernetes.io/name": APP, SHARD_LABEL: dns}
    container = {
        "name": APP,
        "image": image,
        "args": collect_args(shard.name),
        "envFrom": [{"secretRef": {"name": secret_name}}],
        "env": [{"name": "CRYPTOFLOW_METRICS_PORT", "value": str(metrics_port)}],
        "ports": [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}],
        "livenessProbe": _health_probe(
            metrics_port, LIVENESS_PATH, period=20, failures=6, delay=60
        ),
        "readinessProbe": _health_probe(
            metrics_port, READINESS_PATH, period=10, failures=3, delay=10
        ),
        "resources": {
            "requests": {"cpu": "250m", "memory": "512Mi"},
            "limits": {"memory": "2Gi"},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod_spec = CommentedMap()
    if shard.source_ip:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
        pod_spec["nodeSelector"] = {f"{NODE_LABEL_PREFIX}{dns}": "true"}
        pod_spec.yaml_set_comment_before_after_key(
            "nodeSelector",
            before=(
                f"binds {shard.source_ip}: run on the node that owns it --\n"
                f"kubectl label node <node-with-{shard.source_ip}> {NODE_LABEL_PREFIX}{dns}=true"
            ),
            indent=6,
        )
    pod_spec["terminationGracePeriodSeconds"] = grace_seconds(shutdown_timeout)
    pod_spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
    }
    pod_spec["containers"] = [container]
    pod_spec["volumes"] = [
        {"name": "config", "configMap": {"name": config_map}},
        {"name": "state", "persistentVolumeClaim": {"claimName": f"{name}-spool"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    return CommentedMap(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": dict(labels)},
                "template": {
                    "metadata": {
                        "labels": dict(labels),
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(metrics_port),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": pod_spec,
                },
            },
        }
    )


def render_k8s(
    shards: Sequence[Shard],
    image: str = DEFAULT_IMAGE,
    namespace: str = "cryptoflow",
    *,
    shutdown_timeout: float = 30.0,
    metrics_port: int = 9108,
    config_files: Mapping[str, str] | None = None,
    config_map: str = "cryptoflow-config",
    secret_name: str = "cryptoflow-env",
    spool_size: str = "20Gi",
    storage_class: str | None = None,
) -> str:
    """Kubernetes manifests (multi-document YAML) for every shard.

    Documents: Namespace; ConfigMap `config_map` with `config_files` (name -> text, see
    `read_config_files`) if given, else the ConfigMap is expected to exist; then per shard a
    PersistentVolumeClaim `cryptoflow-<shard>-spool` and a Deployment `cryptoflow-<shard>`.
    The Secret `secret_name` (AWS_* / S3_BUCKET, from `.env`) must exist.
    """
    named = _checked_names(shards)
    metrics_port = _checked_port(metrics_port)
    docs: list[tuple[str, Any]] = []
    docs.append(
        (
            "Generated by `cryptoflow shards list --format k8s` from ip_shards.yml; do not edit.\n"
            f"Secret {secret_name}: kubectl -n {namespace} create secret generic "
            f"{secret_name} --from-env-file=.env\n"
            f"The deployed config.yml needs metrics.enabled: true and metrics.host: 0.0.0.0\n"
            f"(probes and Prometheus reach /livez, /healthz and /metrics on port {metrics_port}).",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
    )
    if config_files is not None:
        docs.append(
            (
                "config.yml, ip_shards.yml, symbols.yml, mounted at " + CONFIG_DIR,
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": config_map,
                        "namespace": namespace,
                        "labels": {"app.kubernetes.io/name": APP},
                    },
                    "data": {k: _literal(v) for k, v in config_files.items()},
                },
            )
        )
    for shard, dns in named:
        pvc_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": spool_size}},
        }
        if storage_class:
            pvc_spec["storageClassName"] = storage_class
        where = f"source IP {shard.source_ip}" if shard.source_ip else "default route"
        docs.append(
            (
                f"shard {shard.name} ({where}; {_symbols_summary(shard)}): "
                "spool + local data, survives restarts",
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {
                        "name": f"{APP}-{dns}-spool",
                        "namespace": namespace,
                        "labels": {"app.kubernetes.io/name": APP, SHARD_LABEL: dns},
                    },
                    "spec": pvc_spec,
                },
            )
        )
        docs.append(
            (
                f"shard {shard.name}: one writer (replicas 1, Recreate)",
                _deployment(
                    shard,
                    dns,
                    image=image,
                    namespace=namespace,
                    shutdown_timeout=shutdown_timeout,
                    metrics_port=metrics_port,
                    config_map=config_map,
                    secret_name=secret_name,
                ),
            )
        )
    return _dump(docs)


def _healthcheck_test(metrics_port: int) -> list[str]:
    """Liveness only (`/livez`): `(healthy)` means the process runs; whether the data
    is flowing is `/healthz`, for alerts."""
    code = (
        "import urllib.request; "
        f"urllib.request.urlopen('http://127.0.0.1:{metrics_port}{LIVENESS_PATH}', timeout=4)"
    )
    return ["CMD", "python", "-c", code]


def render_compose(
    shards: Sequence[Shard],
    image: str = DEFAULT_IMAGE,
    *,
    shutdown_timeout: float = 30.0,
    metrics_port: int = 9108,
    config_dir: str = "../configs",
    env_file: str = "../.env",
) -> str:
    """A Compose file with one service per shard (host network, profile = shard name).

    Paths are relative to the compose file (default: it lives in `deploy/`). Every service
    has its own state volume (spool + local data). All services bind the same metrics
    port on the host network, so run one shard per host:
    `docker compose -f deploy/compose.shards.yml --profile <shard> up -d`.
    """
    named = _checked_names(shards)
    metrics_port = _checked_port(metrics_port)
    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    for shard, dns in named:
        volume = f"state-{dns}"
        services[dns] = {
            "image": f"${{CRYPTOFLOW_IMAGE:-{image}}}",
            "profiles": [dns],
            "command": collect_args(shard.name),
            "network_mode": "host",
            "init": True,
            "restart": "unless-stopped",
            "env_file": [env_file],
            "environment": {"CRYPTOFLOW_METRICS_PORT": str(metrics_port)},
            "stop_signal": "SIGTERM",
            "stop_grace_period": f"{grace_seconds(shutdown_timeout)}s",
            "volumes": [f"{config_dir}:{CONFIG_DIR}:ro", f"{volume}:{STATE_DIR}"],
            "healthcheck": {
                "test": _healthcheck_test(metrics_port),
                "interval": "30s",
                "timeout": "5s",
                "start_period": "60s",
                "retries": 3,
            },
            "logging": {"driver": "json-file", "options": {"max-size": "50m", "max-file": "5"}},
        }
        volumes[volume] = {}
    doc = {"name": APP, "services": services, "volumes": volumes}
    return _dump(
        [
            (
                "Generated by `cryptoflow shards list --format compose` from ip_shards.yml.\n"
                "One shard per host: docker compose -f <this file> --profile <shard> up -d",
                doc,
            )
        ]
    )


def render_k8s_for_settings(
    settings: Settings,
    image: str | None = None,
    namespace: str = "cryptoflow",
    *,
    config_path: Path | None = None,
    **kwargs: Any,
) -> str:
    """`render_k8s` with shards, shutdown_timeout and metrics port from loaded settings.

    With `config_path` (or `settings.config_path`) the ConfigMap is rendered from the files.
    Raises ConfigError for settings no manifest can use (`check_settings`).
    """
    path = config_path or (Path(settings.config_path) if settings.config_path else None)
    check_settings(settings, "k8s", path)
    if path is not None and "config_files" not in kwargs:
        kwargs["config_files"] = read_config_files(path) or None
    return render_k8s(
        settings.shards,
        image or default_image(),
        namespace,
        shutdown_timeout=settings.app.cryptoflow.shutdown_timeout,
        metrics_port=settings.app.metrics.port,
        **kwargs,
    )


def render_compose_for_settings(settings: Settings, image: str | None = None, **kwargs: Any) -> str:
    """`render_compose` with shards, shutdown_timeout and metrics port from loaded settings.

    Raises ConfigError for settings no manifest can use (`check_settings`)."""
    check_settings(settings, "compose")
    return render_compose(
        settings.shards,
        image or default_image(),
        shutdown_timeout=settings.app.cryptoflow.shutdown_timeout,
        metrics_port=settings.app.metrics.port,
        **kwargs,
    )


def settings_warnings(settings: Settings, fmt: str) -> list[str]:
    """Config problems that would make the rendered deployment misbehave (for stderr).

    `fmt` is "k8s" or "compose". Empty list = nothing to say.
    """
    out: list[str] = []
    metrics = settings.app.metrics
    if not metrics.enabled:
        out.append(
            f"metrics.enabled is false: the {LIVENESS_PATH} healthcheck"
            + (" and the liveness probe will fail (restart loop)" if fmt == "k8s" else " fails")
            + "; set metrics.enabled: true in the deployed config.yml"
        )
    if fmt == "k8s" and metrics.host in ("127.0.0.1", "localhost", "::1"):
        out.append(
            f"metrics.host is {metrics.host}: kubelet probes and Prometheus cannot reach it; "
            "set metrics.host: 0.0.0.0 in the deployed config.yml"
        )
    storage = settings.app.storage
    paths = {"storage.spool.path": storage.spool.path}
    if not storage.s3.enabled:
        paths["storage.local_path"] = storage.local_path
    for key, value in paths.items():
        if value.startswith("/") and not (value + "/").startswith(STATE_DIR + "/"):
            out.append(
                f"{key} is {value}, outside the state volume {STATE_DIR}: it is lost when the "
                "container is replaced; use a relative path"
            )
    if fmt == "compose":
        n = len(settings.shards)
        if n > 1:
            out.append(
                f"{n} services share metrics port {metrics.port} on the host network: "
                "start one profile per host"
            )
    return out
