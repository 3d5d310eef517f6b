"""Typer commands only: parse arguments, call into the package, map errors to exit codes.

Exit codes: 0 ok, 1 a check found problems (verify) or the run failed, 2 bad config or
arguments (also a configured path that cannot be used), 130 interrupted. Errors print as
one line; `--debug` adds the traceback and keeps the exit code.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from cryptoflow.errors import ConfigError, CryptoflowError, UsageError, single_error_unwrapped

app = typer.Typer(
    name="cryptoflow",
    help="Record crypto futures order books (REST snapshots + WebSocket diffs) as Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
shards_app = typer.Typer(help="IP shards: which source IP serves which symbols.")
spool_app = typer.Typer(help="The local spool of files waiting for upload.")
app.add_typer(shards_app, name="shards")
app.add_typer(spool_app, name="spool")

_state: dict[str, bool] = {"debug": False}

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="config.yml; ip_shards.yml and symbols.yml beside it"),
]
DEFAULT_CONFIG = Path("configs/config.yml")


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _fail(code: int, *lines: str) -> typer.Exit:
    """Print the error lines (and, with --debug, the traceback first); the exit code is
    the same either way."""
    if _state["debug"]:
        traceback.print_exc()
    for line in lines:
        typer.echo(line, err=True)
    return typer.Exit(code)


def _run(fn: Callable[[], Any]) -> None:
    """Run a command body and turn errors into one line + exit code (traceback: --debug).

    A nursery's group of one error (or of nothing but Ctrl-C) counts as that error."""
    try:
        with single_error_unwrapped():
            code = fn()
    except ConfigError as exc:
        raise _fail(2, *exc.problems) from None
    except UsageError as exc:
        raise _fail(2, f"error: {exc}") from None
    except CryptoflowError as exc:
        raise _fail(1, f"error: {exc}") from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except OSError as exc:  # a path the system refuses (log file, spool folder...)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in str(exc) else ""
        raise _fail(1, f"error: {exc}{where}") from None
    except Exception as exc:
        hint = "" if _state["debug"] else " (run with --debug for the traceback)"
        raise _fail(1, f"error: unexpected {type(exc).__name__}: {exc}{hint}") from None
    raise typer.Exit(int(code or 0))


@app.command("validate-config")
def validate_config(
    config: ConfigOpt = DEFAULT_CONFIG,
    online: Annotated[
        bool, typer.Option(help="Also check every symbol against the venues' instrument lists.")
    ] = False,
) -> None:
    """Check config.yml, ip_shards.yml, symbols.yml and the environment; print a summary."""
    from cryptoflow.tools import validate

    _run(lambda: validate.run(config, online=online))


@shards_app.command("list")
def shards_list(
    config: ConfigOpt = DEFAULT_CONFIG,
    exchange: Annotated[str | None, typer.Option(help="Only this venue.")] = None,
    format: Annotated[str, typer.Option(help="table | k8s | compose")] = "table",
) -> None:
    """Each shard's symbols and the REST budget it will spend per minute, per venue."""
    from cryptoflow.tools import shards

    _run(lambda: shards.run(config, exchange=exchange, fmt=format))


@app.command()
def collect(
    exchange: Annotated[
        str, typer.Option("--exchange", "-e", help="binance | bybit | okx | kucoin | all")
    ] = "all",
    config: ConfigOpt = DEFAULT_CONFIG,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Local output folder (default: storage.local_path; required with --simulate)"
        ),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop cleanly after this many seconds.")
    ] = None,
    simulate: Annotated[
        bool,
        typer.Option(
            help="Start the built-in exchange simulator on 127.0.0.1 and use it; its made-up "
            "books are stored only under --output DIR (spool: DIR.spool beside it)."
        ),
    ] = False,
    shard: Annotated[
        list[str] | None, typer.Option(help="Run only these shards (repeatable).")
    ] = None,
    status: Annotated[
        bool | None,
        typer.Option(
            "--status/--no-status", help="Live status table (default: on when stdout is a TTY)."
        ),
    ] = None,
) -> None:
    """Record order books until Ctrl-C / SIGTERM (or --duration)."""
    from cryptoflow import runtime

    _run(
        lambda: runtime.run_collect(
            config_path=config,
            exchange=exchange,
            output=output,
            duration=duration,
            simulate=simulate,
            shards=shard or [],
            debug=_state["debug"],
            status=status,
        )
    )


