"""Where a served request's CPU goes, by library: seqserve (one worker) against the canned-response floor.

perf_analyzer drives each server with one workload (``bench/pa.py``) while Linux ``perf record`` samples the
server process at ``--frequency`` Hz; ``perf report --sort dso`` splits the samples by the shared object they ran
in (the Python interpreter, gRPC's Cython core, the kernel, the C library, ONNX Runtime, numpy, protobuf, the
rest). A library's CPU per request is its share of the samples times the server's CPU per request over the same
run (``/proc`` CPU seconds / requests, as ``bench/perf.py`` measures it). The floor (``bench/floor.py``) answers
the same requests with canned bytes from one ``grpc.aio`` process, so the ``extra`` column is what seqserve's own
work costs on top of the transport, library by library: which part of the gap to the floor is Python bytecode,
which is gRPC, the kernel or the model.

Each workload measures both servers back to back, ``--rounds`` times in alternating order (this machine's speed
drifts); the table prints medians. Needs ``perf`` (Debian's ``linux-perf``) with the right to sample a process
(root, or ``kernel.perf_event_paranoid`` <= 1); on a machine without it the command says why and exits 1.

    python -m bench.where [--workloads charlm1-stream charlm1-unary] [--concurrency 16] [--rounds 2]
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import cli, pa
from bench.perf import alternating, started

# Shared objects by what they are, first match wins; anything else is "other".
LIBRARIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Python interpreter", re.compile(r"^(libpython3|python3)")),
    ("gRPC (cygrpc)", re.compile(r"^cygrpc\.")),
    # the hot path compiled with mypyc (service/compiled.py): its code is in the group's library, not the shims
    ("seqserve compiled", re.compile(r"^compiled__mypyc\.")),
    ("kernel", re.compile(r"^\[kernel")),
    ("C library", re.compile(r"^(libc\.so|libm\.so|libstdc\+\+|ld-linux|libpthread|libgcc_s|\[vdso\])")),
    ("ONNX Runtime", re.compile(r"^(onnxruntime|libonnxruntime)")),
    ("numpy", re.compile(r"^(_multiarray|_umath|libopenblas|libscipy_openblas|_pocketfft|_bounded_integers)")),
    ("protobuf", re.compile(r"^_message\.")),
)
OTHER = "other"
ORDER = [name for name, _ in LIBRARIES] + [OTHER]
# One line of ``perf report --sort dso --stdio -q -n``: "    47.23%          1234  libpython3.11.so.1.0"
REPORT_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+)\s+(.+?)\s*$")


def library(dso: str) -> str:
    """The library group of one shared object's name as ``perf report`` prints it."""
    for name, pattern in LIBRARIES:
        if pattern.search(dso):
            return name
    return OTHER


def parse_report(text: str) -> dict[str, int]:
    """Samples per library group from ``perf report --sort dso --stdio -q -n`` output."""
    samples = dict.fromkeys(ORDER, 0)
    for line in text.splitlines():
        m = REPORT_LINE.match(line)
        if m:
            samples[library(m.group(3))] += int(m.group(2))
    return samples


