"""Optional CloudWatch publishing of a few key metrics (boto3 `put_metric_data`).

Every `interval` seconds (default 60) `publish_cloudwatch` reads the live `RunResult` and
sends, in namespace `Cryptoflow` (configurable):

Per exchange (dimensions `Service`, `Exchange`) and per shard (`Service`, `Exchange`,
`Shard`):
- `Messages` (Count, received since the previous publish; diffs + snapshots)
- `Gaps`, `Resyncs` (Count, since the previous publish)
- `MaxEventAge` (Seconds, the stalest watched symbol lane, see `metrics.watched_lanes`)
- `Rows` (Count, per exchange only, since the previous publish) when the writer has
  per-symbol row counts (`WriterStats.rows_by_symbol`)

Per process (dimension `Service`):
- `RowsReceived`, `FilesUploaded`, `UploadFailures` (Count, since the previous publish)
- `SpoolBytes` (Bytes), `SpoolFiles` (Count), `BufferedRows` (Count): current values

Counters are sent as deltas, so the CloudWatch `Sum` statistic over a period is the count
in that period. A failed publish is logged and its deltas are carried into the next one.
The boto3 calls run in `trio.to_thread.run_sync` behind a `CapacityLimiter`; at shutdown a
last publish is attempted under a short shielded deadline.
`scripts/cloudwatch_dashboard.py` renders a dashboard for exactly these names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import trio

from cryptoflow.ops.metrics import Freshness, iter_symbols, watched_lanes

log = logging.getLogger(__name__)

NAMESPACE = "Cryptoflow"
#: CloudWatch accepts up to 1000 datums per call; stay small and friendly to emulators
BATCH = 20

Dims = tuple[tuple[str, str], ...]


def make_client(
    *,
    region: str | None = None,
    endpoint_url: str | None = None,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
) -> Any:
    """A boto3 CloudWatch client (blocking: call it from a thread). Credentials default to
    boto3's chain (environment, instance role)."""
    import boto3
    import botocore.config

    session = boto3.session.Session(
        aws_access_key_id=aws_access_key_id or None,
        aws_secret_access_key=aws_secret_access_key or None,
        region_name=region or "us-east-1",
    )
    cfg = botocore.config.Config(
        connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}
    )
    return session.client("cloudwatch", endpoint_url=endpoint_url or None, config=cfg)


