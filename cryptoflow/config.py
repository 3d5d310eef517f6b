"""Load `config.yml`, `ip_shards.yml`, `symbols.yml` and the environment into `Settings`.

Why this is more than `yaml.load` + `cattrs.structure`: an operator must see EVERY mistake
in one run, each with file, line and dotted key, before a day of data is lost. So the
YAML is read round-trip (ruamel keeps line numbers), walked against the attrs schema by
hand (collecting problems instead of raising on the first), and only the clean result is
handed to cattrs. Cross-file rules (shard symbols vs the symbol table, one IP per shard,
S3 needs a bucket) run after the per-file checks.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import cattrs
from dotenv import dotenv_values
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from cryptoflow.config_schema import (
    EXCHANGES,
    VENUE_DEFAULTS,
    AppConfig,
    Environment,
    Settings,
    Shard,
    SourceSection,
    SymbolEntry,
)
from cryptoflow.errors import ConfigError
from cryptoflow.exchanges.limits import depth_limit_problem, stream_setting_problem
from cryptoflow.symbols import unit_scale

SHARDS_FILE = "ip_shards.yml"
SYMBOLS_FILE = "symbols.yml"
ENV_KEYS: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_REGION": "aws_region",
    "S3_BUCKET": "s3_bucket",
    "S3_ENDPOINT_URL": "s3_endpoint_url",
    "LOG_LEVEL": "log_level",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Numbers must be > 0 unless listed here: a zero interval or capacity is always a typo.
_NON_NEGATIVE = {"jitter", "upload_retries", "weight_limit_per_minute", "upload_interval"}
_SYMBOL_NAME = re.compile(r"^[A-Z0-9]+$")
_MISSING = object()

_converter = cattrs.Converter()


@attrs.define
class _Report:
    """Problems of one file; every message gets the same `file:line: key:` prefix."""

    file: str
    problems: list[str]

    def add(self, line: int | None, key: str, message: str) -> None:
        where = f"{self.file}:{line}" if line else self.file
        self.problems.append(f"{where}: {key}: {message}")


# --- public API ----------------------------------------------------------------------


def load_settings(
    config_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    env_file: Path | None = None,
    uses_s3: bool = True,
) -> Settings:
    """Everything a command needs, validated; raises ConfigError listing every problem.

    `env` replaces os.environ (tests); `.env` is read from the CWD unless `env_file` is
    given, and real environment variables win over it. `uses_s3=False` (`collect
    --simulate`, which stores only under `--output`): S3 enabled without S3_BUCKET is
    not a problem, so a production config tries out on a host without its secrets.
    """
    config_path = Path(config_path)
    if config_path.is_dir():  # its siblings would be looked for beside it: one line only
        raise ConfigError([_config_dir_problem(config_path)])
    problems: list[str] = []
    folder = config_path.parent
    cfg_rep = _Report(str(config_path), problems)
    sym_rep = _Report(str(folder / SYMBOLS_FILE), problems)
    shard_rep = _Report(str(folder / SHARDS_FILE), problems)

    cfg_node = _read_yaml(config_path, cfg_rep)
    sym_node = _read_yaml(folder / SYMBOLS_FILE, sym_rep)
    shard_node = _read_yaml(folder / SHARDS_FILE, shard_rep)

    app = _load_app(cfg_node, cfg_rep) if cfg_node is not _MISSING else None
    symbols = _load_symbols(sym_node, sym_rep) if sym_node is not _MISSING else None
    shards = _load_shards(shard_node, shard_rep, symbols) if shard_node is not _MISSING else []
    environment = _load_env(env, env_file, problems)

    if uses_s3 and app is not None and app.storage.s3.enabled and not environment.s3_bucket:
        s3 = _dig(cfg_node, "storage", "s3")
        cfg_rep.add(
            _key_line(s3, "enabled"),
            "storage.s3.enabled",
            "S3 is enabled but S3_BUCKET is not set, expected S3_BUCKET in the environment or .env",
        )
    if problems:
        raise ConfigError(problems)
    assert app is not None and symbols is not None
    return Settings(
        app=app, shards=shards, symbols=symbols, env=environment, config_path=str(config_path)
    )


def load_symbol_table(path: Path) -> dict[str, SymbolEntry]:
    """`symbols.yml` alone, with the same checks as `load_settings`: for tools that name
    symbols as the collector does (`replay`) but need no other setting; ConfigError with
    file:line otherwise."""
    path = Path(path)
    problems: list[str] = []
    rep = _Report(str(path), problems)
    node = _read_yaml(path, rep)
    table = _load_symbols(node, rep) if node is not _MISSING else None
    if problems:
        raise ConfigError(problems)
    assert table is not None
    return table


def key_location(config_path: Path | str, dotted: str) -> str:
    """`file:line: dotted` for a key of config.yml (`file: dotted` when the key is not
    written there and its default applies): where a check made after loading points."""
    path = Path(config_path)
    node: Any = None
    with contextlib.suppress(OSError, YAMLError, UnicodeDecodeError):
        node = YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    *parents, last = dotted.split(".")
    parent = _dig(node, *parents)
    line = _key_line(parent, last) if isinstance(parent, Mapping) and last in parent else None
    return f"{path}:{line}: {dotted}" if line else f"{path}: {dotted}"


def stale_after_warnings(settings: Settings) -> list[str]:
    """`metrics.stale_after` shorter than a venue's snapshot polls can be apart.

    /healthz judges the snapshot lane of a polled symbol on its own: polls further apart
    than stale_after make a healthy run answer 503 between them (not ready, alerts
    firing). Two polls' responses can be `interval + 2 x jitter +
    request_timeout` apart. A warning, not an error: the run itself collects fine.
    """
    app = settings.app
    stale = app.metrics.stale_after
    reader = app.reader
    out = []
    for exchange in dict.fromkeys(app.cryptoflow.exchanges):
        source = app.source.for_exchange(exchange)
        if not source.snapshots or not any(s.symbols.get(exchange) for s in settings.shards):
            continue
        interval = source.snapshot_interval or reader.snapshot_interval
        worst = interval + 2 * reader.jitter + reader.request_timeout
        if stale > worst:
            continue
        key = f"source.{exchange}" if source.snapshot_interval else "reader"
        out.append(
            f"{key_location(settings.config_path, 'metrics.stale_after')}: {stale:g} s is "
            f"not longer than {exchange}'s snapshot polls can be apart ({worst:g} s = "
            f"{key}.snapshot_interval {interval:g} + 2 x reader.jitter {reader.jitter:g} + "
            f"reader.request_timeout {reader.request_timeout:g}): /healthz would report a "
            f"healthy run stale (503) between polls; expected stale_after > {worst:g}"
        )
    return out


def shard_key_location(config_path: Path | str, shard: str, key: str) -> str:
    """`file:line: shards.<shard>.<key>` in the ip_shards.yml beside `config_path`
    (without the line when it cannot be found): where a check made after loading points."""
    path = Path(config_path).parent / SHARDS_FILE
    dotted = f"shards.{shard}.{key}"
    items: Any = None
    with contextlib.suppress(OSError, YAMLError, UnicodeDecodeError):
        items = _dig(YAML(typ="rt").load(path.read_text(encoding="utf-8")), "shards")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, Mapping) and item.get("name") == shard:
            line = _key_line(item, key) if key in item else _node_line(item)
            return f"{path}:{line}: {dotted}" if line else f"{path}: {dotted}"
    return f"{path}: {dotted}"


def load_environment(
    env: Mapping[str, str] | None = None, env_file: Path | None = None
) -> Environment:
    """Just the environment part (for commands that need no config files)."""
    problems: list[str] = []
    environment = _load_env(env, env_file, problems)
    if problems:
        raise ConfigError(problems)
    return environment


# --- YAML and line numbers -----------------------------------------------------------


def _config_dir_problem(path: Path) -> str:
    """`--config configs` said "configs: file not found" (and the same of the two files
    looked for beside it); the config file is likely inside."""
    inside = path / "config.yml"
    hint = f" ({inside}?)" if inside.is_file() else ""
    return f"{path}: is a directory, expected the config file{hint}"


def _read_yaml(path: Path, rep: _Report) -> Any:
    """The parsed document (None if empty), or _MISSING after recording why not."""
    if path.is_dir():
        rep.problems.append(f"{path}: is a directory, expected a YAML file")
        return _MISSING
    if not path.is_file():
        rep.problems.append(f"{path}: file not found")
        return _MISSING
    try:
        return YAML(typ="rt").load(path.read_text(encoding="utf-8"))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        rep.problems.append(f"{path}{line}: invalid YAML: {what or exc}")
    except (YAMLError, UnicodeDecodeError) as exc:
        rep.problems.append(f"{path}: invalid YAML: {exc}")
    return _MISSING


def _key_line(node: Any, key: Any) -> int | None:
    try:
        return int(node.lc.key(key)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return _node_line(node)


def _item_line(seq: Any, index: int) -> int | None:
    try:
        return int(seq.lc.item(index)[0]) + 1
    except (AttributeError, KeyError, TypeError, IndexError):
        return _node_line(seq)


def _node_line(node: Any) -> int | None:
    lc = getattr(node, "lc", None)
    return int(lc.line) + 1 if lc is not None and lc.line is not None else None


def _dig(node: Any, *keys: str) -> Any:
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


# --- messages ------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the operator wrote it, short."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = (
        repr(value)
        if isinstance(value, str)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
    )
    return text if len(text) <= 40 else text[:37] + "..."


def _did_you_mean(word: str, choices: Iterable[str], what: str) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    if close:
        return f"unknown {what} {str(word)!r}, did you mean {close[0]!r}?"
    return f"unknown {what} {str(word)!r}, expected one of {', '.join(choices)}"


# --- config.yml ----------------------------------------------------------------------


def _load_app(node: Any, rep: _Report) -> AppConfig | None:
    if node is None:
        node = {}
    if not isinstance(node, Mapping):
        rep.add(_node_line(node) or 1, "(top level)", f"got {_show(node)}, expected a mapping")
        return None
    before = len(rep.problems)
    clean = _check_section(node, AppConfig, "", rep)
    _fill_venue_defaults(clean)
    _check_app_rules(node, rep)
    if len(rep.problems) > before:
        return None
    try:
        return _converter.structure(clean, AppConfig)
    except (cattrs.BaseValidationError, TypeError, ValueError) as exc:  # a schema we missed
        rep.add(None, "(config)", f"cannot be structured ({exc}), expected the documented schema")
        return None


def _fill_venue_defaults(clean: dict[str, Any]) -> None:
    """A written `source.<venue>` block gets that venue's own defaults (VENUE_DEFAULTS)
    for the keys it leaves out, not the shared class's: cattrs only knows the latter."""
    source = clean.get("source")
    if not isinstance(source, dict):
        return
    for exchange, defaults in VENUE_DEFAULTS.items():
        block = source.get(exchange)
        if isinstance(block, dict):
            for key, value in defaults.items():
                block.setdefault(key, value)


def _check_section(node: Any, cls: type, path: str, rep: _Report) -> dict[str, Any]:
    """Validate one mapping against an attrs class; return only the values that passed."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in attrs.fields(cls)]
    out: dict[str, Any] = {}
    for key in node:
        dotted = f"{path}.{key}" if path else str(key)
        line = _key_line(node, key)
        if key not in names:
            what = "exchange" if cls is SourceSection else "key"
            rep.add(line, dotted, _did_you_mean(key, names, what))
            continue
        ok, value = _check_value(node[key], hints[key], dotted, line, rep)
        if ok:
            out[key] = value
    return out


def _check_value(value: Any, tp: Any, dotted: str, line: int | None, rep: _Report) -> Any:
    """(ok, cleaned value) for one setting of type `tp`; records what is wrong otherwise."""
    leaf = dotted.rsplit(".", 1)[-1]
    origin = typing.get_origin(tp)
    if attrs.has(tp):
        if not isinstance(value, Mapping):
            rep.add(line, dotted, f"got {_show(value)}, expected a mapping of settings")
            return False, None
        return True, _check_section(value, tp, dotted, rep)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return True, None
        return _check_value(value, args[0], dotted, line, rep)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(str(a) for a in allowed)
            rep.add(line, dotted, f"expected one of {choices}, got {_show(value)}")
            return False, None
        return True, value
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            rep.add(line, dotted, f"expected a list of names, got {_show(value)}")
            return False, None
        return True, list(value)
    if tp is bool:
        if not isinstance(value, bool):
            rep.add(line, dotted, f"expected true or false, got {_show(value)}")
            return False, None
        return True, value
    if tp in (int, float):
        whole = tp is int
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            kind = "a whole number" if whole else "a number"
            rep.add(line, dotted, f"expected {kind}, got {_show(value)}")
            return False, None
        problem = _range_problem(leaf, value)
        if problem:
            rep.add(line, dotted, problem)
            return False, None
        return True, int(value) if whole else float(value)
    if tp is str:
        if not isinstance(value, str):
            rep.add(line, dotted, f"expected a string, got {_show(value)}")
            return False, None
        return True, str(value)
    rep.add(line, dotted, f"unsupported setting type {tp!r}, expected a schema cryptoflow knows")
    return False, None


def _range_problem(leaf: str, value: float) -> str | None:
    # YAML's .nan / .inf are floats: NaN slips through every comparison below (NaN <= 0
    # is false) and an infinite interval or timeout never ends (or breaks the renderers)
    if isinstance(value, float) and not math.isfinite(value):  # (an int: no float cast)
        return f"expected a finite number, got {value}"
    if leaf == "weight_safety":
        return None if 0 < value <= 1 else f"{value} is out of range, expected 0 < share <= 1"
    if leaf == "port":
        ok = 0 <= value <= 65535
        return None if ok else f"{value} is not a port, expected 1..65535 (0 = any free port)"
    if leaf in _NON_NEGATIVE:
        return None if value >= 0 else f"{value} is negative, expected a number >= 0"
    if value <= 0:
        return f"{value} is {'zero' if value == 0 else 'negative'}, expected a number > 0"
    return None


def _check_app_rules(node: Mapping[str, Any], rep: _Report) -> None:
    """Rules that need more than one value's type: venue names, per-venue depths and
    stream choices."""
    exchanges = _dig(node, "cryptoflow", "exchanges")
    if exchanges == []:
        # it passed, and collect then blamed the shards ("no shard lists a symbol for it")
        rep.add(
            _key_line(node["cryptoflow"], "exchanges"),
            "cryptoflow.exchanges",
            f"is an empty list (nothing would be collected), expected one or more of "
            f"{', '.join(EXCHANGES)}",
        )
    if isinstance(exchanges, list):
        first: dict[str, int | None] = {}
        for i, name in enumerate(exchanges):
            line = _item_line(exchanges, i)
            if isinstance(name, str) and name not in EXCHANGES:
                rep.add(line, "cryptoflow.exchanges", _did_you_mean(name, EXCHANGES, "exchange"))
            elif isinstance(name, str) and name in first:
                # a venue listed twice ran twice: every row was stored twice
                before = f" (first on line {first[name]})" if first[name] != line else ""
                rep.add(
                    line,
                    "cryptoflow.exchanges",
                    f"{name} is listed twice{before}, expected each exchange once",
                )
            elif isinstance(name, str):
                first[name] = line
    source = node.get("source")
    if not isinstance(source, Mapping):
        return
    for exchange in EXCHANGES:
        depth = _dig(source, exchange, "depth_limit")
        if isinstance(depth, int) and not isinstance(depth, bool) and depth > 0:
            problem = depth_limit_problem(exchange, depth)
            if problem:
                line = _key_line(source[exchange], "depth_limit")
                rep.add(line, f"source.{exchange}.depth_limit", problem)
        for key, tp in (("stream_speed", str), ("stream_depth", int)):
            value = _dig(source, exchange, key)
            if isinstance(value, tp) and not isinstance(value, bool):  # else: a type problem
                problem = stream_setting_problem(exchange, key, value)
                if problem:
                    rep.add(_key_line(source[exchange], key), f"source.{exchange}.{key}", problem)


# --- symbols.yml ---------------------------------------------------------------------


def _top_list_or_map(node: Any, key: str, rep: _Report) -> Any:
    """The document's one top-level key (`symbols:` / `shards:`), or None after a problem."""
    if not isinstance(node, Mapping) or key not in node:
        got = _show(node) if not isinstance(node, Mapping) else "no such key"
        rep.add(_node_line(node) or 1, key, f"missing ({got}), expected a top-level '{key}:'")
        return None
    for other in node:
        if other != key:
            rep.add(_key_line(node, other), str(other), _did_you_mean(other, [key], "key"))
    return node[key]


def _per(coins: int) -> str:
    return "per coin" if coins == 1 else f"per {coins:,} coins"


def _load_symbols(node: Any, rep: _Report) -> dict[str, SymbolEntry] | None:
    table = _top_list_or_map(node, "symbols", rep)
    if table is None:
        return None
    if not isinstance(table, Mapping):
        rep.add(_key_line(node, "symbols"), "symbols", f"got {_show(table)}, expected a mapping")
        return None
    before = len(rep.problems)
    out: dict[str, SymbolEntry] = {}
    owner: dict[tuple[str, str], str] = {}  # (exchange, venue symbol) -> normalized name
    for name in table:
        line = _key_line(table, name)
        dotted = f"symbols.{name}"
        if not isinstance(name, str) or not _SYMBOL_NAME.match(name):
            rep.add(line, dotted, "bad symbol name, expected upper-case letters/digits (BTCUSDT)")
            continue
        entry = table[name]
        if not isinstance(entry, Mapping):
            rep.add(line, dotted, f"got {_show(entry)}, expected a mapping of exchange: name")
            continue
        venues: dict[str, str | None] = dict.fromkeys(EXCHANGES)
        enabled = True
        for key in entry:
            kline = _key_line(entry, key)
            value = entry[key]
            if key == "enabled":
                if not isinstance(value, bool):
                    rep.add(
                        kline, f"{dotted}.enabled", f"expected true or false, got {_show(value)}"
                    )
                else:
                    enabled = value
            elif key not in EXCHANGES:
                choices = [*EXCHANGES, "enabled"]
                rep.add(kline, f"{dotted}.{key}", _did_you_mean(key, choices, "exchange"))
            elif value is not None and (not isinstance(value, str) or not value.strip()):
                rep.add(
                    kline,
                    f"{dotted}.{key}",
                    f"got {_show(value)}, expected the venue's symbol or null (not listed)",
                )
            else:
                venues[key] = value
                if value is None:
                    continue
                scale, own = unit_scale(value), unit_scale(name)
                if scale != own:
                    hint = f" (name the row {scale}{name})" if own == 1 else ""
                    rep.add(
                        kline,
                        f"{dotted}.{key}",
                        f"{value!r} is quoted {_per(scale)} and {name} {_per(own)}: one "
                        f"row's venues must share a price and size unit{hint}",
                    )
                first = owner.setdefault((key, value), name)
                if first != name:
                    rep.add(
                        kline,
                        f"{dotted}.{key}",
                        f"{value!r} is already mapped to {first}, expected one row per instrument",
                    )
        out[name] = SymbolEntry(name=name, venues=venues, enabled=enabled)
    return out if len(rep.problems) == before else None


# --- ip_shards.yml -------------------------------------------------------------------


def _load_shards(node: Any, rep: _Report, symbols: dict[str, SymbolEntry] | None) -> list[Shard]:
    items = _top_list_or_map(node, "shards", rep)
    if items is None:
        return []
    if not isinstance(items, list) or not items:
        # `[]` said "got a list, expected a list of shards": what is wrong is that it is empty
        problem = (
            "is an empty list, expected at least one shard (name, source_ip, symbols)"
            if isinstance(items, list)
            else f"got {_show(items)}, expected a list of shards"
        )
        rep.add(_key_line(node, "shards"), "shards", problem)
        return []
    shards: list[Shard] = []
    names: dict[str, int | None] = {}
    # first holder, as (label, line, identity): labels and lines alone can repeat
    ips: dict[str, tuple[Any, ...]] = {}  # normalized ip (or "default") -> first shard
    served: dict[tuple[str, str], tuple[Any, ...]] = {}  # (exchange, symbol) -> first shard
    for i, item in enumerate(items):
        line = _item_line(items, i)
        if not isinstance(item, Mapping):
            rep.add(
                line,
                f"shards[{i}]",
                f"got {_show(item)}, expected a mapping (name, source_ip, symbols)",
            )
            continue
        name = item.get("name")
        label = f"shards.{name}" if isinstance(name, str) and name else f"shards[{i}]"
        for key in item:
            if key not in ("name", "source_ip", "symbols"):
                rep.add(
                    _key_line(item, key),
                    f"{label}.{key}",
                    _did_you_mean(key, ("name", "source_ip", "symbols"), "key"),
                )
        if not isinstance(name, str) or not name:
            rep.add(
                _key_line(item, "name") if "name" in item else line,
                f"{label}.name",
                f"got {_show(name)}, expected a shard name",
            )
            name = f"#{i}"
        elif name in names:
            rep.add(
                _key_line(item, "name"),
                f"{label}.name",
                f"{name!r} is used twice (first on line {names[name]}), expected unique names",
            )
        else:
            names[name] = _key_line(item, "name")
        source_ip = _check_ip(item, label, rep, ips)
        symbol_map = _check_shard_symbols(item, label, name, rep, symbols, served)
        shards.append(Shard(name=name, source_ip=source_ip, symbols=symbol_map))
    return shards


def _check_ip(
    item: Mapping[str, Any], label: str, rep: _Report, ips: dict[str, tuple[Any, ...]]
) -> str | None:
    """The shard's source IP (None = default route); two shards may not share one.

    Two shards on the default route would also share one per-IP budget, so that counts
    as a duplicate too; so does an unspecified address (0.0.0.0, ::), which binds the
    same route. An IPv4-mapped IPv6 address (::ffff:10.0.0.5) is its IPv4 address.
    """
    raw = item.get("source_ip")
    line = _key_line(item, "source_ip") if "source_ip" in item else _node_line(item)
    key, what, address = "default", "the default route (null)", None
    if raw is not None:
        if not isinstance(raw, str):
            rep.add(
                line,
                f"{label}.source_ip",
                f"got {_show(raw)}, expected an IP address like '10.0.0.5' or null",
            )
            return None
        try:
            ip = ipaddress.ip_address(raw.strip())
        except ValueError:
            rep.add(
                line,
                f"{label}.source_ip",
                f"{raw!r} is not a valid IP address, expected e.g. '10.0.0.5' or null",
            )
            return None
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        address = str(mapped or ip)
        key = address
        what = address if mapped is None else f"{raw.strip()} (that is {address})"
        if (mapped or ip).is_unspecified:
            # the default route, and bound as such (nothing): binding `::` made every
            # IPv4 connection fail ("address family not supported"), collecting nothing
            key, address = "default", None
            what = f"{raw.strip()} (any address: the default route)"
    first = ips.setdefault(key, (label, line, id(item)))
    if first[2] != id(item):
        rep.add(
            line,
            f"{label}.source_ip",
            f"{what} is already used by {first[0]} (line {first[1]}),"
            " expected one shard per source IP",
        )
    return address


def _check_shard_symbols(
    item: Mapping[str, Any],
    label: str,
    shard: str,
    rep: _Report,
    symbols: dict[str, SymbolEntry] | None,
    served: dict[tuple[str, str], tuple[Any, ...]],
) -> dict[str, list[str]]:
    raw = item.get("symbols")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        rep.add(
            _key_line(item, "symbols"),
            f"{label}.symbols",
            f"got {_show(raw)}, expected exchange: [symbols]",
        )
        return {}
    out: dict[str, list[str]] = {}
    for exchange in raw:
        dotted = f"{label}.symbols.{exchange}"
        eline = _key_line(raw, exchange)
        if exchange not in EXCHANGES:
            rep.add(eline, dotted, _did_you_mean(exchange, EXCHANGES, "exchange"))
            continue
        listed = raw[exchange]
        if listed is None:
            out[exchange] = []
            continue
        if not isinstance(listed, list):
            rep.add(eline, dotted, f"got {_show(listed)}, expected a list of symbols")
            continue
        names: list[str] = []
        for j, sym in enumerate(listed):
            line = _item_line(listed, j)
            if not isinstance(sym, str):
                rep.add(line, dotted, f"got {_show(sym)}, expected a symbol name")
                continue
            if symbols is not None:
                problem = _symbol_problem(sym, exchange, symbols)
                if problem:
                    rep.add(line, dotted, problem)
                    continue
            first = served.setdefault((exchange, sym), (shard, line, id(listed), j))
            if first[2:] != (id(listed), j):
                where = "this shard" if first[0] == shard else f"shard {first[0]!r}"
                rep.add(
                    line,
                    dotted,
                    f"{sym} is already on {where} (line {first[1]}),"
                    " expected each symbol on one shard per exchange",
                )
                continue
            names.append(sym)
        out[exchange] = names
    return out


def _symbol_problem(sym: str, exchange: str, symbols: dict[str, SymbolEntry]) -> str | None:
    entry = symbols.get(sym)
    if entry is None:
        close = difflib.get_close_matches(sym, list(symbols), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"expected a symbol from {SYMBOLS_FILE}"
        return f"unknown symbol {sym!r}, {hint}"
    if not entry.enabled:
        return f"{sym} is disabled in {SYMBOLS_FILE}, expected an enabled symbol"
    if entry.venues.get(exchange) is None:
        return (
            f"{sym} is not listed on {exchange} ({SYMBOLS_FILE} says null),"
            " expected a symbol listed there"
        )
    return None


# --- environment ---------------------------------------------------------------------


def _load_env(
    env: Mapping[str, str] | None, env_file: Path | None, problems: list[str]
) -> Environment:
    """os.environ (or `env`) over `.env`. Values never reach a message: they may be secrets."""
    path = env_file if env_file is not None else Path.cwd() / ".env"
    values: dict[str, str] = {}
    if path.is_file():
        text = _read_dotenv(path, problems)
        if text is not None:
            parsed = dotenv_values(stream=io.StringIO(text))
            values.update({k: v for k, v in parsed.items() if v is not None})
    elif env_file is not None:
        problems.append(f"{env_file}: file not found")
    source = os.environ if env is None else env
    values.update({k: v for k, v in source.items() if k in ENV_KEYS})
    fields = {attr: (values.get(key) or "").strip() or None for key, attr in ENV_KEYS.items()}
    level = fields["log_level"]
    if level is not None:
        if level.upper() not in LOG_LEVELS:
            problems.append(
                f"environment: LOG_LEVEL: {level!r} is not a log level, "
                f"expected one of {', '.join(LOG_LEVELS)}"
            )
        fields["log_level"] = level.upper()
    return Environment(**fields)


def _read_dotenv(path: Path, problems: list[str]) -> str | None:
    """The text of `.env`, or None after recording why not (the bytes are never shown:
    they may be a secret)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problems.append(f"{path}: cannot be read: {exc.strerror or exc}")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problems.append(f"{path}:{line}: not UTF-8 text, expected KEY=value lines in UTF-8")
        return None
