#!/usr/bin/env python
"""Print a CloudWatch dashboard (JSON body) for the configured exchanges and shards.

    python scripts/cloudwatch_dashboard.py --config configs/config.yml [--region eu-west-1]
        [--namespace Cryptoflow] [--service cryptoflow] [--period 60] > dashboard.json
    aws cloudwatch put-dashboard --dashboard-name cryptoflow \
        --dashboard-body file://dashboard.json

Widgets: a process row (rows received, spool bytes/files, uploads and upload failures),
then per enabled exchange one row (messages, rows, gaps + resyncs, max event age), then per
(exchange, shard) one row (messages, gaps + resyncs, max event age). Metric names and
dimensions are the ones `cryptoflow.ops.cloudwatch` publishes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

WIDTH = 24  # dashboard grid width
HEIGHT = 6


def _metric_widget(
    title: str,
    metrics: list[list[Any]],
    *,
    region: str,
    period: int,
    stat: str,
    x: int,
    y: int,
    width: int,
) -> dict[str, Any]:
    return {
        "type": "metric",
        "x": x,
        "y": y,
        "width": width,
        "height": HEIGHT,
        "properties": {
            "title": title,
            "view": "timeSeries",
            "stacked": False,
            "region": region,
            "period": period,
            "stat": stat,
            "metrics": metrics,
        },
    }


def _row(widgets: list[dict[str, Any]], specs: list[tuple], y: int, **common: Any) -> None:
    width = WIDTH // len(specs)
    for i, (title, metrics, stat) in enumerate(specs):
        widgets.append(
            _metric_widget(title, metrics, stat=stat, x=i * width, y=y, width=width, **common)
        )


def shard_labels(settings: Any) -> list[tuple[str, str]]:
    """(exchange, shard name) for every enabled exchange a shard lists symbols for."""
    enabled = list(settings.app.cryptoflow.exchanges)
    out = []
    for exchange in enabled:
        for shard in settings.shards:
            if shard.symbols.get(exchange):
                out.append((exchange, shard.name))
    return out


def build_dashboard(
    settings: Any,
    *,
    region: str,
    namespace: str = "Cryptoflow",
    service: str | None = None,
    period: int = 60,
) -> dict[str, Any]:
    service = service or settings.app.cryptoflow.name
    ns, svc = namespace, ["Service", service]
    common = {"region": region, "period": period}
    widgets: list[dict[str, Any]] = []
    y = 0
    widgets.append(
        {
            "type": "text",
            "x": 0,
            "y": y,
            "width": WIDTH,
            "height": 1,
            "properties": {"markdown": f"# cryptoflow `{service}`"},
        }
    )
    y += 1
    _row(
        widgets,
        [
            ("rows received", [[ns, "RowsReceived", *svc]], "Sum"),
            (
                "spool backlog",
                [
                    [ns, "SpoolBytes", *svc, {"label": "bytes"}],
                    [ns, "SpoolFiles", *svc, {"label": "files", "yAxis": "right"}],
                ],
                "Maximum",
            ),
            (
                "uploads",
                [
                    [ns, "FilesUploaded", *svc],
                    [ns, "UploadFailures", *svc, {"color": "#d62728"}],
                ],
                "Sum",
            ),
        ],
        y,
        **common,
    )
    y += HEIGHT
    labels = shard_labels(settings)
    exchanges = list(dict.fromkeys(ex for ex, _ in labels))
    for ex in exchanges:
        dims = [*svc, "Exchange", ex]
        _row(
            widgets,
            [
                (f"{ex}: messages", [[ns, "Messages", *dims]], "Sum"),
                (f"{ex}: rows", [[ns, "Rows", *dims]], "Sum"),
                (
                    f"{ex}: gaps / resyncs",
                    [[ns, "Gaps", *dims], [ns, "Resyncs", *dims]],
                    "Sum",
                ),
                (f"{ex}: max event age (s)", [[ns, "MaxEventAge", *dims]], "Maximum"),
            ],
            y,
            **common,
        )
        y += HEIGHT
    for ex, shard in labels:
        dims = [*svc, "Exchange", ex, "Shard", shard]
        _row(
            widgets,
            [
                (f"{ex}/{shard}: messages", [[ns, "Messages", *dims]], "Sum"),
                (
                    f"{ex}/{shard}: gaps / resyncs",
                    [[ns, "Gaps", *dims], [ns, "Resyncs", *dims]],
                    "Sum",
                ),
                (f"{ex}/{shard}: max event age (s)", [[ns, "MaxEventAge", *dims]], "Maximum"),
            ],
            y,
            **common,
        )
        y += HEIGHT
    return {"widgets": widgets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/config.yml"))
    parser.add_argument("--region", default=None, help="default: AWS_REGION or us-east-1")
    parser.add_argument("--namespace", default="Cryptoflow")
    parser.add_argument("--service", default=None, help="default: cryptoflow.name in config")
    parser.add_argument("--period", type=int, default=60)
    args = parser.parse_args(argv)

    from cryptoflow.config import load_settings
    from cryptoflow.errors import CryptoflowError

    try:
        settings = load_settings(args.config)
    except CryptoflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    region = args.region or settings.env.aws_region or "us-east-1"
    body = build_dashboard(
        settings,
        region=region,
        namespace=args.namespace,
        service=args.service,
        period=args.period,
    )
    json.dump(body, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