def perf_binary() -> str:
    """The ``perf`` command, once it has shown it can sample a process here; otherwise SystemExit with the reason."""
    found = shutil.which("perf")
    if found is None:
        raise SystemExit("bench.where needs Linux perf: apt-get install linux-perf (Debian) or linux-tools (Ubuntu)")
    with tempfile.TemporaryDirectory() as tmp:
        probe = subprocess.run(
            [found, "record", "-q", "-F", "99", "-o", f"{tmp}/probe.data", "--", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    if probe.returncode != 0:
        raise SystemExit(f"perf cannot sample here (root, or kernel.perf_event_paranoid <= 1): {probe.stderr[-500:]}")
    return found


@contextlib.contextmanager
def recording(perf: str, pid: int, out: Path, frequency: int) -> Iterator[None]:
    """``perf record`` of every thread of ``pid`` while the block runs."""
    proc = subprocess.Popen(
        [perf, "record", "-q", "-F", str(frequency), "-p", str(pid), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def report(perf: str, data: Path) -> dict[str, int]:
    done = subprocess.run(
        [perf, "report", "-i", str(data), "--sort", "dso", "--stdio", "-q", "-n"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return parse_report(done.stdout)


def per_request(samples: dict[str, int], cpu_s: float, requests: float) -> dict[str, float]:
    """CPU µs per request of each library: its share of the samples times the server's CPU per request."""
    total = sum(samples.values())
    us = cpu_s / max(requests, 1.0) * 1e6
    return {name: us * n / total if total else 0.0 for name, n in samples.items()}


def measure(
    perf: str,
    label: str,
    target: str,
    pid: int,
    w: pa.Workload,
    c: int,
    folder: Path,
    env: dict[str, str],
    frequency: int,
    window_ms: int,
) -> dict[str, Any]:
    data = folder / f"{label}-{w.name}-{c}.data"
    with recording(perf, pid, data, frequency):
        r = pa.run(target, w, c, folder, env, lambda: [pid], window_ms=window_ms)
    samples = report(perf, data)
    data.unlink()
    return {
        "server": label,
        "workload": w.name,
        "concurrency": c,
        "throughput": r.throughput,
        "server_cpu_us": r.server_cpu_s / max(r.requests, 1.0) * 1e6,
        "samples": samples,
        "us": per_request(samples, r.server_cpu_s, r.requests),
    }


WORKLOADS = ["charlm1-stream", "charlm1-unary"]  # make bench's: the streamed and unary charlm/1 steps


def run(
    models: Path,
    workloads: list[str],
    conc: list[int],
    rounds: int = 2,
    frequency: int = 499,
    window_ms: int = 2000,
    perf: str | None = None,
) -> dict[str, Any]:
    """Per workload and concurrency, seqserve (one worker) and the floor measured back to back, ``rounds`` times in
    alternating order; ``rows`` per measurement and ``summary`` (medians per server) per workload. ``perf``: the
    binary ``perf_binary`` returned, when the caller has already asked."""
    perf = perf or perf_binary()
    env = pa.environment()
    chosen = [pa.WORKLOADS[name] for name in workloads if pa.WORKLOADS[name].committed(models)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        folder = Path(tmp)
        # one worker: a single process to sample (bench.perf's labels "seqserve w=1" and "floor")
        sides = [(s.label.split()[0], s.target, s.pids[0]) for s in started(running, models, folder, [1])]
        for w in chosen:
            for c in conc:
                for r, (label, target, pid) in alternating(sides, rounds):
                    row = measure(perf, label, target, pid, w, c, folder, env, frequency, window_ms) | {"round": r}
                    print(
                        f"  {label:>8} {w.name:>14} c={c:<3} round {r} {row['throughput']:>8.0f}/s  "
                        f"server CPU {row['server_cpu_us']:7.1f} µs/request, {sum(row['samples'].values())} samples",
                        flush=True,
                    )
                    rows.append(row)
    return {"workloads": [w.name for w in chosen], "concurrency": conc, "rounds": rounds, "frequency": frequency,
            "rows": rows, "summary": summary(rows)}  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, concurrency): each library's median µs per request for seqserve and for the floor."""
    groups: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        groups.setdefault((row["workload"], row["concurrency"]), {}).setdefault(row["server"], []).append(row)
    out = []
    for (workload, c), sides in groups.items():
        entry: dict[str, Any] = {"workload": workload, "concurrency": c}
        for server, measured in sides.items():
            entry[server] = {name: statistics.median(m["us"][name] for m in measured) for name in ORDER}
            entry[server]["all"] = statistics.median(m["server_cpu_us"] for m in measured)
        out.append(entry)
    return out


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nServer CPU per request by library (perf record at {results['frequency']} Hz during perf_analyzer; one "
        f"worker; medians of {results['rounds']} alternating rounds; µs = share of samples x CPU per request):"
    )
    print(f"  {'workload':>14} {'c':>3}  {'library':<19} {'seqserve':>9} {'floor':>9} {'extra':>9}")
    for s in results["summary"]:
        ours, base = s.get("seqserve", {}), s.get("floor", {})
        for i, name in enumerate([*ORDER, "all"]):
            a, b = ours.get(name, 0.0), base.get(name, 0.0)
            head = f"{s['workload']:>14} {s['concurrency']:>3}" if i == 0 else " " * 18
            print(f"  {head}  {name:<19} {a:>9.1f} {b:>9.1f} {a - b:>+9.1f}")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "where.json")
    pa.add_options(ap, WORKLOADS, [16], rounds=2)
    ap.add_argument("--frequency", type=int, default=499, help="perf's samples per second per thread")
    args = ap.parse_args(argv)
    results = run(args.models, args.workloads, args.concurrency, args.rounds, args.frequency)
    cli.write_json(args.out, results)
    print_table(results)
    return 0


if __name__ == "__main__":
    cli.run(main)
