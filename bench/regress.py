"""Is this checkout slower than an earlier commit? perf_analyzer against seqserve at ``--base`` (a git worktree of
that commit, with that commit's own code and committed models) and against this checkout, one worker each, in
interleaved rounds (base, this; this, base; ...), so the two sides of each comparison ran seconds apart: on a
shared machine whose speed drifts by tens of percent over minutes, two runs of different days compare two
different machines.

    python -m bench.regress --base COMMIT [--version 1] [--workloads charlm-stream charlm-unary]
                            [--concurrency 1 16] [--rounds 3] [--workers 1] [--core]
                            [--env SEQSERVE_NAME=VALUE ...] [--base-env SEQSERVE_NAME=VALUE ...]

``--version`` pins the model version on both sides (perf_analyzer's ``-x``): the newest version of a model may
differ between the two commits (``charlm`` is ``charlm/2`` since 2026-12-04; its ``charlm/1`` is the same file
as before). It prints, per workload and concurrency, the median throughput and p50 of each side and the ratio
this / base of each round (its median and range), and writes them as JSON. ``--core`` compares the core alone
instead (``bench/core.py`` in each checkout, ``charlm/<--version or 1>``): CPU µs per step, steadier than
throughput on a shared machine.

When this checkout runs its compiled hot path (``python -m service.compile status``), the base's worktree is
compiled too (``python -m service.compile build`` in it, where that commit has one), so that the two sides differ
by their code and not by one being compiled; ``--base-source`` leaves the base's source to run.

``--env`` gives this checkout's side settings (``SEQSERVE_*``), ``--base-env`` the base's; neither side sees the
caller's own ``SEQSERVE_*`` variables. With ``--base HEAD`` the two sides run the same code, so this compares
settings the same way: ``--base HEAD --env SEQSERVE_ALONE_INLINE_MS=0.6`` asks what a default is worth.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import cli, pa, perf
from bench.launch import serve, server_env
from service import compiled
from service.argtypes import count


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    """A detached git worktree of ``commit`` in a temporary folder, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="seqserve-base-") as tmp:
        path = Path(tmp) / "tree"
        git = ["git", "-C", str(cli.ROOT)]
        subprocess.run([*git, "worktree", "add", "--detach", "-q", str(path), commit], check=True, capture_output=True)
        try:
            yield path
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(path)], capture_output=True)


def build_base(base: Path) -> str:
    """Compiles the base worktree's hot path (its own ``service.compile``), as this checkout's is: what the base
    runs, said in a line."""
    if not (base / "service" / "compile.py").is_file():
        return "the base has no compiled hot path (before service/compile.py): it runs from source"
    done = subprocess.run([sys.executable, "-m", "service.compile", "build"], cwd=base, env=server_env({}),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"compiling the base's hot path failed (--base-source runs it from source):\n"
                           f"{(done.stdout + done.stderr)[-3000:]}")  # fmt: skip
    return "the base's hot path compiled, as this checkout's"