@app.command()
def replay(
    exchange: Annotated[str, typer.Option("--exchange", "-e")],
    input: Annotated[
        Path, typer.Option("--input", "-i", help="Recording: .jsonl, .jsonl.gz or .jsonl.zst")
    ],
    output: Annotated[Path, typer.Option(help="Output folder")] = Path("./replay-data"),
    instruments: Annotated[
        Path | None,
        typer.Option(
            help="OKX/KuCoin: the venue's instruments list saved as JSON (contract sizes)"
        ),
    ] = None,
    multiplier: Annotated[
        list[str] | None,
        typer.Option(
            help="OKX/KuCoin: SYMBOL=VALUE, base units per contract (repeatable; wins over "
            "--instruments)"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="config.yml whose symbols.yml names the stored symbols, as collect does "
            "(default: configs/config.yml when it exists)",
        ),
    ] = None,
) -> None:
    """Re-normalize a recording through the same parse + book-sync + flatten code.

    OKX/KuCoin contract sizes: a raw capture carries them, else --instruments or --multiplier."""
    from cryptoflow.tools import replay as replay_tool

    _run(
        lambda: replay_tool.run(
            exchange=exchange,
            input_path=input,
            output=output,
            instruments=instruments,
            multipliers=multiplier or (),
            symbols=replay_tool.symbol_table(config, default=DEFAULT_CONFIG),
        )
    )


PathArg = Annotated[
    str,
    typer.Argument(
        help="Data root: a local folder or s3://bucket/prefix (credentials, region and "
        "endpoint from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, S3_ENDPOINT_URL)"
    ),
]
LocalPathArg = Annotated[
    str, typer.Argument(help="Data root: a local folder (s3:// is refused: local trees only)")
]


@app.command()
def inspect(
    path: PathArg,
    exchange: Annotated[str | None, typer.Option(help="Only this venue.")] = None,
    symbol: Annotated[str | None, typer.Option(help="Only this symbol.")] = None,
    start: Annotated[
        str | None, typer.Option("--from", help="ISO 8601 UTC or epoch ms (inclusive)")
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO 8601 UTC or epoch ms")] = None,
) -> None:
    """Coverage per dataset/exchange/symbol/hour: files, rows, times, gaps, holes."""
    from cryptoflow.tools import inspect as inspect_tool

    _run(lambda: inspect_tool.run(path, exchange=exchange, symbol=symbol, start=start, end=end))


@app.command()
def verify(
    path: PathArg,
    exchange: Annotated[str | None, typer.Option(help="Only this venue.")] = None,
    symbol: Annotated[str | None, typer.Option(help="Only this symbol.")] = None,
) -> None:
    """Re-check stored deltas' continuity and snapshots' order; exit 1 on problems."""
    from cryptoflow.tools import verify as verify_tool

    _run(lambda: verify_tool.run(path, exchange=exchange, symbol=symbol))


@app.command()
def book(
    path: PathArg,
    exchange: Annotated[str, typer.Option("--exchange", "-e")],
    symbol: Annotated[str, typer.Option("--symbol", "-s")],
    at: Annotated[str, typer.Option(help="ISO 8601 UTC (2026-01-02T03:04:05.678Z) or epoch ms")],
    depth: Annotated[int, typer.Option(min=1, help="Levels per side")] = 10,
    output: Annotated[
        Path | None, typer.Option(help="Write .parquet or .csv instead of printing")
    ] = None,
) -> None:
    """Rebuild the book at a moment from the nearest snapshot plus deltas."""
    from cryptoflow.tools import book as book_tool

    _run(lambda: book_tool.run(path, exchange, symbol, at, depth=depth, output=output))


@app.command()
def compact(
    path: LocalPathArg,
    before_hour: Annotated[
        str | None, typer.Option(help="Only hours before this (ISO 8601 or epoch ms)")
    ] = None,
) -> None:
    """Merge the small files of closed hours into one file per partition hour.

    Runs on local trees only (S3 has no atomic rename); an s3:// path is refused.
    """
    from cryptoflow.tools import compact as compact_tool

    _run(lambda: compact_tool.run(path, before_hour=before_hour))


@spool_app.command("status")
def spool_status(config: ConfigOpt = DEFAULT_CONFIG) -> None:
    """Files and bytes waiting in the spool."""
    from cryptoflow.tools import spool_cmd

    _run(lambda: spool_cmd.status(config))


@spool_app.command("flush")
def spool_flush(
    config: ConfigOpt = DEFAULT_CONFIG,
    output: Annotated[Path | None, typer.Option(help="Local output folder")] = None,
) -> None:
    """Upload (or move) every spooled file now."""
    from cryptoflow.tools import spool_cmd

    _run(lambda: spool_cmd.flush(config, output=output))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
