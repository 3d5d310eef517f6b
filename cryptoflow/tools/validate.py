"""`cryptoflow validate-config`: load everything, print what will run.

Loading is the check (`load_settings` raises ConfigError with every problem); the summary
lets an operator eyeball the result. It never prints secrets: only the bucket and prefix.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import trio

from cryptoflow.config import (
    key_location,
    load_settings,
    shard_key_location,
    stale_after_warnings,
)
from cryptoflow.config_schema import Settings
from cryptoflow.errors import ConfigError, CryptoflowError
from cryptoflow.exchanges import registry
from cryptoflow.net.http import make_http_client, source_ip_problem
from cryptoflow.net.ratelimit import RateBudget
from cryptoflow.symbols import listed_on


def run(config_path: Path, online: bool = False) -> int:
    settings = load_settings(config_path)
    print("\n".join(summary(settings)))
    foreign = source_ip_problems(settings, config_path)
    # offline, the config may be meant for other hosts (one node per shard IP)
    for line in stale_after_warnings(settings) + ([] if online else foreign):
        print(f"warning: {line}", file=sys.stderr)
    problems = host_problems(settings, config_path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 2  # a path of the configuration that cannot be used
    if online:
        try:
            problems = foreign + check_online(settings)
        except NotImplementedError:
            print("online instrument check: not implemented yet", file=sys.stderr)
            return 0
        for line in problems:
            print(line, file=sys.stderr)
        if not problems:
            print("online instrument check: every configured symbol is listed")
        return 2 if problems else 0
    return 0


def host_problems(settings: Settings, config_path: Path) -> list[str]:
    """What `collect` would refuse on this host before collecting (exit 2 there too):
    one `file:line: key: ...` line each. Warnings go to stderr directly."""
    from cryptoflow.storage.factory import check_output_writable, check_spool_apart

    storage, env = settings.app.storage, settings.env
    problems = _check_spool(settings, config_path)
    try:
        check_spool_apart(storage, env, None, config_path)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:  # the output tree collect writes into when S3 is off (nothing created here)
        check_output_writable(storage, env, None, config_path, create=False)
    except ConfigError as exc:
        problems.extend(exc.problems)
    problem = _log_output_problem(settings.app.logging.output)
    if problem:
        where = key_location(config_path, "logging.output")
        problems.append(f"{where}: cannot open {settings.app.logging.output!r}: {problem}")
    return problems


def _log_output_problem(output: str) -> str | None:
    """Why collect could not open this log file (its OSError text), without creating it."""
    if output in ("stderr", "stdout", ""):
        return None
    path = Path(os.path.realpath(output))  # a symlink is opened at its target
    folder = path.parent
    if path.is_dir():
        code = errno.EISDIR
    elif not folder.exists():
        code = errno.ENOENT
    elif not folder.is_dir():
        code = errno.ENOTDIR
    elif not os.access(path if path.exists() else folder, os.W_OK):
        code = errno.EACCES
    else:
        return None
    return os.strerror(code)


def source_ip_problems(settings: Settings, config_path: Path) -> list[str]:
    """Shards whose source IP this host does not have: collect here would fail every
    connection of theirs (and retry forever). Warnings offline, problems with --online."""
    out = []
    for shard in settings.shards:
        if shard.source_ip is None:
            continue
        problem = source_ip_problem(shard.source_ip)
        if problem:
            where = shard_key_location(config_path, shard.name, "source_ip")
            out.append(
                f"{where}: {shard.source_ip} is not usable on this host (binding it: "
                f"{problem}), expected an address of this host: collect here would fail "
                "every connection of this shard"
            )
    return out


def _check_spool(settings: Settings, config_path: Path) -> list[str]:
    """Spool directory creatable/writable with free space (warnings -> stderr)."""
    from cryptoflow.storage.spool import check_spool_dir

    spool = settings.app.storage.spool
    errors, warnings = check_spool_dir(Path(spool.path), spool.max_bytes, create=False)
    where = key_location(config_path, "storage.spool.path")
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    return [f"{where}: {line.removeprefix('storage.spool.path ')}" for line in errors]


def check_online(settings: Settings) -> list[str]:
    """Hook for `--online`: each configured symbol against the venues' instrument lists.

    Returns one problem line per symbol a venue does not list (or not as trading), and
    one per venue whose instruments endpoint could not be read. Uses the venues' real REST
    clients (`source.<venue>.rest_url`, default the public API), one request each.
    """
    return trio.run(_check_online, settings)


def _configured(settings: Settings, exchange: str) -> list[tuple[str, str]]:
    """(normalized, venue symbol) served by any shard on this exchange, in table order."""
    served = {sym for shard in settings.shards for sym in shard.symbols.get(exchange) or []}
    out = []
    for sym in served:
        entry = settings.symbols.get(sym)
        venue_sym = entry.venue_symbol(exchange) if entry else None
        if venue_sym:
            out.append((sym, venue_sym))
    return sorted(out)


async def _check_online(settings: Settings) -> list[str]:
    problems: list[str] = []
    app = settings.app
    for exchange in app.cryptoflow.exchanges:
        if exchange not in registry.available():
            continue
        pairs = _configured(settings, exchange)
        if not pairs:
            continue
        venue = registry.get_venue(exchange)
        source = app.source.for_exchange(exchange)
        base = source.rest_url or venue.default_rest_url
        budget = RateBudget(source.weight_limit_per_minute or venue.weight_limit_per_minute)
        async with make_http_client(
            base, source_ip=None, timeout=app.reader.request_timeout
        ) as http:
            try:
                instruments = await venue.make_rest(http, budget).fetch_instruments()
            except CryptoflowError as exc:
                problems.append(f"{exchange}: cannot read the instruments list from {base}: {exc}")
                continue
        for sym, venue_sym in pairs:
            inst = instruments.get(venue_sym)
            if inst is None:
                problems.append(
                    f"{exchange}: {sym} -> {venue_sym!r} is not listed by {exchange} "
                    f"(symbols.yml maps it; fix the name or set it to null)"
                )
            elif not inst.status_ok:
                problems.append(
                    f"{exchange}: {sym} -> {venue_sym!r} is listed but not trading on {exchange}"
                )
            elif inst.unsupported:
                problems.append(
                    f"{exchange}: {sym} -> {venue_sym!r} cannot be collected: {inst.unsupported}"
                )
    return problems


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
