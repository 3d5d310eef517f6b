"""Config loading: shipped files validate; every bad input names file, line and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cryptoflow.cli import app
from cryptoflow.config import load_settings
from cryptoflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "configs" / "config.yml"

SYMBOLS = """\
symbols:
  BTCUSDT: {binance: BTCUSDT, bybit: BTCUSDT, okx: BTC-USDT-SWAP, kucoin: XBTUSDTM}
  ETHUSDT: {binance: ETHUSDT, bybit: ETHUSDT, okx: ETH-USDT-SWAP, kucoin: ETHUSDTM}
  BTCUSDC: {binance: BTCUSDC, bybit: BTCPERP, okx: null, kucoin: XBTUSDCM}
  FTMUSDT: {binance: null, bybit: null, okx: null, kucoin: null, enabled: false}
"""
SHARDS = """\
shards:
  - name: main
    source_ip: null
    symbols:
      binance: [BTCUSDT, ETHUSDT]
"""
CONFIG = """\
reader:
  snapshot_interval: 10
"""


def write(folder: Path, config: str = CONFIG, shards: str = SHARDS, symbols: str = SYMBOLS) -> Path:
    for name, text in (("config.yml", config), ("ip_shards.yml", shards), ("symbols.yml", symbols)):
        if text is not None:
            (folder / name).write_text(text)
    (folder / ".env").touch()  # keep the developer's own .env out of the tests
    return folder / "config.yml"


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=env or {}, env_file=path.parent / ".env")
    return info.value.problems


def load(path: Path, env: dict[str, str] | None = None):
    return load_settings(path, env=env or {}, env_file=path.parent / ".env")


# --- shipped configs -----------------------------------------------------------------


def test_shipped_configs_validate(tmp_path: Path) -> None:
    (tmp_path / ".env").touch()
    settings = load_settings(SHIPPED, env={}, env_file=tmp_path / ".env")
    assert settings.app.source.binance.depth_limit == 1000
    assert (
        len(settings.symbols) == 37
    )  # the 34 coins; BONK, PEPE, SHIB also per 1000 (test_symbols)
    assert [s.name for s in settings.shards] == ["main"]


def test_minimal_config_loads_defaults(tmp_path: Path) -> None:
    settings = load(write(tmp_path))
    assert settings.app.reader.snapshot_interval == 10.0
    assert settings.app.writer.buffer.snapshot_flush_interval == 60.0
    assert settings.shards[0].symbols == {"binance": ["BTCUSDT", "ETHUSDT"]}


def test_cli_validate_shipped_config_exit_0() -> None:
    result = CliRunner().invoke(app, ["validate-config", "--config", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    assert "binance: 33 symbols" in result.output
    assert "storage: local ./data" in result.output


# --- one bad input each, with the right line -----------------------------------------


def test_unknown_key_did_you_mean(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="reader:\n  jitter: 0.5\n  snapshot_intervall: 10\n")
    assert problems(cfg) == [
        f"{cfg}:3: reader.snapshot_intervall: unknown key 'snapshot_intervall',"
        " did you mean 'snapshot_interval'?"
    ]


def test_unknown_top_level_section(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="reader:\n  jitter: 0.5\nstorge:\n  local_path: x\n")
    assert problems(cfg) == [f"{cfg}:3: storge: unknown key 'storge', did you mean 'storage'?"]


def test_wrong_type(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="reader:\n  jitter: 0.5\n  snapshot_interval: abc\n")
    assert problems(cfg) == [f"{cfg}:3: reader.snapshot_interval: expected a number, got 'abc'"]


def test_wrong_types_bool_and_int(tmp_path: Path) -> None:
    text = "processor:\n  verify_book: yes please\nchannels:\n  raw_capacity: 2.5\n"
    cfg = write(tmp_path, config=text)
    assert problems(cfg) == [
        f"{cfg}:2: processor.verify_book: expected true or false, got 'yes please'",
        f"{cfg}:4: channels.raw_capacity: expected a whole number, got 2.5",
    ]


def test_negative_interval_and_zero_capacity(tmp_path: Path) -> None:
    text = "channels:\n  raw_capacity: 0\n\nwriter:\n  buffer:\n    delta_flush_interval: -1\n"
    cfg = write(tmp_path, config=text)
    assert problems(cfg) == [
        f"{cfg}:2: channels.raw_capacity: 0 is zero, expected a number > 0",
        f"{cfg}:6: writer.buffer.delta_flush_interval: -1 is negative, expected a number > 0",
    ]


def test_venue_snapshot_interval_negative(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="source:\n  okx:\n    snapshot_interval: -10\n")
    assert problems(cfg) == [
        f"{cfg}:3: source.okx.snapshot_interval: -10 is negative, expected a number > 0"
    ]


def test_literal_choice(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="logging:\n  level: LOUD\n")
    assert problems(cfg) == [
        f"{cfg}:2: logging.level: expected one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"
    ]


def test_unknown_symbol_in_shard(tmp_path: Path) -> None:
    shards = SHARDS.replace("[BTCUSDT, ETHUSDT]", "[BTCUSDT, ETHUSDX]")
    cfg = write(tmp_path, shards=shards)
    assert problems(cfg) == [
        f"{tmp_path / 'ip_shards.yml'}:5: shards.main.symbols.binance:"
        " unknown symbol 'ETHUSDX', did you mean 'ETHUSDT'?"
    ]


def test_an_empty_or_wrong_shards_list_says_which(tmp_path: Path) -> None:
    """Found by the CLI audit: `shards: []` said "got a list, expected a list of shards"."""
    f = tmp_path / "ip_shards.yml"
    assert problems(write(tmp_path, shards="shards: []\n")) == [
        f"{f}:1: shards: is an empty list, expected at least one shard (name, source_ip, symbols)"
    ]
    assert problems(write(tmp_path, shards="shards: main\n")) == [
        f"{f}:1: shards: got 'main', expected a list of shards"
    ]


def test_unknown_symbol_block_list_line(tmp_path: Path) -> None:
    shards = (
        "shards:\n  - name: main\n    symbols:\n      bybit:\n"
        "        - BTCUSDT\n        - DOGEUSDT\n"
    )
    cfg = write(tmp_path, shards=shards)
    (p,) = problems(cfg)
    assert p.startswith(
        f"{tmp_path / 'ip_shards.yml'}:6: shards.main.symbols.bybit: unknown symbol"
    )


def test_symbol_not_listed_and_disabled(tmp_path: Path) -> None:
    shards = (
        "shards:\n  - name: main\n    symbols:\n      okx: [BTCUSDT, BTCUSDC]\n"
        "      binance:\n        - FTMUSDT\n"
    )
    cfg = write(tmp_path, shards=shards)
    f = tmp_path / "ip_shards.yml"
    assert problems(cfg) == [
        f"{f}:4: shards.main.symbols.okx: BTCUSDC is not listed on okx (symbols.yml says null),"
        " expected a symbol listed there",
        f"{f}:6: shards.main.symbols.binance: FTMUSDT is disabled in symbols.yml,"
        " expected an enabled symbol",
    ]


def test_symbol_on_two_shards(tmp_path: Path) -> None:
    shards = SHARDS + (
        "  - name: second\n    source_ip: 10.0.0.2\n    symbols:\n      binance: [ETHUSDT]\n"
        "      bybit: [ETHUSDT]\n"
    )
    cfg = write(tmp_path, shards=shards)
    assert problems(cfg) == [
        f"{tmp_path / 'ip_shards.yml'}:9: shards.second.symbols.binance: ETHUSDT is already on"
        " shard 'main' (line 5), expected each symbol on one shard per exchange"
    ]


def test_malformed_ip(tmp_path: Path) -> None:
    cfg = write(tmp_path, shards=SHARDS.replace("source_ip: null", "source_ip: 10.0.0.300"))
    assert problems(cfg) == [
        f"{tmp_path / 'ip_shards.yml'}:3: shards.main.source_ip: '10.0.0.300' is not a valid"
        " IP address, expected e.g. '10.0.0.5' or null"
    ]


def test_duplicate_source_ip(tmp_path: Path) -> None:
    shards = (
        "shards:\n  - name: a\n    source_ip: 10.0.0.1\n    symbols: {binance: [BTCUSDT]}\n"
        "  - name: b\n    source_ip: 10.0.0.1\n    symbols: {binance: [ETHUSDT]}\n"
    )
    cfg = write(tmp_path, shards=shards)
    assert problems(cfg) == [
        f"{tmp_path / 'ip_shards.yml'}:6: shards.b.source_ip: 10.0.0.1 is already used by"
        " shards.a (line 3), expected one shard per source IP"
    ]


def test_unknown_exchange_everywhere(tmp_path: Path) -> None:
    config = "cryptoflow:\n  exchanges: [binance, kraken]\nsource:\n  bitmex:\n    deltas: false\n"
    shards = SHARDS.replace("binance: [", "binanse: [")
    cfg = write(tmp_path, config=config, shards=shards)
    assert problems(cfg) == [
        f"{cfg}:4: source.bitmex: unknown exchange 'bitmex',"
        " expected one of binance, bybit, okx, kucoin",
        f"{cfg}:2: cryptoflow.exchanges: unknown exchange 'kraken',"
        " expected one of binance, bybit, okx, kucoin",
        f"{tmp_path / 'ip_shards.yml'}:5: shards.main.symbols.binanse:"
        " unknown exchange 'binanse', did you mean 'binance'?",
    ]


def test_unknown_exchange_in_symbol_table(tmp_path: Path) -> None:
    symbols = SYMBOLS.replace("kucoin: XBTUSDTM}", "kucoin: XBTUSDTM, kukoin: X}")
    cfg = write(tmp_path, symbols=symbols)
    (p,) = problems(cfg)
    assert p.startswith(f"{tmp_path / 'symbols.yml'}:2: symbols.BTCUSDT.kukoin: unknown exchange")


def test_a_row_mixing_quote_scales_is_refused(tmp_path: Path) -> None:
    """Binance 1000PEPEUSDT is priced per 1000 PEPE, OKX PEPE-USDT-SWAP per PEPE: one
    name for both would store prices and sizes 1000x apart under one symbol."""
    symbols = SYMBOLS + (
        "  PEPEUSDT: {binance: 1000PEPEUSDT, okx: PEPE-USDT-SWAP}\n"
        "  1000SHIBUSDT:\n    bybit: SHIB1000USDT\n    kucoin: SHIBUSDTM\n"
    )
    cfg = write(tmp_path, symbols=symbols)
    f = tmp_path / "symbols.yml"
    assert problems(cfg) == [
        f"{f}:6: symbols.PEPEUSDT.binance: '1000PEPEUSDT' is quoted per 1,000 coins and "
        "PEPEUSDT per coin: one row's venues must share a price and size unit "
        "(name the row 1000PEPEUSDT)",
        f"{f}:9: symbols.1000SHIBUSDT.kucoin: 'SHIBUSDTM' is quoted per coin and "
        "1000SHIBUSDT per 1,000 coins: one row's venues must share a price and size unit",
    ]


def test_bad_binance_depth(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="source:\n  binance:\n    depth_limit: 700\n")
    (p,) = problems(cfg)
    assert p.startswith(f"{cfg}:3: source.binance.depth_limit: 700 is not a Binance depth limit")


def test_missing_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, symbols=None)
    assert problems(cfg) == [f"{tmp_path / 'symbols.yml'}: file not found"]


def test_missing_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yml"
    assert f"{cfg}: file not found" in problems(cfg)


def test_invalid_yaml(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="reader:\n  jitter: 1\n bad: 2\n")
    (p,) = problems(cfg)
    assert p.startswith(f"{cfg}:3: invalid YAML: ")


def test_multiple_problems_reported_together(tmp_path: Path) -> None:
    config = "reader:\n  snapshot_interval: -5\n  jiter: 1\n"
    shards = SHARDS.replace("source_ip: null", "source_ip: nope").replace("ETHUSDT]", "XXXUSDT]")
    cfg = write(tmp_path, config=config, shards=shards)
    found = problems(cfg)
    assert len(found) == 4
    assert [p.split(": ")[0] for p in found] == [
        f"{cfg}:2",
        f"{cfg}:3",
        f"{tmp_path / 'ip_shards.yml'}:3",
        f"{tmp_path / 'ip_shards.yml'}:5",
    ]


def test_cli_exit_2_and_problem_lines(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="reader:\n  snapshot_interval: abc\n")
    result = CliRunner(env={"TYPER_USE_RICH": "0"}).invoke(
        app, ["validate-config", "--config", str(cfg)]
    )
    assert result.exit_code == 2
    assert f"{cfg}:2: reader.snapshot_interval: expected a number" in result.output


# --- environment ---------------------------------------------------------------------


def test_s3_enabled_needs_bucket(tmp_path: Path) -> None:
    cfg = write(tmp_path, config="storage:\n  s3:\n    prefix: x\n    enabled: true\n")
    assert problems(cfg) == [
        f"{cfg}:4: storage.s3.enabled: S3 is enabled but S3_BUCKET is not set,"
        " expected S3_BUCKET in the environment or .env"
    ]
    settings = load(cfg, env={"S3_BUCKET": "bucket"})
    assert settings.env.s3_bucket == "bucket"


def test_environment_overrides_dotenv_and_hides_secrets(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    (tmp_path / ".env").write_text(
        "AWS_SECRET_ACCESS_KEY=topsecret\nS3_BUCKET=from-file\nAWS_REGION=eu-west-1\n"
    )
    settings = load(cfg, env={"S3_BUCKET": "from-env", "LOG_LEVEL": "debug"})
    assert settings.env.s3_bucket == "from-env"
    assert settings.env.aws_region == "eu-west-1"
    assert settings.env.aws_secret_access_key == "topsecret"
    assert settings.env.log_level == "DEBUG"
    assert "topsecret" not in repr(settings)


def test_dotenv_from_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(tmp_path)
    (tmp_path / ".env").write_text("S3_BUCKET=cwd-bucket\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("S3_BUCKET", raising=False)
    assert load_settings(cfg, env=dict(os.environ)).env.s3_bucket == "cwd-bucket"


def test_bad_log_level_env(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    assert problems(cfg, env={"LOG_LEVEL": "chatty"}) == [
        "environment: LOG_LEVEL: 'chatty' is not a log level,"
        " expected one of DEBUG, INFO, WARNING, ERROR"
    ]


def test_duplicate_within_shard_and_default_route(tmp_path: Path) -> None:
    shards = (
        "shards:\n  - name: a\n    symbols: {okx: [BTCUSDT, BTCUSDT]}\n"
        "  - name: b\n    source_ip: null\n    symbols: {okx: [ETHUSDT]}\n"
    )
    cfg = write(tmp_path, shards=shards)
    f = tmp_path / "ip_shards.yml"
    assert problems(cfg) == [
        f"{f}:3: shards.a.symbols.okx: BTCUSDT is already on this shard (line 3),"
        " expected each symbol on one shard per exchange",
        f"{f}:5: shards.b.source_ip: the default route (null) is already used by shards.a"
        " (line 2), expected one shard per source IP",
    ]


# --- paths that cannot be used, and the exit codes ----------------------------------------


def _cli(*args: str):
    return CliRunner(env={"TYPER_USE_RICH": "0"}).invoke(app, list(args))


def test_collect_refuses_an_output_folder_it_cannot_write(tmp_path: Path) -> None:
    """Every upload used to fail while the run reported success (exit 0)."""
    (tmp_path / "afile").write_text("x")
    cfg = write(tmp_path, config=f"storage:\n  spool:\n    path: {tmp_path / 'spool'}\n")
    out = tmp_path / "afile" / "data"
    res = _cli("collect", "-c", str(cfg), "-e", "binance", "--simulate", "--output", str(out))
    assert res.exit_code == 2
    assert (
        res.output.strip() == f"error: --output {str(out)!r}: cannot write there: Not a directory"
    )


def test_an_empty_exchanges_list_is_a_config_error_for_validate_and_collect(
    tmp_path: Path,
) -> None:
    """Found by the CLI audit: `cryptoflow.exchanges: []` passed validate-config (exit 0),
    and collect then blamed the shards: "--exchange all: no shard lists a symbol for it"."""
    cfg = write(tmp_path, config="cryptoflow:\n  exchanges: []\n")
    line = (
        f"{cfg}:2: cryptoflow.exchanges: is an empty list (nothing would be collected), "
        "expected one or more of binance, bybit, okx, kucoin"
    )
    for args in (("validate-config",), ("collect", "--simulate", "--duration", "1")):
        res = _cli(*args, "-c", str(cfg))
        assert res.exit_code == 2, res.output
        assert res.output == line + "\n"


def test_a_config_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    """Found by the CLI audit: `--config configs` said "configs: file not found" (and the
    same of symbols.yml and ip_shards.yml, looked for beside it)."""
    folder = tmp_path / "configs"
    folder.mkdir()
    res = _cli("validate-config", "--config", str(folder))
    assert res.exit_code == 2
    assert res.output == f"{folder}: is a directory, expected the config file\n"
    cfg = write(folder)
    for args in (("validate-config",), ("spool", "status"), ("shards", "list")):
        res = _cli(*args, "--config", str(folder))
        assert res.exit_code == 2, res.output
        assert res.output == f"{folder}: is a directory, expected the config file ({cfg}?)\n"
    (folder / "symbols.yml").unlink()
    (folder / "symbols.yml").mkdir()
    assert problems(cfg) == [f"{folder / 'symbols.yml'}: is a directory, expected a YAML file"]


def test_a_log_file_that_cannot_be_opened_names_its_key(tmp_path: Path) -> None:
    config = f"logging:\n  output: {tmp_path / 'afile' / 'x.log'}\n"
    (tmp_path / "afile").write_text("x")
    cfg = write(tmp_path, config=config)
    res = _cli("collect", "-c", str(cfg), "-e", "binance", "--simulate", "--duration", "1")
    assert res.exit_code == 2
    assert res.output.startswith(f"{cfg}:2: logging.output: cannot open ")
    assert "Traceback" not in res.output


def test_debug_adds_the_traceback_but_keeps_the_exit_code(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    for args in (("collect", "-c", str(cfg), "-e", "kraken"),):
        plain, debug = _cli(*args), _cli("--debug", *args)
        assert plain.exit_code == debug.exit_code == 2
        assert "Traceback" not in plain.output and "unknown exchange" in plain.output
        assert "Traceback" in debug.output


def test_duration_must_be_a_finite_positive_number(tmp_path: Path) -> None:
    cfg = write(tmp_path)
    for bad in ("nan", "inf", "-1", "0"):
        res = _cli("collect", "-c", str(cfg), "-e", "binance", "--simulate", "--duration", bad)
        assert res.exit_code == 2, (bad, res.output)
        assert "must be a positive number of seconds" in res.output


def test_data_tools_refuse_an_unknown_exchange_as_a_usage_error(tmp_path: Path) -> None:
    """book said 'no snapshots for kraken/...' (exit 1) where collect says 'unknown'."""
    for args in (
        ("book", str(tmp_path), "-e", "kraken", "-s", "BTCUSDT", "--at", "1"),
        ("inspect", str(tmp_path), "--exchange", "kraken"),
        ("verify", str(tmp_path), "--exchange", "kraken"),
    ):
        res = _cli(*args)
        assert res.exit_code == 2, (args, res.output)
        assert "--exchange 'kraken': unknown exchange; expected one of binance" in res.output


def test_nan_and_infinite_numbers_are_refused(tmp_path: Path) -> None:
    """`.nan` passed every `> 0` check (NaN compares false): the poller crash-looped,
    shutdown ended in an anonymous ExceptionGroup, `.inf` broke the k8s renderer."""
    text = (
        "cryptoflow:\n  shutdown_timeout: .nan\n"
        "reader:\n  snapshot_interval: .inf\n  jitter: .nan\n"
        "metrics:\n  stale_after: -.inf\n"
        "source:\n  okx:\n    weight_safety: .nan\n"
    )
    cfg = write(tmp_path, config=text)
    assert problems(cfg) == [
        f"{cfg}:2: cryptoflow.shutdown_timeout: expected a finite number, got nan",
        f"{cfg}:4: reader.snapshot_interval: expected a finite number, got inf",
        f"{cfg}:5: reader.jitter: expected a finite number, got nan",
        f"{cfg}:7: metrics.stale_after: expected a finite number, got -inf",
        f"{cfg}:10: source.okx.weight_safety: expected a finite number, got nan",
    ]


def test_an_exchange_listed_twice_is_refused(tmp_path: Path) -> None:
    """`exchanges: [binance, binance]` passed and collect ran binance twice: every delta
    and snapshot row was stored twice."""
    cfg = write(
        tmp_path, config="cryptoflow:\n  exchanges:\n    - binance\n    - okx\n    - binance\n"
    )
    assert problems(cfg) == [
        f"{cfg}:5: cryptoflow.exchanges: binance is listed twice (first on line 3),"
        " expected each exchange once"
    ]
    cfg = write(tmp_path, config="cryptoflow:\n  exchanges: [okx, okx]\n")
    assert problems(cfg) == [
        f"{cfg}:2: cryptoflow.exchanges: okx is listed twice, expected each exchange once"
    ]


def test_select_exchanges_never_yields_one_twice(tmp_path: Path) -> None:
    import attrs

    from cryptoflow.runtime import select_exchanges

    settings = load(write(tmp_path))
    service = attrs.evolve(settings.app.cryptoflow, exchanges=["binance", "okx", "binance"])
    settings = attrs.evolve(settings, app=attrs.evolve(settings.app, cryptoflow=service))
    assert select_exchanges(settings, "all") == ["binance", "okx"]


def test_a_dotenv_that_is_not_utf8_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It ended as `error: unexpected UnicodeDecodeError` (exit 1)."""
    cfg = write(tmp_path)
    (tmp_path / ".env").write_bytes(b"LOG_LEVEL=INFO\nS3_BUCKET=b\xe9ucket\n")
    monkeypatch.chdir(tmp_path)  # validate-config reads .env from the CWD
    res = CliRunner(env={"TYPER_USE_RICH": "0"}).invoke(
        app, ["validate-config", "--config", str(cfg)]
    )
    assert res.exit_code == 2
    assert res.output.splitlines() == [
        f"{tmp_path / '.env'}:2: not UTF-8 text, expected KEY=value lines in UTF-8"
    ]


