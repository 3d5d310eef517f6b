"""Build a test configuration folder from the shipped configs, with overrides.

Tests start from `configs/` so they exercise the real files, then change only what the
test needs (symbols, intervals, endpoints, paths) through dotted keys.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

SHIPPED = Path(__file__).resolve().parent.parent / "configs"


def _set(doc: Any, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def make_config(
    folder: Path,
    *,
    shards: list[dict[str, Any]] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Copy configs/ into `folder`, apply `overrides` to config.yml, replace the shards."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("symbols.yml", "ip_shards.yml"):
        shutil.copy(SHIPPED / name, folder / name)
    yaml = YAML()
    doc = yaml.load((SHIPPED / "config.yml").read_text())
    for dotted, value in (overrides or {}).items():
        _set(doc, dotted, value)
    with (folder / "config.yml").open("w") as fh:
        yaml.dump(doc, fh)
    (folder / ".env").touch()  # an empty .env: tests never read the developer's own
    if shards is not None:
        with (folder / "ip_shards.yml").open("w") as fh:
            yaml.dump({"shards": shards}, fh)
    return folder / "config.yml"
