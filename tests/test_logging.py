"""Logging: auto format (terminal vs not), JSON lines, secrets redacted."""

from __future__ import annotations

import io
import logging
import sys

import orjson

from cryptoflow.ops.logging import setup_logging


def _capture(monkeypatch, *, tty: bool, fmt: str, secrets=()):
    buf = io.StringIO()
    buf.isatty = lambda: tty  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", buf)
    setup_logging(level="INFO", fmt=fmt, output="stderr", secrets=secrets)
    return buf


def test_auto_is_json_lines_when_not_a_terminal(monkeypatch):
    buf = _capture(monkeypatch, tty=False, fmt="auto", secrets=["AKIASECRETKEY123"])
    logging.getLogger("cryptoflow.test").info("uploading with key %s", "AKIASECRETKEY123")
    doc = orjson.loads(buf.getvalue().strip().splitlines()[-1])
    assert doc["level"] == "INFO" and doc["logger"] == "cryptoflow.test"
    assert doc["msg"] == "uploading with key ***"


def test_secrets_are_redacted_in_tracebacks_too(monkeypatch):
    for fmt, tty in (("json", False), ("console", True)):
        buf = _capture(monkeypatch, tty=tty, fmt=fmt, secrets=["SEKRETmarkerXYZ987"])
        try:
            raise RuntimeError("signature mismatch for SEKRETmarkerXYZ987")
        except RuntimeError:
            logging.getLogger("cryptoflow.test").exception("upload failed")
        out = buf.getvalue()
        assert "SEKRETmarkerXYZ987" not in out, fmt
        assert "RuntimeError: signature mismatch for ***" in out, fmt


def test_auto_is_readable_on_a_terminal(monkeypatch):
    buf = _capture(monkeypatch, tty=True, fmt="auto")
    logging.getLogger("cryptoflow.test").warning("binance/BTCUSDT: gap")
    line = buf.getvalue().strip().splitlines()[-1]
    assert "WARNING" in line and "binance/BTCUSDT: gap" in line
    assert not line.startswith("{")


def test_log_lines_follow_a_swapped_stderr_and_never_hit_a_closed_one(monkeypatch):
    first = _capture(monkeypatch, tty=False, fmt="console")
    logging.getLogger("cryptoflow.test").warning("one")
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)  # e.g. a CLI test runner's capture ended
    first.close()
    logging.getLogger("cryptoflow.test").warning("two")
    assert "two" in later.getvalue() and "Logging error" not in later.getvalue()
