# seqserve serving image (CPU): ONNX Runtime + gRPC (our API, KServe v2, health, reflection) + HTTP /metrics.
#   docker build --network host -t seqserve:0.1.0 .  # bakes in every model under models/ (retrain: make train)
#   docker run --network host -e SEQSERVE_HOST=127.0.0.1 --read-only --tmpfs /tmp seqserve:0.1.0
# BASE_IMAGE is any Debian-like image with python3.11 + venv: the official one by default; `make image-test` passes
# a local stand-in built from Debian's packages (deploy/docker/standin-base.sh) where Docker Hub is unreachable.
# The CUDA variant is Dockerfile.cuda. Deployment guide: docs/deploy.md.
ARG BASE_IMAGE=python:3.11-slim

# --- builder: a venv with the serving dependencies and our `service` package, byte-compiled ------------------
FROM ${BASE_IMAGE} AS builder
# Lets a test (or you) remove the intermediate image this stage leaves: docker image prune --filter label=...
LABEL io.seqserve.stage=builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# binutils for `strip` (below), a C compiler and Python's headers (libpython3-dev, where the base has none: the
# official image has them) to compile the hot path with mypyc (service/compiled.py), in the builder only: the
# runtime stage never sees them. Any 2.x strips the same (Debian bookworm has 2.40, trixie 2.44).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends 'binutils=2.*' 'gcc=4:*' 'libc6-dev=2.*' \
    && if ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(sysconfig.get_paths()["include"] + "/Python.h"))'; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends 'libpython3-dev=3.*'; fi \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
# Dependencies first, read from pyproject.toml by deploy/docker/requirements.py (serving only: no train extra, so
# no torch; the cpu extra's ONNX Runtime; the uvloop extra, so SEQSERVE_EVENT_LOOP=uvloop works in the container):
# this layer is reused until pyproject.toml, that script or the lock changes, whatever happens to the code. Each
# package at the version deploy/docker/constraints.txt names (`make lock` moves them): the same image every build.
COPY pyproject.toml deploy/docker/requirements.py deploy/docker/constraints.txt ./
RUN /opt/venv/bin/python requirements.py cpu uvloop > requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-compile -c constraints.txt -r requirements.txt
# mypyc (mypy's compiler) in a venv of its own, at the version the suite passed with (.ci/constraints.txt): it
# builds the compiled modules below in /src (type-checking against the serving venv's packages, plus the protobuf
# stubs installed there for the build only), copies them into the installed package, and stays in the builder.
COPY .ci/constraints.txt ci-constraints.txt
RUN python3 -m venv /opt/mypyc \
    && /opt/mypyc/bin/pip install --no-cache-dir -q -c ci-constraints.txt mypy setuptools
