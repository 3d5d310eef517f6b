"""Logging: readable lines in a terminal, JSON lines for machines; secrets never printed.

`logging.format: json` gives one JSON object per line (ts, level, logger, msg, exc) for
log shippers; `console` a short human line. Whatever the format, every known secret value
(AWS keys) is replaced by `***` before a record is written, in messages and tracebacks.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Iterable
from typing import Any

import orjson


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: Iterable[str | None]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self._redact(record.getMessage()), None
            if record.exc_info:  # the traceback is text too: format it here, redacted
                text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
                record.exc_text, record.exc_info = self._redact(text), None
        return True

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # formatted (and redacted) by RedactSecrets
            doc["exc"] = record.exc_text
        return orjson.dumps(doc).decode()


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")


class StdStreamHandler(logging.StreamHandler):
    """Writes to whatever `sys.stdout`/`sys.stderr` is when a record is written.

    Why: a plain StreamHandler keeps the stream object it was given. When something
    swaps the process's stderr for a while (a test runner's CLI capture, an embedding
    tool) and closes it, every later record failed with "I/O operation on closed file";
    this handler follows the swap, as `logging.lastResort` does."""

    def __init__(self, name: str) -> None:
        logging.Handler.__init__(self)
        self._name = name

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.setStream; the name decides
        pass


def setup_logging(
    *,
    level: str = "INFO",
    fmt: str = "console",
    output: str = "stderr",
    debug: bool = False,
    secrets: Iterable[str | None] = (),
    console: Any = None,
) -> None:
    """Configure the root logger. With `console` (a rich Console showing the live status
    table) terminal log lines go through it, so they print above the table, not into it.

    `fmt="auto"` picks readable lines when the output is a terminal and JSON lines
    otherwise, so a service's logs (systemd, Docker, Kubernetes, a file) are structured
    without anyone remembering to switch the format."""
    if fmt == "auto":
        fmt = "console" if _is_terminal(output) else "json"
    if console is not None and fmt == "console" and output in ("stderr", "stdout", ""):
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=console, show_path=False, rich_tracebacks=False, markup=False
        )
        handler.addFilter(RedactSecrets(secrets))
        _install(handler, level, debug)
        return
    if output in ("stdout", "stderr", ""):
        handler = StdStreamHandler(output or "stderr")
    else:
        handler = logging.FileHandler(output, encoding="utf-8")
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    handler.addFilter(RedactSecrets(secrets))
    _install(handler, level, debug)


def _install(handler: logging.Handler, level: str, debug: bool) -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel("DEBUG" if debug else level.upper())
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "trio-websocket"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _is_terminal(output: str) -> bool:
    stream = {"stdout": sys.stdout, "stderr": sys.stderr, "": sys.stderr}.get(output)
    return bool(stream is not None and stream.isatty())
