# syntax=docker/dockerfile:1
# cryptoflow collector image.
#   docker build -t cryptoflow .
#   docker run --rm --network host --init -v "$PWD/configs:/etc/cryptoflow:ro" \
#       -v cryptoflow-state:/var/lib/cryptoflow --env-file .env cryptoflow
# Config: /etc/cryptoflow/config.yml (+ ip_shards.yml, symbols.yml beside it); the shipped
# configs/ are baked in as defaults, mount your own over them.
# State: /var/lib/cryptoflow is the working directory, so the default ./spool and ./data
# land on the volume and survive restarts (the spool is drained first on start).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: install the project and its dependencies into a venv -------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the package build needs (pyproject.toml names README.md as the readme).
COPY pyproject.toml README.md ./
COPY cryptoflow/ ./cryptoflow/
RUN /opt/venv/bin/pip install . \
    && /opt/venv/bin/cryptoflow --help > /dev/null

# --- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="cryptoflow" \
      org.opencontainers.image.description="Order-book recorder for crypto futures (Parquet to S3 or disk)" \
      org.opencontainers.image.licenses="MIT"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CRYPTOFLOW_METRICS_PORT=9108

RUN groupadd --system --gid 10001 cryptoflow \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cryptoflow \
       --shell /usr/sbin/nologin cryptoflow \
    && mkdir -p /var/lib/cryptoflow/spool /var/lib/cryptoflow/data /etc/cryptoflow \
    && chown -R 10001:10001 /var/lib/cryptoflow

COPY --from=build /opt/venv /opt/venv
COPY configs/ /etc/cryptoflow/

USER 10001:10001
WORKDIR /var/lib/cryptoflow
VOLUME ["/var/lib/cryptoflow"]
EXPOSE 9108

# /livez on the metrics port (config.yml: metrics.enabled: true): liveness only, so a
# stale symbol or a full spool (/healthz 503, for alerts) never marks the container
# unhealthy. slim has no curl. Set CRYPTOFLOW_METRICS_PORT if metrics.port is not 9108.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CRYPTOFLOW_METRICS_PORT', '9108') + '/livez', timeout=4)"]

# SIGTERM: readers stop, stages drain, buffers flush and upload within
# cryptoflow.shutdown_timeout (default 30 s); give the container longer than that to stop.
STOPSIGNAL SIGTERM
ENTRYPOINT ["cryptoflow"]
CMD ["collect", "--exchange", "all", "--config", "/etc/cryptoflow/config.yml"]