def test_stream_depths_and_speeds_the_venues_do_not_offer_are_refused(tmp_path: Path) -> None:
    """Bybit `stream_depth: 300` silently became 200; any stream_speed string passed."""
    text = (
        "source:\n"
        "  bybit:\n    stream_depth: 300\n"
        "  binance:\n    stream_speed: 250\n"
        "  okx:\n    stream_speed: fast\n    stream_depth: 400\n"
    )
    cfg = write(tmp_path, config=text)
    assert problems(cfg) == [
        f"{cfg}:5: source.binance.stream_speed: expected a string, got 250",
        f"{cfg}:3: source.bybit.stream_depth: 300 is not a Bybit stream depth,"
        " expected one of 1, 50, 200, 1000",
        f"{cfg}:7: source.okx.stream_speed: 'fast' is not a stream speed,"
        " expected one of 100ms, 250ms, 500ms (only Binance reads it)",
        f"{cfg}:8: source.okx.stream_depth: 400 is not a stream depth,"
        " expected one of 1, 50, 200, 1000 (only Bybit reads it)",
    ]
    cfg = write(tmp_path, config="source:\n  binance:\n    stream_speed: 250 ms\n")
    assert problems(cfg) == [
        f"{cfg}:3: source.binance.stream_speed: '250 ms' is not a Binance stream speed,"
        " expected one of 100ms, 250ms, 500ms"
    ]
    ok = "source:\n  binance: {stream_speed: 500ms}\n  bybit: {stream_depth: 1000}\n"
    app_cfg = load(write(tmp_path, config=ok)).app
    assert (app_cfg.source.binance.stream_speed, app_cfg.source.bybit.stream_depth) == (
        "500ms",
        1000,
    )