# Only `service` is copied: pyproject's package discovery then finds no `training`.
COPY README.md ./
COPY service ./service
# Then: no pip/setuptools left in the runtime venv, no test suites (numpy's are 17 MB), none of ONNX Runtime's
# offline tools (transformers, quantization: training's business) and not its C API library (libonnxruntime.so,
# 35 MB: the Python binding has the runtime linked in and never loads it), no symbol tables in the extension
# modules (uvloop's ships 13 MB of them, 1.6 MB stripped; the auditwheel-bundled libraries in *.libs are left as
# they are, since strip can break the headers patchelf rewrote there), none of numpy's build tools (f2py,
# distutils) nor its SIMD test module (_core/_simd, 1.4 MB stripped: only numpy's own tests import it) nor its
# masked arrays and polynomial packages (numpy.ma, numpy.polynomial: imported only when named, by nothing here;
# they make room for the compiled hot path in the 350 MB budget), no type
# stubs, C headers or C/Cython sources (nothing imports them at run time), the hot path compiled with mypyc (the
# build fails if the server would not use it), and every module byte-compiled once here.
# `unchecked-hash` .pyc files are used as they are, whatever the files' timestamps, so the server starts fast and
# never needs to write one (the container runs with a read-only root filesystem).
RUN /opt/venv/bin/pip install --no-cache-dir --no-compile --no-deps . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip install --no-cache-dir -q -c ci-constraints.txt types-protobuf \
    && /opt/mypyc/bin/python -m service.compile build --python-executable /opt/venv/bin/python \
    && /opt/mypyc/bin/python -m service.compile copy --into "$(echo /opt/venv/lib/python3*/site-packages)" \
    && /opt/venv/bin/pip uninstall --yes types-protobuf \
    && /opt/venv/bin/python -P -m service.compile status --require \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && find /opt/venv/lib -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} + \
    && rm -rf /opt/venv/lib/python3*/site-packages/onnxruntime/transformers \
        /opt/venv/lib/python3*/site-packages/onnxruntime/quantization /opt/venv/lib/python3*/site-packages/onnxruntime/tools \
        /opt/venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so* \
        /opt/venv/lib/python3*/site-packages/numpy/f2py /opt/venv/lib/python3*/site-packages/numpy/distutils \
        /opt/venv/lib/python3*/site-packages/numpy/ma /opt/venv/lib/python3*/site-packages/numpy/polynomial \
        /opt/venv/lib/python3*/site-packages/numpy/_core/_simd.* \
    && find /opt/venv/lib \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' \
        -o -name '*.c' -o -name '*.cpp' \) -path '*/site-packages/*' -delete \
    && find /opt/venv/lib -name '*.so' ! -path '*.libs/*' -exec strip --strip-unneeded {} + \
    && /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib

# Trained models: models/<name>/<version>/{model.onnx,manifest.json}, every committed version except those named in
# SKIP_MODELS (name/version, space-separated). The default leaves out sentiment-glove/1 (20.0 MB), which would take
# the image past its 350 MB budget (docs/deploy.md), and two superseded int8 versions whose weights the next version
# of the same name holds (sentiment-int8/1 -> /2 in the fused graph, 3.0 MB; charlm-int8/1 -> /2 with fixed scales,
# 0.9 MB), to make room for charlm-int8/3; `--build-arg SKIP_MODELS=` bakes in every version. A name that
# is not committed fails the build (a typo must not ship an image without the model it meant to drop), and so
# does dropping a version whose model.onnx a kept one links to (forecaster/4 serves forecaster/3's file).
# The training reports (metrics.json, training_curve.png: 1.7 MB) stay in the repository: the server reads only
# model.onnx and the manifest (and a model's serving.json).
ARG SKIP_MODELS="sentiment-glove/1 sentiment-int8/1 charlm-int8/1"
COPY models /models
RUN for m in $SKIP_MODELS; do \
        test -f "/models/$m/model.onnx" || { echo "SKIP_MODELS: no model $m under models/" >&2; exit 1; }; \
        rm -r "/models/$m"; \
    done; \
    broken="$(find /models -xtype l)"; \
    test -z "$broken" || { echo "SKIP_MODELS: a kept version links to a dropped one's file: $broken" >&2; exit 1; }; \
    find /models \( -name training_curve.png -o -name metrics.json \) -type f -delete

# --- runtime: the base image + the venv + the models; no compiler, no pip, no pip cache -----------------------
FROM ${BASE_IMAGE}

COPY --from=builder /opt/venv /opt/venv
# The trained models (builder, above). Owned by root and world-readable: the server (uid 10001) reads them and
# cannot change them.
COPY --from=builder /models /app/models

# Settings come from SEQSERVE_* env vars (service/settings.py); these pin the container layout only.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_PORT=8002 \
    SEQSERVE_HTTP_PORT=8000 \
    SEQSERVE_MODELS=/app/models \
    SEQSERVE_DEVICE=cpu
WORKDIR /app
# A numeric user that exists in no passwd file: nothing in the image belongs to it, so it can write nowhere but
# /tmp (mount a tmpfs there with --read-only).
USER 10001:10001
EXPOSE 50051 8000 8002

# Healthy = the gRPC health service answers SERVING for the whole server (models loaded, not draining); with TLS,
# the metrics port's /readyz over HTTPS, which follows it and needs no client certificate (service/healthcheck.py).
HEALTHCHECK --interval=5s --timeout=4s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.healthcheck"]

# SIGTERM (docker stop, Kubernetes): health NOT_SERVING, in-flight calls get SEQSERVE_GRACE_SECONDS (10) to
# finish, exit 0. Give the container more than that before SIGKILL (docker stop -t 15, stop_grace_period).
STOPSIGNAL SIGTERM
# Labels last: a new VERSION/REVISION changes only metadata, never the venv and model layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="seqserve" \
      org.opencontainers.image.description="gRPC inference server for recurrent models (ONNX Runtime, CPU): stateful streaming sessions, KServe v2, Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
ENTRYPOINT ["seqserve"]
CMD ["serve"]
