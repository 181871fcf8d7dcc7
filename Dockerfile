# seqserve serving image: ONNX Runtime (CPU) + gRPC + /metrics. No torch: the train extra is not installed.
#   docker build -t seqserve .            (bakes in the committed models/; retrain with `make train`)
#   docker run -p 50051:50051 -p 8002:8002 seqserve
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 seqserve \
    && useradd --system --uid 10001 --gid seqserve --home-dir /app --shell /usr/sbin/nologin seqserve

WORKDIR /app

# Dependencies first (layer cached until pyproject.toml or the code changes). Only the `service` package is copied:
# pyproject's package discovery then finds no `training`, and without the train extra nothing pulls torch.
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install . && pip check

# Trained models: models/<name>/<version>/{model.onnx,manifest.json}. Read-only for the server user.
COPY models ./models

# Settings come from SEQSERVE_* env vars (service/settings.py); the CLI flags below only pin the container layout.
ENV SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_PORT=8002 \
    SEQSERVE_MODELS=/app/models \
    SEQSERVE_DEVICE=cpu

USER seqserve:seqserve
EXPOSE 50051 8002

# Ready = every model loaded and the gRPC server serving (/readyz answers 200), checked from inside the container.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SEQSERVE_METRICS_PORT', '8002'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2).status == 200 else 1)"]

# SIGTERM (docker stop) -> health NOT_SERVING, in-flight calls get SEQSERVE_GRACE_SECONDS to finish.
STOPSIGNAL SIGTERM
CMD ["seqserve", "serve", "--host", "0.0.0.0"]
