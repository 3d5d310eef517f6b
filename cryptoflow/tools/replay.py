"""`cryptoflow replay`: a recording -> the same datasets the collector writes.

Feeds the records of a file in the shared recording format through the venue's pure
parser and the shard `Normalizer` (book sync + flatten), exactly the code the live
pipeline runs, and writes `snapshots`, `deltas` and `gaps` Parquet exactly as a collector
flush does (`storage.layout.files_for_frame` keys and zstd encoding, atomic writes via
`storage.spool.write_atomic`). Venues plug in through `VENUES` (parser + sync rules),
nothing else branches on the venue. Records are fed in chunks through
`Normalizer.feed_many`, or for Binance ws records through the batch fast path
`Normalizer.feed_frames` (same output; `fast=False` forces the simple path); the summary
is the one line users (and the recorded README) compare:
`messages=N rows=N gaps=N resyncs=N snapshot_rows=N`.

Symbol names: rows are stored under the names `collect` stores them by (Bybit
`SHIB1000USDT` is `1000SHIBUSDT`): a raw capture's instrument records, else the symbol
table (`symbols.yml`) given as `symbols`; an instrument neither names keeps the venue
parser's naming rule.

Contract sizes: OKX and KuCoin send sizes in contracts (`Venue.sizes_in_contracts`), and
rows store base units (raw size x the instruments list's multiplier). A raw capture says
each symbol's multiplier: every file begins with an `instrument` record
(`storage.rawfile`), applied from where it stands. Another recording keeps only the book
frames, so a replay that writes rows of such a venue needs the multipliers given:
`--instruments FILE` (the venue's instruments list saved as JSON, read by the venue's own
instruments parser, exactly as a collector reads it at start) and/or `--multiplier
SYMBOL=VALUE`; both win over a capture's records. Without any it refuses (UsageError,
exit 2) instead of storing contracts labelled as base units; a symbol of the recording
that has none stops the replay at its first record.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import orjson
import polars as pl

from cryptoflow.book.sync import BREAK_KINDS, SyncRules
from cryptoflow.config import SYMBOLS_FILE, load_symbol_table
from cryptoflow.errors import (
    CryptoflowError,
    DataError,
    MalformedMessage,
    UnreadableTail,
    UsageError,
)
from cryptoflow.exchanges import registry
from cryptoflow.exchanges.base import Control, Instrument, SymbolMap
from cryptoflow.exchanges.binance import parse as binance_parse
from cryptoflow.exchanges.binance.rules import RULES as BINANCE_RULES
from cryptoflow.models import (
    MARKET_FUTURES,
    Dataset,
    DepthDiff,
    DepthSnapshot,
    GapKind,
    SnapshotSource,
)
from cryptoflow.pipeline.normalize import (
    FAST_VENUES,
    FrameBatch,
    NormalizeOutput,
    Normalizer,
    excess_digit_count,
    frame_from_wire,
    wire_frame,
)
from cryptoflow.pipeline.rows import RowBatch
from cryptoflow.storage import layout
from cryptoflow.storage.rawfile import INSTRUMENT
from cryptoflow.storage.spool import write_atomic
from cryptoflow.symbols import SymbolTable, venue_map
from cryptoflow.tools.recording import Record, iter_lines, parse_record

log = logging.getLogger(__name__)

#: a ws record in the recorder's compact shape: `msg` last and an object. Such a line is
#: valid JSON exactly when its payload is; the fast path checks the payload in full and
#: hands back any chunk it cannot take, which is then parsed record by record.
_FAST_WS_LINE = re.compile(
    rb'\{"recv_ns":(0|[1-9][0-9]{0,18}),"kind":"ws","channel":"[^"\\\x00-\x1f]*",'
    rb'"msg":(\{.*\})\}\r?\n?\Z',
    re.S,
)

CHUNK_RECORDS = 2_000  # records per feed_many call
FLUSH_ROWS = 2_000_000  # rows buffered per (dataset, symbol) before a file is written


#: ws payload (parsed JSON or text), recv_ns, venue name -> stored name: diffs or a Control
ParseWs = Callable[[Any, int, SymbolMap], list[DepthDiff] | Control]


@attrs.frozen(slots=True)
class ReplayVenue:
    rules: SyncRules
    parse_ws: ParseWs
    #: a rest_snapshot record, venue name -> stored name: DepthSnapshot
    parse_rest: Callable[[Record, SymbolMap], DepthSnapshot]
    #: per-replay ws parser with state (OKX legacy id sequencer); None = `parse_ws`
    new_parse_ws: Callable[[], ParseWs] | None = None


def _binance_rest(rec: Record, names: SymbolMap) -> DepthSnapshot:
    venue_symbol = parse_qs(urlsplit(rec.channel).query).get("symbol", [""])[0]
    if not venue_symbol:
        raise MalformedMessage(f"no symbol in channel {rec.channel!r}", exchange="binance")
    symbol = stored_name("binance", venue_symbol, names)
    return binance_parse.parse_rest_snapshot(rec.msg, symbol, rec.recv_ns, SnapshotSource.REPLAY)


def _raw(msg: Any) -> bytes | str:
    """Recorded payloads are parsed JSON (or text); the venue parsers take frames."""
    return msg if isinstance(msg, (str, bytes)) else orjson.dumps(msg)


def _rest_of(exchange: str, query_key: str) -> Callable[[Record, SymbolMap], DepthSnapshot]:
    """REST record parser for a venue whose channel is `<path>?...<query_key>=<venue sym>`."""
    mod = importlib.import_module(f"cryptoflow.exchanges.{exchange}.parse")

    def parse_rest(rec: Record, names: SymbolMap) -> DepthSnapshot:
        venue_symbol = parse_qs(urlsplit(rec.channel).query).get(query_key, [""])[0]
        if not venue_symbol:
            raise MalformedMessage(f"no {query_key} in channel {rec.channel!r}", exchange=exchange)
        symbol = stored_name(exchange, venue_symbol, names)
        return mod.parse_rest_snapshot(_raw(rec.msg), symbol, rec.recv_ns, SnapshotSource.REPLAY)

    return parse_rest


def _ws_of(exchange: str) -> ParseWs:
    mod = importlib.import_module(f"cryptoflow.exchanges.{exchange}.parse")
    return lambda msg, recv_ns, names: mod.parse_ws_message(_raw(msg), recv_ns, names)


def _okx_ws() -> ParseWs:
    """OKX captures before seqId existed: one legacy id sequencer per replay."""
    from cryptoflow.exchanges.okx import parse as okx_parse
    from cryptoflow.exchanges.okx.rules import LegacySequencer

    legacy = LegacySequencer()
    return lambda msg, recv_ns, names: okx_parse.parse_ws_message(_raw(msg), recv_ns, names, legacy)


def stored_name(exchange: str, venue_symbol: str, names: SymbolMap) -> str:
    """The name rows of `venue_symbol` are stored under: the symbol table's (what collect
    uses: Bybit `SHIB1000USDT` is `1000SHIBUSDT`), else the venue parser's naming rule
    (OKX `BTC-USDT-SWAP` -> `BTCUSDT`) for instruments the table does not list."""
    found = names.get(venue_symbol)
    if found is not None:
        return found
    mod = importlib.import_module(f"cryptoflow.exchanges.{exchange}.parse")
    return mod.default_symbol(venue_symbol)


def _venue_rules(exchange: str) -> SyncRules:
    return importlib.import_module(f"cryptoflow.exchanges.{exchange}.rules").RULES


VENUES: dict[str, ReplayVenue] = {
    "binance": ReplayVenue(
        BINANCE_RULES,
        lambda msg, recv_ns, names: binance_parse.parse_ws_message(msg, recv_ns, names),
        _binance_rest,
    ),
    "bybit": ReplayVenue(_venue_rules("bybit"), _ws_of("bybit"), _rest_of("bybit", "symbol")),
    "okx": ReplayVenue(
        _venue_rules("okx"), _ws_of("okx"), _rest_of("okx", "instId"), new_parse_ws=_okx_ws
    ),
    "kucoin": ReplayVenue(_venue_rules("kucoin"), _ws_of("kucoin"), _rest_of("kucoin", "symbol")),
}


# --- contract sizes -------------------------------------------------------------------


@attrs.frozen(slots=True)
class ContractSizes:
    """The contract multipliers of one replay of a contract-sized venue.

    Keyed by the stored symbol (what the venue's parser names a record: `BTCUSDT` for
    `BTC-USDT-SWAP` / `XBTUSDTM`), values are decimal text for the exact scaling."""

    exchange: str
    multipliers: dict[str, str]
    #: symbols whose sizes cannot be stored in base units, and why (inverse contracts...)
    refused: dict[str, str]
    #: symbols --instruments/--multiplier decided: a capture's instrument record does not
    #: change them
    given: set[str] = attrs.field(factory=set)

    def install(self, normalizer: Normalizer) -> None:
        for symbol, multiplier in self.multipliers.items():
            normalizer.set_multiplier(self.exchange, symbol, multiplier)

    def check(self, symbol: str, where: str) -> None:
        """UsageError unless rows of `symbol` can be stored in base units."""
        if symbol in self.multipliers:
            return
        why = self.refused.get(symbol)
        if why is not None:
            raise UsageError(f"replay: {where}: {self.exchange} {symbol} not stored: {why}")
        raise UsageError(
            f"replay: {where}: no contract multiplier for {self.exchange} {symbol} (its "
            f"sizes are contracts): pass --multiplier {symbol}=VALUE or an --instruments "
            "file that lists it"
        )


def contract_sizes(
    exchange: str,
    instruments: Path | None = None,
    multipliers: Sequence[str] = (),
    names: SymbolMap | None = None,
) -> ContractSizes | None:
    """The multipliers for a replay of `exchange`; None when its sizes are base units.

    `instruments` is the venue's instruments list saved as JSON (OKX `GET
    /api/v5/public/instruments?instType=SWAP`, KuCoin `GET /api/v1/contracts/active`),
    `multipliers` are `SYMBOL=VALUE` texts (SYMBOL stored or venue name); they win over
    the list. Either given for a venue whose sizes are base units is a usage error.
    `names` (venue name -> stored name, the symbol table's) keys them as rows are stored."""
    if not registry.get_venue(exchange).sizes_in_contracts:
        if instruments is not None or multipliers:
            raise UsageError(
                f"replay: {exchange} sizes are base units already: --instruments and "
                "--multiplier apply only to contract-sized venues "
                f"({', '.join(_contract_venues())})"
            )
        return None
    names = names or {}
    sizes = ContractSizes(exchange, {}, {})
    if instruments is not None:
        for inst in _load_instruments(exchange, Path(instruments)).values():
            _add_instrument(sizes, stored_name(exchange, inst.venue_symbol, names), inst)
    for text in multipliers:
        symbol, value = _multiplier_option(text)
        symbol = stored_name(exchange, symbol, names)
        sizes.multipliers[symbol] = value
        sizes.refused.pop(symbol, None)
    sizes.given.update(sizes.multipliers, sizes.refused)
    return sizes


def _contract_venues() -> list[str]:
    return [n for n in registry.available() if registry.get_venue(n).sizes_in_contracts]


def _load_instruments(exchange: str, path: Path) -> dict[str, Instrument]:
    mod = importlib.import_module(f"cryptoflow.exchanges.{exchange}.parse")
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"--instruments {path}: cannot read it: {exc.strerror}") from None
    try:
        return mod.parse_instruments(body)
    except CryptoflowError as exc:
        raise UsageError(
            f"--instruments {path}: cannot be read as {exchange}'s instruments list: {exc}"
        ) from None


def _add_instrument(sizes: ContractSizes, symbol: str, inst: Instrument) -> None:
    """One instruments entry; two contracts that parse to one stored name with different
    sizes leave that name to --multiplier (neither can be told from the recording)."""
    if inst.unsupported:
        sizes.refused[symbol] = f"{inst.venue_symbol}: {inst.unsupported}"
        return
    known = sizes.multipliers.get(symbol)
    if known is not None and Decimal(known) != Decimal(inst.multiplier_text):
        del sizes.multipliers[symbol]
        sizes.refused[symbol] = (
            f"the instruments list gives it two multipliers ({known}, {inst.multiplier_text}); "
            f"pass --multiplier {symbol}=VALUE"
        )
    elif symbol not in sizes.refused:
        sizes.multipliers[symbol] = inst.multiplier_text


def _multiplier_option(text: str) -> tuple[str, str]:
    """`SYMBOL=VALUE` -> (SYMBOL upper-cased, VALUE as plain decimal text)."""
    symbol, sep, value = (part.strip() for part in text.partition("="))
    try:
        number = Decimal(value)
    except InvalidOperation:
        number = None
    if not sep or not symbol or number is None or not number.is_finite() or number <= 0:
        raise UsageError(
            f"--multiplier {text!r}: expected SYMBOL=VALUE with VALUE a positive number "
            "(base units per contract), e.g. BTCUSDT=0.01"
        )
    return symbol.upper(), format(number, "f")


def _instrument_record(exchange: str, rec: Record) -> tuple[str, str, str]:
    """A raw capture's instrument record (`storage.rawfile`) -> (stored name, venue name,
    multiplier text as the collector scaled with it); MalformedMessage if it is not one."""
    msg = rec.msg
    keys = ("symbol", "venue_symbol", "multiplier")
    fields = [msg.get(k) for k in keys] if type(msg) is dict else []
    if len(fields) != len(keys) or not all(type(v) is str and v for v in fields):
        raise MalformedMessage(
            "instrument record: expected 'symbol', 'venue_symbol' and 'multiplier' texts, "
            f"got {orjson.dumps(msg).decode()[:200]}",
            exchange=exchange,
        )
    symbol, venue_symbol, multiplier = fields
    try:
        number = Decimal(multiplier)
    except InvalidOperation:
        number = None
    if number is None or not number.is_finite() or number <= 0:
        raise MalformedMessage(
            f"instrument record: multiplier {multiplier!r} is not a positive number",
            exchange=exchange,
            symbol=symbol,
        )
    return symbol, venue_symbol, multiplier


def _carries_instruments(path: Path) -> bool:
    """Whether the recording begins with an instrument record, as every raw-capture file
    does: then its records say each symbol's contract size."""
    with contextlib.closing(iter_lines(path)) as lines:
        try:
            for line_no, line in lines:
                if line.strip():
                    return parse_record(line, line_no).kind == INSTRUMENT
        except DataError:  # the replay itself reports it
            return False
    return False


@attrs.define(slots=True)
class ReplaySummary:
    messages: int = 0  # records in the file (ws + rest), bad ones included
    rows: int = 0  # delta rows
    gaps: int = 0  # gap records of break kinds (sequence break, reconnect, overload, checksum)
    resyncs: int = 0  # RESYNC gap records
    snapshot_rows: int = 0
    snapshots: int = 0
    diffs: int = 0
    controls: int = 0
    bad_records: int = 0
    dropped_duplicates: int = 0
    excess_digits: int = 0
    instruments: int = 0  # a raw capture's instrument records (not in `messages`)
    files: list[Path] = attrs.field(factory=list)

    def line(self) -> str:
        return (
            f"messages={self.messages} rows={self.rows} gaps={self.gaps} "
            f"resyncs={self.resyncs} snapshot_rows={self.snapshot_rows}"
        )


def replay_summary(
    exchange: str,
    input_path: Path,
    output: Path | None = None,
    *,
    chunk_records: int = CHUNK_RECORDS,
    flush_rows: int = FLUSH_ROWS,
    fast: bool = True,
    instruments: Path | None = None,
    multipliers: Sequence[str] = (),
    symbols: SymbolTable | None = None,
) -> ReplaySummary:
    """Replay `input_path`; write Parquet under `output` (nothing written when None).

    With `fast` (the default) runs of ws records go through `Normalizer.feed_frames` (the
    batch fast path, `pipeline/batch.py`) for venues that have one; any chunk it does not
    take, and every other record, takes the simple path. Output is the same either way
    (`tests/test_fastpath.py`). `instruments` / `multipliers`: see `contract_sizes`; a
    contract-sized venue's rows are only written with a multiplier for their symbol.
    `symbols`: the symbol table (`symbol_table`); rows are stored under its names, as
    `collect` stores them (without it, under the venue parser's naming rule)."""
    venue = VENUES.get(exchange)
    if venue is None:
        raise UsageError(f"replay: unknown exchange {exchange!r} (known: {', '.join(VENUES)})")
    parse_ws = venue.new_parse_ws() if venue.new_parse_ws is not None else venue.parse_ws
    input_path = Path(input_path)
    if input_path.is_dir():  # was "does not exist", which sends one looking elsewhere
        raise UsageError(
            f"replay: input {str(input_path)!r} is a directory: --input takes one recording "
            "file (concatenate a capture's files into one, see docs/storage.md)"
        )
    if not input_path.is_file():
        raise UsageError(f"replay: input file {str(input_path)!r} does not exist")
    summary = ReplaySummary()
    normalizer = Normalizer({exchange: venue.rules})
    #: venue name -> stored name: the table `collect` names its rows by
    names: dict[str, str] = venue_map(symbols, exchange) if symbols else {}
    sizes = contract_sizes(exchange, instruments, multipliers, names)
    if sizes is not None:
        sizes.install(normalizer)
        if (
            output is not None
            and instruments is None
            and not multipliers
            and not _carries_instruments(input_path)
        ):
            raise UsageError(
                f"replay: {exchange} sizes are contracts and this recording does not say how "
                "big one is (a raw capture's files begin with it): pass --instruments FILE "
                "(the venue's instruments list saved as JSON) or --multiplier SYMBOL=VALUE"
            )
    #: rows are written: each symbol needs its multiplier (never stored with 1)
    sized = sizes if output is not None else None
    fast = fast and exchange in FAST_VENUES and venue.new_parse_ws is None
    #: per (dataset, exchange, market, symbol): wire frames, multiplier, rows
    buffers: dict[tuple[Dataset, str, str, str], tuple[list[pl.DataFrame], str, int]] = {}

    def bad(line_no: int, reason: str) -> None:
        summary.messages += 1
        summary.bad_records += 1
        log.warning("%s:%d: skipped: %s", input_path, line_no, reason)

    def flush(key: tuple[Dataset, str, str, str]) -> None:
        parts, multiplier, _ = buffers.pop(key)
        wire = pl.concat(parts, rechunk=False) if len(parts) > 1 else parts[0]
        summary.excess_digits += excess_digit_count(wire)
        frame = frame_from_wire(*key, wire, multiplier)
        if output is not None:
            summary.files.extend(_write(key, frame, Path(output)))

    def hold(batch: RowBatch | FrameBatch) -> None:
        if sized is not None:
            sized.check(batch.symbol, str(input_path))
        key = (batch.dataset, batch.exchange, batch.market, batch.symbol)
        wire = batch.frame if isinstance(batch, FrameBatch) else wire_frame(batch.columns)
        parts, multiplier, rows = buffers.get(key, ([], batch.multiplier, 0))
        parts.append(wire)
        buffers[key] = (parts, multiplier, rows + wire.height)
        if rows + wire.height >= flush_rows:
            flush(key)

    def account(out: NormalizeOutput) -> None:
        summary.rows += out.counters["delta_rows"]
        summary.snapshot_rows += out.counters["snapshot_rows"]
        summary.dropped_duplicates += out.counters["dropped"]
        for gap in out.gaps:
            if gap.kind is GapKind.RESYNC:
                summary.resyncs += 1
            elif gap.kind in BREAK_KINDS:
                summary.gaps += 1
        for batch in [*out.batches, *out.frames]:
            hold(batch)

    items: list = []

    def process() -> None:
        if items:
            account(normalizer.feed_many(items))
            items.clear()

    def instrument(rec: Record) -> None:
        """A raw capture's instrument record: name the venue symbol and scale its sizes as
        collect did (--instruments/--multiplier still win). Rows read before it keep the
        multiplier they were read with: a change flushes the symbol's buffers first."""
        try:
            symbol, venue_symbol, multiplier = _instrument_record(exchange, rec)
        except MalformedMessage as exc:
            drain()
            bad(rec.line_no, str(exc))
            return
        summary.instruments += 1
        given = sizes is not None and symbol in sizes.given
        if sizes is not None:
            current = sizes.multipliers.get(symbol)
        else:  # base units: still the multiplier collect scaled with (1)
            current = normalizer.multiplier(exchange, symbol)
        if names.get(venue_symbol) == symbol and (given or current == multiplier):
            return  # nothing new: every file of a capture repeats it
        drain()  # what was read before it keeps its name and multiplier
        process()
        if not given and current != multiplier:
            for key in [k for k in buffers if k[3] == symbol]:
                flush(key)  # a buffer is scaled with one multiplier
            normalizer.set_multiplier(exchange, symbol, multiplier)
            if sizes is not None:
                sizes.multipliers[symbol] = multiplier
        names[venue_symbol] = symbol

    def simple(rec: Record) -> None:
        if rec.kind == INSTRUMENT:
            instrument(rec)
            return
        summary.messages += 1
        try:
            if rec.kind == "ws":
                parsed = parse_ws(rec.msg, rec.recv_ns, names)
                if isinstance(parsed, Control):
                    summary.controls += 1
                    return
                summary.diffs += len(parsed)
                items.extend(parsed)
            else:
                parsed = [venue.parse_rest(rec, names)]
                items.extend(parsed)
                summary.snapshots += 1
        except MalformedMessage as exc:
            summary.bad_records += 1
            log.warning("%s:%d: skipped: %s", input_path, rec.line_no, exc)
            return
        if sized is not None:
            for item in parsed:
                sized.check(item.symbol, f"{input_path}:{rec.line_no}")
        if len(items) >= chunk_records:
            process()

    # fast path: (line number, line, recv_ns, frame) of ws records in the exact shape
    pending: list[tuple[int, bytes, int, bytes]] = []

    def drain() -> None:
        if not pending:
            return
        out = normalizer.feed_frames(
            exchange, MARKET_FUTURES, [p[3] for p in pending], [p[2] for p in pending], names
        )
        if out is None:  # not this chunk: every record through the simple path
            for line_no, line, _, _ in pending:
                try:
                    simple(parse_record(line, line_no))
                except DataError as exc:
                    bad(line_no, str(exc))
            process()
        else:
            summary.messages += len(pending)
            summary.diffs += len(pending)
            account(out)
        pending.clear()

    # closed at once also when a record stops the replay (UsageError)
    with contextlib.closing(iter_lines(input_path)) as lines:
        try:
            for line_no, line in lines:
                if not line.strip():
                    continue
                m = _FAST_WS_LINE.match(line) if fast else None
                if m is not None and int(m[1]) < 2**63:
                    process()  # keep arrival order
                    pending.append((line_no, line, int(m[1]), m[2]))
                    if len(pending) >= chunk_records:
                        drain()
                    continue
                try:
                    rec = parse_record(line, line_no)
                except DataError as exc:
                    drain()
                    bad(line_no, str(exc))
                    continue
                if rec.kind != INSTRUMENT:
                    drain()  # keep arrival order (an instrument record drains only if it must)
                simple(rec)
        except UnreadableTail as exc:  # a .gz cut short: what was read is kept and stored
            drain()
            bad(exc.line_no, str(exc))
    drain()
    process()
    for key in list(buffers):
        flush(key)
    if summary.excess_digits:
        log.warning("%d values have more than 15 significant digits", summary.excess_digits)
    return summary


def symbol_table(config: Path | None, *, default: Path) -> SymbolTable | None:
    """The symbol table `collect` names rows by: `symbols.yml` beside `config` (a
    ConfigError when it cannot be read), or beside `default` (the CLI's configs/config.yml)
    when no config is given and that file exists; None when there is none (`run` warns)."""
    if config is None:
        if not (default.parent / SYMBOLS_FILE).is_file():
            return None
        config = default
    return load_symbol_table(Path(config).parent / SYMBOLS_FILE)


def run(
    exchange: str,
    input_path: Path,
    output: Path,
    *,
    instruments: Path | None = None,
    multipliers: Sequence[str] = (),
    symbols: SymbolTable | None = None,
) -> int:
    """CLI entry: replay, print the one summary line, return the exit code: 0, or 1
    when the file had records and not one of them gave a diff or a snapshot (the wrong
    --exchange for the recording, or not a recording at all): that is no replay. Only
    "nothing usable" counts: control frames (acks, pongs) among book data are normal, and
    the Bybit and KuCoin parsers take any frame they do not know for one, so another
    venue's recording under them is all controls, not bad records."""
    path = Path(input_path)
    if symbols is None and path.is_file() and not _carries_instruments(path):
        log.warning(
            "replay: no %s (no --config, none in configs/): symbols are named by the venue's "
            "naming rule, which for a few differs from the table collect names them by",
            SYMBOLS_FILE,
        )
    summary = replay_summary(
        exchange,
        input_path,
        output,
        instruments=instruments,
        multipliers=multipliers,
        symbols=symbols,
    )
    if summary.bad_records:
        log.warning("%d bad records skipped", summary.bad_records)
    print(summary.line())
    if summary.messages and not summary.diffs + summary.snapshots:
        raise DataError(
            f"{input_path}: none of its {summary.messages} records could be read as {exchange} "
            f"book data ({summary.controls} control or unknown frames, {summary.bad_records} "
            "unreadable): is --exchange right for this recording?"
        )
    return 0


def _write(key: tuple[Dataset, str, str, str], frame: pl.DataFrame, output: Path) -> list[Path]:
    """Write a frame exactly as a collector flush does (`storage.layout.files_for_frame`:
    one zstd Parquet file per event-time hour, deterministic content-hashed key), each
    file atomically (temp + fsync + rename) under `output`."""
    written: list[Path] = []
    for rel_key, _, data in layout.files_for_frame(*key, frame):
        path = output / rel_key
        write_atomic(path, data)
        written.append(path)
    return written
