"""`cryptoflow validate-config`: load everything, print what will run.

Loading is the check (`load_settings` raises ConfigError with every problem); the summary
lets an operator eyeball the result. It never prints secrets: only the bucket and prefix.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cryptoflow.config import load_settings
from cryptoflow.config_schema import Settings
from cryptoflow.symbols import listed_on


def run(config_path: Path, online: bool = False) -> int:
    settings = load_settings(config_path)
    print("\n".join(summary(settings)))
    if online:
        try:
            problems = check_online(settings)
        except NotImplementedError:
            print("online instrument check: not implemented yet", file=sys.stderr)
            return 0
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    return 0


def check_online(settings: Settings) -> list[str]:
    """Hook for `--online`: each configured symbol against the venues' instrument lists.

    Returns one problem line per symbol a venue does not list (or not as trading).
    """
    raise NotImplementedError


def summary(settings: Settings) -> list[str]:
    app = settings.app
    enabled = app.cryptoflow.exchanges
    lines = [f"config: {settings.config_path}", f"exchanges: {', '.join(enabled) or '(none)'}"]
    for exchange in enabled:
        served = sum(len(s.symbols.get(exchange) or []) for s in settings.shards)
        src = app.source.for_exchange(exchange)
        lanes = [n for n, on in (("snapshots", src.snapshots), ("deltas", src.deltas)) if on]
        interval = src.snapshot_interval or app.reader.snapshot_interval
        in_table = len(listed_on(settings.symbols, exchange))
        lines.append(
            f"  {exchange}: {served} symbols on shards ({in_table}"
            f" in the table), lanes: {', '.join(lanes) or 'none'}, "
            f"snapshot every {interval:g} s, depth {src.depth_limit}"
        )
    for shard in settings.shards:
        counts = ", ".join(f"{ex} {len(v)}" for ex, v in shard.symbols.items() if v)
        lines.append(f"shard {shard.name} ({shard.source_ip or 'default route'}): {counts}")
    lines.append(f"storage: {storage_target(settings)}")
    return lines


def storage_target(settings: Settings) -> str:
    s3 = settings.app.storage.s3
    if s3.enabled and settings.env.s3_bucket:
        where = f"s3://{settings.env.s3_bucket}/{s3.prefix.strip('/')}"
        endpoint = settings.env.s3_endpoint_url or s3.endpoint_url
        return f"{where} (endpoint {endpoint})" if endpoint else where
    return f"local {settings.app.storage.local_path}"