def compare(
    sides: dict[str, tuple[Path, Path]],
    workloads: list[str],
    conc: list[int],
    version: str = "",
    rounds: int = 3,
    workers: int = 1,
    window_ms: int = 2000,
    envs: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """``sides``: {"base": (checkout, models), "this": (checkout, models)}; ``envs``: each side's settings
    (``SEQSERVE_*``). Both servers start first and stay up; then they are measured as ``bench.perf`` measures its
    servers (``perf.interleaved``), and each round's "this" throughput is divided by its "base" one
    (``perf.summary``)."""
    envs = envs or {}
    env = pa.environment()
    chosen = [dataclasses.replace(pa.WORKLOADS[n], version=version or pa.WORKLOADS[n].version) for n in workloads]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as running:
        servers: list[perf.Server] = []
        for label in ("base", "this"):
            tree, models = sides[label]
            settings = {"SEQSERVE_LOG_LEVEL": "WARNING", **envs.get(label, {})}
            s = running.enter_context(serve(models, settings, workers, code=tree))
            servers.append(perf.Server.of(label, s))
        rows = perf.interleaved(servers, chosen, conc, rounds, Path(tmp), env, window_ms)
    return {"workloads": workloads, "concurrency": conc, "version": version, "rounds": rounds, "workers": workers,
            "env": envs, "rows": rows, "summary": perf.summary(rows, reference="base")}  # fmt: skip


CORE = (
    "import asyncio, json, sys\nfrom pathlib import Path\nfrom bench.core import measure\n"
    "from service.core.types import ModelRef\n"
    "row = asyncio.run(measure(Path(sys.argv[1]), ModelRef('charlm', int(sys.argv[2])), int(sys.argv[3]), "
    "int(sys.argv[4])))\nprint(json.dumps(row))\n"
)


def core(
    sides: dict[str, tuple[Path, Path]],
    version: int,
    conc: list[int],
    rounds: int = 5,
    steps: int = 4000,
    envs: dict[str, dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The core alone (``bench/core.py``: servicer, data plane, batcher, ONNX Runtime; no gRPC) of each checkout
    on ``charlm/<version>``, each measurement a fresh process in that checkout (with that side's ``envs``),
    alternating as above: CPU µs per step, steadier on a shared machine than throughput through perf_analyzer. Each
    side reads only that model (a folder linking to it), not the whole repository."""
    envs = envs or {}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for label, (_, models) in sides.items():
            folders[label] = Path(tmp) / label
            (folders[label] / "charlm").mkdir(parents=True)
            (folders[label] / "charlm" / str(version)).symlink_to((models / "charlm" / str(version)).resolve())
        for c in conc:
            for r, label in perf.alternating(("base", "this"), rounds):
                args = [str(folders[label]), str(version), str(c), str(steps)]
                done = subprocess.run([sys.executable, "-c", CORE, *args], cwd=sides[label][0],
                                      env=server_env(envs.get(label, {})),
                                      capture_output=True, text=True, timeout=600)  # fmt: skip
                if done.returncode:
                    raise RuntimeError(f"the core of {label} failed:\n{done.stderr[-3000:]}")
                row = json.loads(done.stdout.splitlines()[-1])
                rows.append({"side": label, "round": r, "concurrency": c, **row})
                print(f"  {label:>4} core c={c:<3} round {r} {row['cpu_us_per_step']:8.1f} CPU µs/step", flush=True)
    out = []
    for c in conc:
        per = {(row["side"], row["round"]): row["cpu_us_per_step"] for row in rows if row["concurrency"] == c}
        ratios = [per[("this", r)] / per[("base", r)] for r in range(rounds)]
        agg = {"concurrency": c, "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
        for side in ("base", "this"):
            agg[f"{side}_cpu_us_per_step"] = statistics.median(per[(side, r)] for r in range(rounds))
        out.append(agg)
    return {"version": version, "concurrency": conc, "rounds": rounds, "steps": steps, "env": envs, "rows": rows,
            "summary": out}  # fmt: skip


def print_core(results: dict[str, Any], base: str) -> None:
    print(f"\nthe core alone (charlm/{results['version']}, no gRPC), this checkout against {base}: CPU µs per step, "
          f"medians of {results['rounds']} interleaved rounds; this/base within each round:")  # fmt: skip
    print(f"  {'c':>3} {'base':>8} {'this':>8} {'this/base':>9} {'range':>9}")
    for r in results["summary"]:
        print(f"  {r['concurrency']:>3} {r['base_cpu_us_per_step']:>8.1f} {r['this_cpu_us_per_step']:>8.1f} "
              f"{r['ratio']:>9.2f} {r['ratio_min']:.2f}-{r['ratio_max']:.2f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=cli.RESULTS / "regress.json")
    ap.add_argument("--base", required=True, help="the commit to compare against (any git revision)")
    ap.add_argument("--version", default="", help="pin this model version on both sides (-x)")
    pa.add_options(ap, ["charlm-stream", "charlm-unary"], [1, 16], rounds=3)
    ap.add_argument("--workers", type=count(1), default=1)
    ap.add_argument("--core", action="store_true", help="the core alone instead (bench/core.py, CPU µs per step)")
    ap.add_argument("--base-source", action="store_true", help="never compile the base's hot path")
    cli.add_settings(ap, "--env", "this checkout's side")
    cli.add_settings(ap, "--base-env", "the base's side")
    args = ap.parse_args(argv)
    envs = {"base": dict(args.base_env), "this": dict(args.env)}
    with worktree(args.base) as base:  # each side serves its own committed models
        sides = {"base": (base, base / "models"), "this": (cli.ROOT, cli.ROOT / "models")}
        built = not args.base_source and compiled.in_use()
        print(build_base(base) if built else "the base runs from source", flush=True)
        if args.core:
            results = core(sides, int(args.version or 1), args.concurrency, args.rounds, envs=envs)
        else:
            results = compare(
                sides, args.workloads, args.concurrency, args.version, args.rounds, args.workers, envs=envs
            )
    results["base"] = args.base
    cli.write_json(args.out, results)
    for label, env in envs.items():
        if env:
            print(f"{label}: " + " ".join(f"{k}={v}" for k, v in env.items()))
    if args.core:
        print_core(results, args.base)
    else:
        perf.print_table(results, reference="base")
    return 0


if __name__ == "__main__":
    cli.run(main)