class CloudWatchPublisher:
    """Builds `MetricData` from a RunResult (deltas vs the last successful publish)."""

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = NAMESPACE,
        service: str = "cryptoflow",
        freshness: Freshness | None = None,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.base: Dims = (("Service", service),)
        self.freshness = freshness or Freshness()
        self._sent: dict[tuple[str, Dims], float] = {}  # counter totals at the last success

    def totals(self, result: Any) -> tuple[dict[tuple[str, Dims], float], dict]:
        """(counter totals, gauge values), each keyed by (metric name, dimensions)."""
        counters: dict[tuple[str, Dims], float] = {}
        gauges: dict[tuple[str, Dims], tuple[float, str]] = {}

        def add(name: str, dims: Dims, value: float) -> None:
            counters[(name, dims)] = counters.get((name, dims), 0) + value

        def age_max(name: str, dims: Dims, value: float | None) -> None:
            if value is None:
                return
            old = gauges.get((name, dims))
            if old is None or value > old[0]:
                gauges[(name, dims)] = (value, "Seconds")

        rows_seen: set[tuple[str, str]] = set()
        for v in iter_symbols(result):
            ex = (*self.base, ("Exchange", v.exchange))
            sh = (*ex, ("Shard", v.shard))
            msgs = sum(v.messages.values())
            for dims in (ex, sh):
                add("Messages", dims, msgs)
                add("Gaps", dims, v.gaps)
                add("Resyncs", dims, v.resyncs)
            ages = [self.freshness.age(v, lane) for lane in watched_lanes(v)]
            ages = [a for a in ages if a is not None]
            if ages:
                for dims in (ex, sh):
                    age_max("MaxEventAge", dims, max(ages))
            if v.rows is not None and (v.exchange, v.symbol) not in rows_seen:
                rows_seen.add((v.exchange, v.symbol))
                add("Rows", ex, sum(v.rows.values()))
        ws = getattr(result, "writer", None) if result is not None else None
        if ws is not None:
            add("RowsReceived", self.base, sum(dict(getattr(ws, "rows_received", {})).values()))
            add("FilesUploaded", self.base, getattr(ws, "files_uploaded", 0))
            add("UploadFailures", self.base, getattr(ws, "upload_failures", 0))
            gauges[("SpoolBytes", self.base)] = (float(getattr(ws, "spool_bytes", 0)), "Bytes")
            gauges[("SpoolFiles", self.base)] = (float(getattr(ws, "spool_files", 0)), "Count")
            gauges[("BufferedRows", self.base)] = (
                float(getattr(ws, "buffered_rows", 0)),
                "Count",
            )
        return counters, gauges

    def metric_data(self, result: Any) -> tuple[list[dict[str, Any]], dict]:
        """(MetricData entries, counter totals to commit after a successful put)."""
        counters, gauges = self.totals(result)
        data: list[dict[str, Any]] = []
        for (name, dims), total in sorted(counters.items()):
            delta = max(0.0, total - self._sent.get((name, dims), 0.0))
            data.append(_datum(name, dims, delta, "Count"))
        for (name, dims), (value, unit) in sorted(gauges.items()):
            data.append(_datum(name, dims, value, unit))
        return data, counters

    def commit(self, counters: dict[tuple[str, Dims], float]) -> None:
        self._sent.update(counters)

    def put(self, data: list[dict[str, Any]]) -> None:
        """Blocking: send `data` in batches."""
        for i in range(0, len(data), BATCH):
            self.client.put_metric_data(Namespace=self.namespace, MetricData=data[i : i + BATCH])

    async def publish(self, result: Any, *, limiter: trio.CapacityLimiter) -> bool:
        data, counters = self.metric_data(result)
        if not data:
            return True
        try:
            await trio.to_thread.run_sync(self.put, data, limiter=limiter, abandon_on_cancel=True)
        except Exception as exc:  # botocore errors of every kind: keep collecting
            log.warning(
                "cloudwatch: publishing %d metrics failed (retried next time): %s", len(data), exc
            )
            return False
        self.commit(counters)
        return True


def _datum(name: str, dims: Dims, value: float, unit: str) -> dict[str, Any]:
    return {
        "MetricName": name,
        "Dimensions": [{"Name": k, "Value": v} for k, v in dims],
        "Value": float(value),
        "Unit": unit,
    }


async def publish_cloudwatch(
    result_getter: Callable[[], Any],
    *,
    interval: float = 60.0,
    namespace: str = NAMESPACE,
    service: str = "cryptoflow",
    client: Any = None,
    client_kwargs: Mapping[str, Any] | None = None,
    limiter: trio.CapacityLimiter | None = None,
    final_timeout: float = 5.0,
    task_status: trio.TaskStatus[CloudWatchPublisher] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish every `interval` seconds until cancelled (then once more, shielded).

    `client`: a boto3 CloudWatch client; else one is made with `make_client(**client_kwargs)`
    (region, endpoint_url, aws_access_key_id, aws_secret_access_key) in a thread.
    """
    limiter = limiter or trio.CapacityLimiter(1)
    if client is None:
        kwargs = dict(client_kwargs or {})
        client = await trio.to_thread.run_sync(lambda: make_client(**kwargs), limiter=limiter)
    publisher = CloudWatchPublisher(
        client,
        namespace=namespace,
        service=service,
        freshness=Freshness(clock=trio.current_time),
    )
    task_status.started(publisher)
    try:
        while True:
            await trio.sleep(interval)
            await publisher.publish(result_getter(), limiter=limiter)
    finally:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + final_timeout):
            await publisher.publish(result_getter(), limiter=limiter)