def test_the_stream_choices_match_the_venue_clients() -> None:
    from cryptoflow.exchanges.bybit import rules as bybit_rules
    from cryptoflow.exchanges.limits import BYBIT_STREAM_DEPTHS

    assert tuple(bybit_rules.WS_DEPTHS) == BYBIT_STREAM_DEPTHS


def test_validate_config_names_a_log_file_collect_could_not_open(tmp_path: Path) -> None:
    """It passed validate-config, then collect exited 2 on it."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling.log").symlink_to(tmp_path / "nowhere" / "x.log")
    for output, why in (
        (tmp_path / "missing" / "cf.log", "No such file or directory"),
        (tmp_path / "dangling.log", "No such file or directory"),  # opened at its target
        (tmp_path / "afile" / "cf.log", "Not a directory"),
        (tmp_path, "Is a directory"),
    ):
        cfg = write(tmp_path, config=f"reader:\n  jitter: 0.5\nlogging:\n  output: {output}\n")
        res = _cli("validate-config", "-c", str(cfg))
        assert res.exit_code == 2, res.output
        assert f"{cfg}:4: logging.output: cannot open {str(output)!r}: {why}" in res.output
        collect = _cli("collect", "-c", str(cfg), "-e", "binance", "--simulate", "--duration", "1")
        assert collect.exit_code == 2
        assert collect.output.startswith(f"{cfg}:4: logging.output: cannot open ")
    cfg = write(tmp_path, config=f"logging:\n  output: {tmp_path / 'logs.txt'}\n")
    assert _cli("validate-config", "-c", str(cfg)).exit_code == 0
    assert not (tmp_path / "logs.txt").exists()  # checked, not created


def test_validate_config_names_a_local_path_collect_could_not_write(tmp_path: Path) -> None:
    """Found by the CLI audit: `storage.local_path` a file passed validate-config (exit 0)
    and collect then refused it (exit 2). Both give the same line now; validate creates
    nothing, and with S3 on the local path is not used, so not checked."""
    (tmp_path / "afile").write_text("x")
    spool = tmp_path / "spool"
    for local in (tmp_path / "afile", tmp_path / "afile" / "data"):
        config = f"storage:\n  local_path: {local}\n  spool:\n    path: {spool}\n"
        cfg = write(tmp_path, config=config)
        line = f"{cfg}:2: storage.local_path: cannot write there: Not a directory"
        res = _cli("validate-config", "-c", str(cfg))
        assert res.exit_code == 2, res.output
        assert res.stderr == line + "\n"
        # (not `--simulate`: it stores only under `--output`; collect refuses before any venue)
        collect = _cli("collect", "-c", str(cfg), "-e", "binance", "--duration", "1")
        assert collect.exit_code == 2 and collect.output == line + "\n"
    fresh = tmp_path / "new" / "data"
    cfg = write(tmp_path, config=f"storage:\n  local_path: {fresh}\n  spool:\n    path: {spool}\n")
    assert _cli("validate-config", "-c", str(cfg)).exit_code == 0
    assert not (tmp_path / "new").exists()  # checked, not created
    s3_on = f"storage:\n  local_path: {tmp_path / 'afile'}\n  s3:\n    enabled: true\n"
    cfg = write(tmp_path, config=s3_on + f"  spool:\n    path: {spool}\n")
    runner = CliRunner(env={"TYPER_USE_RICH": "0", "S3_BUCKET": "bkt"})
    res = runner.invoke(app, ["validate-config", "-c", str(cfg)])
    assert res.exit_code == 0, res.output


def test_snapshot_polls_further_apart_than_stale_after_are_warned(tmp_path: Path) -> None:
    """A healthy run answered /healthz 503 between polls (audit: slowpoll_test.sh:
    binance polled every 8 s, stale_after 3 s) and nothing said so beforehand."""
    config = (
        "reader:\n  snapshot_interval: 10\n  jitter: 0.5\n  request_timeout: 4\n"
        "source:\n  binance:\n    snapshot_interval: 8\n"
        "metrics:\n  enabled: true\n  stale_after: 14\n"
    )
    shards = SHARDS.replace(
        "binance: [BTCUSDT, ETHUSDT]", "binance: [BTCUSDT]\n      okx: [ETHUSDT]"
    )
    cfg = write(tmp_path, config=config, shards=shards)
    okx = (
        f"warning: {cfg}:10: metrics.stale_after: 14 s is not longer than okx's snapshot polls"
        " can be apart (15 s = reader.snapshot_interval 10 + 2 x reader.jitter 0.5 +"
        " reader.request_timeout 4): /healthz would report a healthy run stale (503) between"
        " polls; expected stale_after > 15"
    )
    for args in (["validate-config"], ["shards", "list"], ["shards", "list", "--format", "k8s"]):
        res = _cli(*args, "-c", str(cfg))
        assert res.exit_code == 0, (args, res.output)
        assert [w for w in res.stderr.splitlines() if "stale_after" in w] == [okx]
    # binance's polls can be 8 + 2 x 0.5 + 4 = 13 s apart
    cfg.write_text(config.replace("stale_after: 14", "stale_after: 13"))
    lines = [w for w in _cli("validate-config", "-c", str(cfg)).stderr.splitlines() if "stale" in w]
    assert [w.split("(")[1].split(")")[0] for w in lines] == [
        "13 s = source.binance.snapshot_interval 8 + 2 x reader.jitter 0.5 +"
        " reader.request_timeout 4",
        "15 s = reader.snapshot_interval 10 + 2 x reader.jitter 0.5 + reader.request_timeout 4",
    ]
    cfg.write_text(config.replace("stale_after: 14", "stale_after: 15.5"))
    assert "stale_after" not in _cli("validate-config", "-c", str(cfg)).stderr


def _differences(a, b, path: str = "") -> list[str]:
    import attrs

    out = []
    for f in attrs.fields(type(a)):
        x, y = getattr(a, f.name), getattr(b, f.name)
        dotted = f"{path}.{f.name}" if path else f.name
        if attrs.has(type(x)):
            out.extend(_differences(x, y, dotted))
        elif x != y:
            out.append(f"{dotted}: {x!r} vs {y!r}")
    return out


def test_the_shipped_config_spells_out_the_code_defaults(tmp_path: Path) -> None:
    """config.yml says every knob is spelled with its default, but dropping
    `upload_interval` gave 0 (one S3 object per flush, not per minute) and a Bybit block
    without `depth_limit` asked for 1000 levels of a venue that serves 500."""
    from cryptoflow.config_schema import AppConfig

    (tmp_path / ".env").touch()
    shipped = load_settings(SHIPPED, env={}, env_file=tmp_path / ".env").app
    # the one commented exception: 33 symbols x 1000 levels do not fit one IP at 10 s
    assert _differences(AppConfig(), shipped) == ["source.binance.snapshot_interval: None vs 25.0"]
    assert "except source.binance.snapshot_interval" in SHIPPED.read_text().splitlines()[1]


def test_a_written_venue_block_keeps_that_venues_own_defaults(tmp_path: Path) -> None:
    text = "source:\n  bybit:\n    deltas: false\n  binance:\n    deltas: false\n"
    source = load(write(tmp_path, config=text)).app.source
    assert (source.bybit.depth_limit, source.binance.depth_limit) == (500, 1000)
    assert load(write(tmp_path, config="")).app.source.bybit.depth_limit == 500
    assert load(write(tmp_path, config="")).app.storage.upload_interval == 60.0


def test_source_ips_that_are_the_same_route_are_duplicates(tmp_path: Path) -> None:
    """0.0.0.0 next to a null shard (same default route, same per-IP budget) and
    ::ffff:10.0.0.5 next to 10.0.0.5 (the same address) both passed."""
    shard = "  - name: {n}\n    source_ip: {ip}\n    symbols: {{binance: [{s}]}}\n"
    f = tmp_path / "ip_shards.yml"
    for first, second, what in (
        ("null", "0.0.0.0", "0.0.0.0 (any address: the default route)"),
        ("'::'", "null", "the default route (null)"),
        ("10.0.0.5", "'::ffff:10.0.0.5'", "::ffff:10.0.0.5 (that is 10.0.0.5)"),
        ("'::ffff:10.0.0.5'", "10.0.0.5", "10.0.0.5"),
        ("0.0.0.0", "'::ffff:0.0.0.0'", "::ffff:0.0.0.0 (any address: the default route)"),
    ):
        shards = (
            "shards:\n"
            + shard.format(n="a", ip=first, s="BTCUSDT")
            + shard.format(n="b", ip=second, s="ETHUSDT")
        )
        cfg = write(tmp_path, shards=shards)
        assert problems(cfg) == [
            f"{f}:6: shards.b.source_ip: {what} is already used by shards.a (line 3),"
            " expected one shard per source IP"
        ], (first, second)
    one = "shards:\n" + shard.format(n="a", ip="'::ffff:10.0.0.5'", s="BTCUSDT")
    assert load(write(tmp_path, shards=one)).shards[0].source_ip == "10.0.0.5"
    # an unspecified address is the default route, bound as such: binding `::` made
    # every IPv4 connection fail (a run that collected nothing)
    for ip in ("'::'", "0.0.0.0", "'::ffff:0.0.0.0'"):
        one = "shards:\n" + shard.format(n="a", ip=ip, s="BTCUSDT")
        assert load(write(tmp_path, shards=one)).shards[0].source_ip is None, ip


def test_a_huge_integer_is_a_config_error_not_a_crash(tmp_path: Path) -> None:
    """The finite-number check cast every int to float: a 400-digit port crashed the
    loader (OverflowError, exit 1) instead of naming the key."""
    cfg = write(tmp_path, config="metrics:\n  port: " + "9" * 400 + "\n")
    (problem,) = problems(cfg)
    assert "metrics.port:" in problem and "is not a port" in problem


def test_a_source_ip_this_host_does_not_have_is_named(tmp_path: Path) -> None:
    """192.0.2.1 (TEST-NET-1: on no host) passed validate-config; collect then failed
    every connection of that shard, forever, with warnings naming only the venue."""
    shards = (
        "shards:\n  - name: main\n    source_ip: null\n    symbols: {binance: [BTCUSDT]}\n"
        "  - name: lo2\n    source_ip: 127.0.0.2\n    symbols: {binance: [BTCUSDC]}\n"
        "  - name: eip2\n    source_ip: 192.0.2.1\n    symbols: {binance: [ETHUSDT]}\n"
    )
    cfg = write(tmp_path, shards=shards)
    line = (
        f"{tmp_path / 'ip_shards.yml'}:9: shards.eip2.source_ip: 192.0.2.1 is not usable on"
        " this host (binding it: Cannot assign requested address), expected an address of"
        " this host: collect here would fail every connection of this shard"
    )
    res = _cli("validate-config", "-c", str(cfg))
    assert res.exit_code == 0, res.output  # the config may be meant for another node
    assert [w for w in res.stderr.splitlines() if "source_ip" in w] == [f"warning: {line}"]


def test_online_check_refuses_a_source_ip_this_host_does_not_have(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptoflow.tools import validate

    monkeypatch.setattr(validate, "check_online", lambda settings: [])  # no venue reached
    shards = (
        "shards:\n  - name: eip2\n    source_ip: 192.0.2.1\n    symbols: {binance: [ETHUSDT]}\n"
    )
    cfg = write(tmp_path, shards=shards)
    res = _cli("validate-config", "--online", "-c", str(cfg))
    assert res.exit_code == 2, res.output
    assert f"{tmp_path / 'ip_shards.yml'}:3: shards.eip2.source_ip: 192.0.2.1 is not usable" in (
        res.stderr
    )
    assert not [w for w in res.stderr.splitlines() if w.startswith("warning: ") and "eip2" in w]
