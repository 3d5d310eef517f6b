"""Shape checks shared by the venue parsers.

Every venue says "this payload is not what the docs promise" the same way: a
`MalformedMessage` that names the exchange, the symbol when known, and the field. The
parsers stay pure; this module only checks types and builds those errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson

from cryptoflow.errors import MalformedMessage, RateLimited, RequestRejected, ServerError
from cryptoflow.models import Level

#: The signed 64-bit range every integer field must fit. Ids and times end up in Int64
#: columns (`models.py`), and a bigger value would only fail at the writer's compaction,
#: for the whole flush rather than for the one message that carried it; so the parse
#: edge calls it malformed (`Fields.int`, and Binance's own `_int`, share these bounds).
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

#: The window every event, transaction and snapshot time from a venue must lie in, in ms
#: since the epoch: [2000-01-01, 2100-01-01) UTC. A time fitting Int64 but centuries off
#: (Binance `E=300000000000000`, year 11476) has no hour partition the storage layer can
#: name, and one such row used to stall every symbol's journal split; no venue ran before
#: 2000, and a real time will not reach 2100 in this code's life. So the parse edge calls
#: it malformed, like a value beyond Int64. The batch readers (`pipeline/batch.py`,
#: `exchanges/<venue>/batch.py`) check the same window and leave a body or frame outside
#: it to the checked parser.
TIME_MIN_MS: Final = 946_684_800_000  # 2000-01-01T00:00:00Z
TIME_MAX_MS: Final = 4_102_444_800_000  # 2100-01-01T00:00:00Z, excluded
TIME_WINDOW: Final = "2000-01-01 .. 2100-01-01 UTC"


def check_time(value: int, ms: int, what: str, *, exchange: str, symbol: str = "") -> int:
    """`ms` (the time `value` read as ms) if it is in [`TIME_MIN_MS`, `TIME_MAX_MS`), else
    a MalformedMessage naming `what` (e.g. "field 'E'") and the value as sent."""
    if TIME_MIN_MS <= ms < TIME_MAX_MS:
        return ms
    shown = f"{value!r}" if ms == value else f"{value!r} ({ms} ms)"
    raise MalformedMessage(
        f"{what} is {shown}: not a time within {TIME_WINDOW}", exchange=exchange, symbol=symbol
    )


def plain_success(body: bytes, prefix: bytes, code_key: bytes) -> bool:
    """True when a REST body is certainly not an error: it begins with the venue's success
    `prefix`, names `code_key` (e.g. `b'"retCode"'`) only there and holds no backslash, so
    no later key decodes to the code either (JSON parsers keep the last of duplicated
    keys). Such a body can wait for the writer's flush unparsed (`pipeline/bodies.py`);
    any other, every error and throttle included, must be parsed when it arrives."""
    return body.startswith(prefix) and body.count(code_key) == 1 and b"\\" not in body


class Fields:
    """The checks, bound to one exchange's name for the error messages."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange

    def malformed(self, what: str, symbol: str = "") -> MalformedMessage:
        return MalformedMessage(what, exchange=self.exchange, symbol=symbol)

    def loads(self, raw: bytes | str, symbol: str = "") -> Any:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise self.malformed(f"not JSON: {e}", symbol) from None

    def levels(self, raw: Any, field: str, symbol: str) -> list[Level]:
        """`[["price", "size", ...], ...]` -> (price, size) strings; extra elements (OKX's
        deprecated field and order count) are dropped."""
        if type(raw) is not list:
            raise self.malformed(f"field {field!r} is not a list", symbol)
        try:
            out = [(lv[0], lv[1]) for lv in raw if type(lv) is list]
            if len(out) != len(raw):  # a level that is not a list (a string would index)
                raise TypeError
        except (IndexError, KeyError, TypeError):
            raise self.malformed(
                f"field {field!r} has a level that is not [price, size, ...]", symbol
            ) from None
        for p, s in out:
            if type(p) is not str or type(s) is not str:
                raise self.malformed(
                    f"field {field!r} has a non-string price or size: {[p, s]}", symbol
                )
        return out

    def int(
        self, obj: Any, field: str, symbol: str, *, where: str = "", lo: int = INT64_MIN
    ) -> int:
        """An integer field; venues send ids and times as JSON ints or decimal strings.

        It must lie in [`lo`, `INT64_MAX`] (see `INT64_MIN`). `lo` is raised to
        `INT64_MIN + 1` for an id the venue's rules decrement (`prev = id - 1`), so the
        derived id fits as well."""
        try:
            v = obj[field]
        except (KeyError, TypeError):
            raise self.malformed(f"missing field {where}{field!r}", symbol) from None
        if type(v) is not int:
            if type(v) is not str:
                raise self.malformed(f"field {where}{field!r} is not an integer: {v!r}", symbol)
            try:
                v = int(v)
            except ValueError:
                raise self.malformed(
                    f"field {where}{field!r} is not an integer: {v!r}", symbol
                ) from None
        if lo <= v <= INT64_MAX:
            return v
        if INT64_MIN <= v < lo:  # fits, but the id before it would not
            raise self.malformed(
                f"field {where}{field!r} is {v!r}: the id before it would not fit in 64 bits",
                symbol,
            )
        raise self.malformed(f"field {where}{field!r} is out of the 64-bit range: {v!r}", symbol)

    def opt_int(self, obj: Any, field: str, symbol: str, *, where: str = "") -> int | None:
        if obj.get(field) is None:
            return None
        return self.int(obj, field, symbol, where=where)

    def time(
        self,
        obj: Any,
        field: str,
        symbol: str,
        *,
        where: str = "",
        to_ms: Callable[[int], int] | None = None,
    ) -> int:
        """An event/transaction/snapshot time in ms: an integer field (`int`), converted by
        `to_ms` when the venue sends another unit (KuCoin's ns), within `TIME_MIN_MS`.."""
        v = self.int(obj, field, symbol, where=where)
        ms = to_ms(v) if to_ms is not None else v
        if TIME_MIN_MS <= ms < TIME_MAX_MS:  # the common case without a call (every diff)
            return ms
        return check_time(v, ms, f"field {where}{field!r}", exchange=self.exchange, symbol=symbol)

    def opt_time(self, obj: Any, field: str, symbol: str, *, where: str = "") -> int | None:
        if obj.get(field) is None:
            return None
        return self.time(obj, field, symbol, where=where)

    def check_body_code(
        self,
        obj: Any,
        symbol: str,
        *,
        field: str,
        ok: Any,
        message_field: str,
        rate_limited: Any,
        server_errors: Any,
        retry_after: float,
        as_text: bool = False,
    ) -> None:
        """Raise what an error code in an HTTP-200 body stands for (Bybit `retCode`, OKX
        `code`, KuCoin `code`): a throttle, a server-side failure, or a rejected request.

        A code that is neither a JSON integer nor a string is malformed: a list or object
        cannot be looked up in the code sets (it was a TypeError that crashed the poll
        task), and as text (`as_text`) it would pass for a rejected request."""
        if type(obj) is not dict:
            raise self.malformed("body is not a JSON object", symbol)
        code = obj.get(field)
        if code is None:
            raise self.malformed(f"missing field {field!r}", symbol)
        if type(code) is not int and type(code) is not str:  # a bool or float too (0.0 == 0)
            raise self.malformed(
                f"field {field!r} is not an integer or string: {code!r:.80}", symbol
            )
        if as_text:
            code = str(code)
        if code == ok:
            return
        msg = f"{field} {code}: {obj.get(message_field, '')}"
        where = {"exchange": self.exchange, "symbol": symbol}
        if code in rate_limited:
            raise RateLimited(msg, retry_after=retry_after, **where)
        if code in server_errors:
            raise ServerError(msg, status=200, **where)
        raise RequestRejected(msg, status=200, **where)
