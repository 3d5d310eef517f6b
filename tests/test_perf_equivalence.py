"""Fast paths give exactly what the simple paths give (issue 9: no speed hack changes output).

KuCoin: `canonical_decimal` returns already-canonical text as it is (a regex check) and
only sends the rest through `Decimal`; `_levels` inlines the common cases of `_num_text`.
Both are compared here with the reference (`Decimal` for every value) on many inputs.
"""

from __future__ import annotations

import json
import random

import pytest

from cryptoflow.errors import MalformedMessage
from cryptoflow.exchanges.kucoin import parse, rules


def _reference_num_text(v: object) -> str:
    if type(v) is int:
        return str(v)
    if type(v) is str:
        return rules._canonical_decimal_slow(v)
    raise ValueError(v)


def _numbers(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        kind = rng.randrange(8)
        whole = str(rng.randrange(0, 10 ** rng.randrange(1, 8)))
        frac = "".join(rng.choice("0123456789") for _ in range(rng.randrange(0, 12)))
        text = whole + ("." + frac if frac else "")
        if kind == 0:
            text += "0"  # trailing zero (not canonical)
        elif kind == 1:
            text = f"{float(text):e}"  # exponent
        elif kind == 2:
            text = "-" + text
        elif kind == 3:
            text = "0" + text  # a leading zero
        elif kind == 4:
            text = repr(rng.random() * 10 ** rng.randrange(-8, 8))  # e.g. 1e-05
        out.append(text)
    return out


EDGE = [
    "0", "-0", "0.0", "-0.0", "00", "0.50", "5000.0", "1e-05", "1E-5", "2.5E+2", "-1.5",
    "-0.5", "0.30000000000000004", "27690.5", "100", ".5", "5.", "+5", " 5", "5 ", "5\n",
    "\u0665", "1_000", "0x10", "1.00000000000000001",
]  # fmt: skip


def test_canonical_decimal_fast_path_matches_decimal() -> None:
    rng = random.Random(9)
    for text in EDGE + _numbers(rng, 20_000):
        try:
            expected: str | type[Exception] = rules._canonical_decimal_slow(text)
        except ValueError:
            expected = ValueError
        if expected is ValueError:
            with pytest.raises(ValueError):
                rules.canonical_decimal(text)
        else:
            assert rules.canonical_decimal(text) == expected, text


@pytest.mark.parametrize("seed", range(5))
def test_kucoin_levels_fast_path_matches_reference(seed: int) -> None:
    rng = random.Random(seed)
    texts = _numbers(rng, 2_000)
    levels = []
    for i in range(0, len(texts), 2):
        p, q = texts[i], texts[i + 1]
        # as the REST body has them: JSON numbers (int or float text), some strings
        p_json = p if not p.startswith(("0", "-0")) or p.startswith(("0.", "-0.")) else f'"{p}"'
        q_json = str(rng.randrange(1, 10**6)) if rng.random() < 0.5 else q
        if q_json.startswith("0") and not q_json.startswith("0."):
            q_json = f'"{q_json}"'
        if q_json.startswith("-0") and not q_json.startswith("-0."):
            q_json = f'"{q_json}"'
        levels.append(f"[{p_json},{q_json}]")
    body = (
        '{"code":"200000","data":{"sequence":5,"ts":1604643655040584408,"bids":['
        + ",".join(levels)
        + '],"asks":[]}}'
    ).encode()
    raw = json.loads(body, parse_float=str)["data"]["bids"]
    expected = [(_reference_num_text(a), _reference_num_text(b)) for a, b in raw]
    assert parse.parse_rest_snapshot(body, "BTCUSDT", 0).bids == expected


@pytest.mark.parametrize(
    "level", ['["abc", 1]', "[1, true]", "[null, 1]", '[1, "1e"]', "[[1], 1]", '[1, "nan"]']
)
def test_kucoin_levels_fast_path_still_rejects(level: str) -> None:
    body = (
        '{"code":"200000","data":{"sequence":5,"ts":1,"bids":[[1, 2],' + level + '],"asks":[]}}'
    ).encode()
    with pytest.raises(MalformedMessage):
        parse.parse_rest_snapshot(body, "BTCUSDT", 0)
