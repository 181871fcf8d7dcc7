#!/usr/bin/env bash
# Builds .devkit/ (git-ignored, ~19 MB): what `bench/device/scaling.sh` needs on a machine with many cores and no
# network, such as the 16-core GPU machine some sessions are lent, where python3 (3.12) already has numpy,
# onnxruntime, grpcio, protobuf, msgpack, prometheus-client and uvloop:
#   .devkit/whl/   wheels of the serving dependencies it lacks (pydantic, pydantic-settings, grpcio-*, redis, ...)
#   .devkit/bin/   perf_analyzer, gzipped (from tritonclient's wheel in .venv)
#   .devkit/lib/   the two libraries perf_analyzer loads: libb64.so.0d (Debian's libb64-0d) and libcudart.so.12
# Run it here (pip and apt-get reach their registries), then carry .devkit with the device call:
#   bash bench/device/kit.sh && <device run> "OUT=\$OUT bash bench/device/scaling.sh" (carry: [".devkit"])
# A call carries 64 MiB of working tree at most and models/ holds ~113 MB: move the model folders the run does not
# load out of the checkout for the call (the char-LM workloads need models/charlm only), and back after.
# DEVICE_PYTHON=3.12 by default: the device's python3 version.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.devkit
PY=${DEVICE_PYTHON:-3.12}
VENV_PY=.venv/bin/python
[ -x "$VENV_PY" ] || { echo "kit.sh: run 'make venv' first (perf_analyzer comes with the dev extra)" >&2; exit 1; }
rm -rf "$KIT"
mkdir -p "$KIT/whl" "$KIT/bin" "$KIT/lib"
# The serving dependencies the device lacks, and theirs, at the versions the image's lock names (those the suite
# passed with: make lock; the generated protobuf code needs its protobuf), as wheels for the device's Python on
# x86-64 Linux.
pins=$(grep -i -E '^(pydantic|pydantic[-_]core|pydantic[-_]settings|grpcio|grpcio-health-checking|grpcio-reflection|grpcio-status|protobuf|googleapis-common-protos|redis|annotated-types|typing[-_]extensions|typing-inspection|python-dotenv)==' deploy/docker/constraints.txt)
# shellcheck disable=SC2086  # one pin a word
"$VENV_PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$KIT/whl" $pins
gzip -c .venv/bin/perf_analyzer > "$KIT/bin/perf_analyzer.gz"  # 18 MB -> 6: the call carries 64 MiB at most
lib=$("$VENV_PY" -c "from bench import pa; print(pa.cudart_dir() or '')")
[ -n "$lib" ] || { echo "kit.sh: libcudart.so.12 not found: pip install nvidia-cuda-runtime-cu12 into .venv" >&2; exit 1; }
cp "$lib/libcudart.so.12" "$KIT/lib/"
tmp=$(mktemp -d)
(cd "$tmp" && apt-get download -qq libb64-0d >/dev/null 2>&1 || { apt-get update -qq && apt-get download -qq libb64-0d; })
dpkg -x "$tmp"/libb64-0d_*.deb "$tmp/root"
cp -P "$tmp"/root/usr/lib/x86_64-linux-gnu/libb64.so.0d* "$KIT/lib/"
rm -rf "$tmp"
du -sh "$KIT"
