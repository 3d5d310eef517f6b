"""RowBatch: the normalizer's output and the writer's input.

Columns are plain Python lists built with `list.extend` (the fastest flatten measured,
see docs/benchmarks.md) and turned into a typed polars frame only when the writer
flushes a whole buffer, so no per-row Python object and no per-message DataFrame.

Column wire types (before `frame_from_columns` casts them to `models.SCHEMAS`):
- times: int ms (`timestamp`, `transaction_time`, `start_time`, `end_time`) or int ns
  (`receive_time`, `detected_at`); None allowed where the schema column is nullable
- ids: int; `side`: "bid" | "ask"; `level`: int
- `price`, `raw_quantity`: decimal strings exactly as the venue sent them
exchange / market / symbol are batch attributes, not columns.
"""

from __future__ import annotations

import attrs

from cryptoflow.models import Dataset


@attrs.define(slots=True)
class RowBatch:
    dataset: Dataset
    exchange: str
    market: str
    symbol: str
    columns: dict[str, list]
    rows: int
    #: venue size unit -> base-asset units (OKX ctVal, KuCoin multiplier), as decimal text
    multiplier: str = "1"
