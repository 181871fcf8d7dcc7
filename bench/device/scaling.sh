#!/usr/bin/env bash
# On a machine with many cores and no network (after bench/device/kit.sh, .devkit carried): installs the kit's
# wheels beside the machine's python3, then measures `--workers 8` against one worker with perf_analyzer (the
# issue's target: >= 5x on >= 8 cores), with SEQSERVE_MODEL_INSTANCES 1, 2 and 4 (batches of one model in flight
# at once) and 2 with two ONNX Runtime threads, then `--workers 8` with SEQSERVE_ENGINES 2 and 4 (engines that
# each own a share of the sessions and run their own batches). Each bench.perf run prints its table and writes
# JSON to $OUT (default bench/results). WORKERS, CONCURRENCY, WORKLOADS and RUNS override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=${DEVKIT:-$PWD/.devkit}  # DEVKIT: a kit elsewhere
[ -d "$KIT/whl" ] || { echo "scaling.sh: no .devkit: run bench/device/kit.sh here first and carry .devkit" >&2; exit 1; }
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target "$KIT/site" "$KIT"/whl/*.whl
export PYTHONPATH="$PWD:$KIT/site${PYTHONPATH:+:$PYTHONPATH}"
export LD_LIBRARY_PATH="$KIT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[ -x "$KIT/bin/perf_analyzer" ] || { gunzip -c "$KIT/bin/perf_analyzer.gz" > "$KIT/bin/perf_analyzer"; chmod +x "$KIT/bin/perf_analyzer"; }
export PERF_ANALYZER="$KIT/bin/perf_analyzer"
WORKERS=${WORKERS:-1 8}
CONCURRENCY=${CONCURRENCY:-16 64}
WORKLOADS=${WORKLOADS:-charlm-stream charlm-unary}
nproc
python3 -c "import onnxruntime, grpc, pydantic; print('onnxruntime', onnxruntime.__version__, 'grpcio', grpc.__version__)"
run() {  # run NAME [--env KEY=VALUE ...]
  local name=$1; shift
  echo "=== $name $*"
  # shellcheck disable=SC2086  # the lists are word lists on purpose
  python3 -m bench.perf --workloads $WORKLOADS --concurrency $CONCURRENCY --workers $WORKERS --rounds 1 \
    --no-floor --out "$OUT/scaling-$name.json" "$@"
}
# Several engines need several frontends (ENGINES > 1 with one worker is refused): their runs take the largest
# worker count only, set against the one-worker row of instances1. RUNS picks and orders the runs (the first ones
# matter most when device time is short).
MANY=${WORKERS##* }
RUNS=${RUNS:-instances1 engines4 engines2 instances2 instances4 instances2-threads2}
for name in $RUNS; do
  case $name in
    instances1) run instances1 ;;
    instances2) run instances2 --env SEQSERVE_MODEL_INSTANCES=2 ;;
    instances4) run instances4 --env SEQSERVE_MODEL_INSTANCES=4 ;;
    instances2-threads2) run instances2-threads2 --env SEQSERVE_MODEL_INSTANCES=2 SEQSERVE_INTRA_OP_THREADS=2 ;;
    engines2) WORKERS=$MANY run engines2 --env SEQSERVE_ENGINES=2 ;;
    engines4) WORKERS=$MANY run engines4 --env SEQSERVE_ENGINES=4 ;;
    *) echo "scaling.sh: unknown run $name (RUNS)" >&2; exit 1 ;;
  esac
done
