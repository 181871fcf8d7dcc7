"""``make bench``'s runtime table: one ONNX Runtime run of each derived model against its parent: the int8 copies
(``training.quantized_from`` in their manifests) and the fused sentiment graph (``training.fused_from``: the same
weights), one intra-op thread as the server runs them, on the shapes serving sends: a char LM's generation step
(batch 1 and 16, one character) and a 1,024-character prompt; a sentiment batch of 1, 16 and 64 sentences of 20
words.

And what the int8 char LM's batching does to its answers on real text (Tiny Shakespeare's validation part, when
``../shared/data`` is there): 16 prompts of 100 characters and one more step, run as one batch and one by one;
the largest probability change and how often the most likely next character differs. And what the batcher's
length groups save on batches of real SST-2 sentences (``padding_effect``). And what a second ONNX Runtime intra-op
thread (``INTRA_OP_THREADS``) does to one run of each default model (``threads_effect``).

    python -m bench.runtime [--models models] [--repeats 300]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench import cli
from bench.core import char_models, versions
from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest
from service.core.runtime import CPU, Runtime
from service.settings import Settings

TEXT = cli.ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SST2_DEV = cli.ROOT.parent / "shared" / "data" / "sst2" / "dev.tsv"
SHAPES: dict[str, list[tuple[int, int]]] = {  # task -> (batch, time) per case
    "charlm": [(1, 1), (16, 1), (1, 1024)],
    "sentiment": [(1, 20), (16, 20), (64, 20)],
}


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """The model's ORT session exactly as the server builds it (``service.core.runtime.Runtime``, default
    settings: one intra-op thread, no spinning, CPU; ``threads`` = the ``intra_op_threads`` setting)."""
    manifest = Manifest.load(path / MANIFEST_FILE)
    return Runtime(manifest, path / MODEL_FILE, Settings(intra_op_threads=threads), [CPU], {}).session


def feeds(m: Manifest, batch: int, time_steps: int, rng: np.random.Generator) -> dict[str, Any]:
    vocab = len(m.tokenizer.vocab) if m.tokenizer is not None else 2
    out: dict[str, Any] = {"input_ids": rng.integers(2, vocab, (batch, time_steps)).astype(np.int64)}
    if m.has_input("lengths"):
        out["lengths"] = np.full(batch, time_steps, np.int64)
    return out | zero_states(m.states, {"batch": batch})


def per_run_us(sess: ort.InferenceSession, feed: dict[str, Any], repeats: int) -> float:
    """Median of ``repeats`` timed runs, after a warm-up, in microseconds."""
    for _ in range(max(3, repeats // 10)):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


DERIVED = {"quantized_from": "int8", "fused_from": "fused"}  # manifest training key -> how it was derived


def derived_pairs(models: Path) -> list[tuple[Path, Path, Manifest, str]]:
    """(parent dir, derived dir, derived manifest, "int8", "fused" or "ensemble") for every derived version under
    ``models``; an ensemble's parent is its first member committed under ``models`` (its other members' cost is
    what the comparison shows)."""
    pairs = []
    for path in sorted(models.glob(f"*/*/{MANIFEST_FILE}")):
        m = Manifest.load(path)
        if m.task not in SHAPES:
            continue
        # The immediate parent: an int8 copy of a fused graph keeps its parent's fused_from in its training record.
        key = next((k for k in DERIVED if m.training.get(k)), None)
        if key is not None:
            name, version = str(m.training[key]).split("/")
            pairs.append((models / name / version, path.parent, m, DERIVED[key]))
        member = first_committed_member(models, m.training)
        if member is not None:
            pairs.append((member, path.parent, m, "ensemble"))
    return pairs


def first_committed_member(models: Path, training: dict[str, Any]) -> Path | None:
    """The first folder under ``models`` that holds one of an ensemble's members (the same NAME/VERSION and model
    file), or None (not an ensemble, or none of its members is there)."""
    members = zip(training.get("ensemble_of") or [], training.get("member_sha256") or [], strict=False)
    for member, sha in members:
        folder = models / Path(member).parent.name / Path(member).name
        if (folder / MANIFEST_FILE).exists() and Manifest.load(folder / MANIFEST_FILE).sha256 == sha:
            return folder
    return None


def run(models: Path, repeats: int = 300) -> list[dict[str, Any]]:
    rows = []
    for parent, derived, m, how in derived_pairs(models):
        s_parent, s_derived = session(parent), session(derived)
        m_parent = Manifest.load(parent / MANIFEST_FILE)  # its own states (an ensemble stacks its members')
        for batch, steps in SHAPES[m.task]:
            feed = feeds(m, batch, steps, np.random.default_rng(0))
            feed_parent = feeds(m_parent, batch, steps, np.random.default_rng(0))  # the same words
            n = max(20, repeats // steps) if steps > 100 else max(20, repeats // batch)
            a, b = per_run_us(s_parent, feed_parent, n), per_run_us(s_derived, feed, n)
            rows.append({
                "parent": f"{parent.parent.name}/{parent.name}", "model": f"{m.name}/{m.version}", "how": how,
                "batch": batch, "time": steps, "parent_us": a, "model_us": b, "speedup": a / b,
            })  # fmt: skip
    return rows


def real_text_dependence(models: Path, text: Path, trials: int = 20, rows: int = 16) -> list[dict[str, Any]]:
    """Per int8 char LM: batched vs one-by-one next-character probabilities after real prompts (see above)."""
    from service.core.arrays import softmax
    from service.core.tokenizers import Encoder

    if not text.exists():
        return []
    chars = text.read_text(encoding="utf-8")
    val = chars[int(len(chars) * 0.9) :]
    out = []
    for _, path, m, how in derived_pairs(models):
        if how != "int8" or m.task != "charlm" or m.tokenizer is None:
            continue
        sess, enc, rng = session(path), Encoder(m.tokenizer), np.random.default_rng(0)
        worst, flips = [], 0
        for _ in range(trials):
            starts = rng.integers(0, len(val) - 101, rows)
            ids = np.stack([enc.encode(val[a : a + 100]) for a in starts]).astype(np.int64)
            nxt = np.stack([enc.encode(val[a + 100 : a + 101]) for a in starts]).astype(np.int64)
            _, h, c = sess.run(None, {"input_ids": ids, **zero_states(m.states, {"batch": rows})})
            batched = softmax(sess.run(None, {"input_ids": nxt, "h0": h, "c0": c})[0][:, -1])
            alone = []
            for i in range(rows):
                _, hi, ci = sess.run(None, {"input_ids": ids[i : i + 1], **zero_states(m.states, {"batch": 1})})
                alone.append(softmax(sess.run(None, {"input_ids": nxt[i : i + 1], "h0": hi, "c0": ci})[0][:, -1]))
            one = np.concatenate(alone)
            worst.append(float(np.abs(one - batched).max()))
            flips += int((one.argmax(1) != batched.argmax(1)).sum())
        out.append({
            "model": f"{m.name}/{m.version}", "steps": trials * rows, "max_prob_change": max(worst),
            "median_trial_max_prob_change": float(np.median(worst)), "argmax_changed": flips,
        })  # fmt: skip
    return out


def cache_effect(models: Path, repeats: int = 2000) -> list[dict[str, Any]]:
    """What one ONNX Runtime run does to the Python work after it: the char LM's next-character softmax (one row of
    the vocabulary, ``service.core.arrays.softmax``) timed alone in a loop, and right after a batch-1 step of each
    char LM version. A run that streams more weights than a core's L2 cache holds evicts the interpreter's and
    numpy's working set, so at concurrency 1 every step's Python runs cold."""
    from service.core.arrays import softmax

    logits = np.random.default_rng(0).normal(size=(1, 65)).astype(np.float32)

    def timed(before: Any) -> float:
        total = 0
        for _ in range(repeats):
            before()
            t0 = time.perf_counter_ns()
            softmax(logits).astype(np.float32)
            total += time.perf_counter_ns() - t0
        return total / repeats / 1e3

    rows = [{"after": "nothing (hot)", "softmax_us": timed(lambda: None)}]
    for ref in char_models(models):
        path = models / ref.name / str(ref.version)
        m, sess = Manifest.load(path / MANIFEST_FILE), session(path)
        feed = feeds(m, 1, 1, np.random.default_rng(0))
        rows.append(
            {"after": f"a {m.name}/{m.version} step", "softmax_us": timed(lambda s=sess, f=feed: s.run(None, f))}
        )
    return rows


def newest(models: Path, name: str) -> Path | None:
    """The folder of the newest committed version of ``name`` (what the server answers by default), or None."""
    committed = versions(models, name)
    return models / name / str(committed[-1]) if committed else None


def sst2_sentences(m: Manifest, data: Path, rng: np.random.Generator) -> list[Any]:
    """The SST-2 dev sentences as ``m``'s word ids; synthetic lengths of 2-50 words when ``data`` is absent."""
    from service.core.tokenizers import Encoder

    assert m.tokenizer is not None
    if data.exists():
        enc = Encoder(m.tokenizer)
        return [enc.encode(line.split("\t")[0]) for line in data.read_text(encoding="utf-8").splitlines()[1:]]
    return [rng.integers(2, len(m.tokenizer.vocab), n).astype(np.int64) for n in rng.integers(2, 51, 872)]


def sentence_feed(m: Manifest, rows: list[Any]) -> dict[str, Any]:
    """One sentiment run's feeds: ``rows`` padded to the longest, their lengths and zero states."""
    from service.core.arrays import right_pad

    ids, lengths = right_pad(rows, 0)
    return {"input_ids": ids, "lengths": lengths, **zero_states(m.states, {"batch": len(rows)})}


def padding_effect(models: Path, data: Path = SST2_DEV, trials: int = 30) -> list[dict[str, Any]]:
    """The default sentiment model on batches of real SST-2 dev sentences (random draws; synthetic lengths of 2-50
    words when ``../shared/data`` is absent) padded to their longest: one ORT run against the batcher's length
    groups (``service.core.batching.padding_groups`` with the default ``pad_split_tokens``)."""
    from service.core.batching import StepInput, padding_groups

    path = newest(models, "sentiment")
    if path is None:
        return []
    m, sess, rng = Manifest.load(path / MANIFEST_FILE), session(path), np.random.default_rng(0)
    sentences = sst2_sentences(m, data, rng)

    def run(rows: list[Any]) -> None:
        sess.run(None, sentence_feed(m, rows))

    min_saving, out = Settings().pad_split_tokens, []
    for batch in (4, 16, 64):
        whole = grouped = 0.0
        runs = 0
        for _ in range(trials):
            rows = [sentences[i] for i in rng.integers(0, len(sentences), batch)]
            t0 = time.perf_counter()
            run(rows)
            whole += time.perf_counter() - t0
            items = [StepInput({"input_ids": r[None, :]}, 1, pad={"input_ids": 0}) for r in rows]
            groups = padding_groups(items, min_saving)
            t0 = time.perf_counter()
            for g in groups:
                run([rows[i] for i in g])
            grouped += time.perf_counter() - t0
            runs += len(groups)
        out.append({
            "model": f"{m.name}/{m.version}", "batch": batch, "one_run_ms": whole / trials * 1e3,
            "grouped_ms": grouped / trials * 1e3, "runs_per_batch": runs / trials, "speedup": whole / grouped,
        })  # fmt: skip
    return out


THREAD_CASES: dict[str, list[tuple[int, int]]] = {  # model name -> (batch, time) per case
    "charlm": [(1, 1), (16, 1), (64, 1), (1, 1024)],
    "charlm-int8": [(1, 1), (16, 1), (64, 1)],
    "sentiment": [(1, 0), (4, 0), (16, 0), (64, 0)],  # time 0: random real SST-2 dev sentences
}


def threads_effect(models: Path, repeats: int = 300, data: Path = SST2_DEV) -> list[dict[str, Any]]:
    """The newest version of each model with one and with two ORT intra-op threads (the ``intra_op_threads``
    setting), on the same feeds: char LM steps and a prompt, sentiment batches of real sentences (one run, padded
    to the longest). Two threads on a 2-core machine: what a second core buys ORT alone, with nothing else
    running."""
    out = []
    for name, cases in THREAD_CASES.items():
        path = newest(models, name)
        if path is None:
            continue
        m, rng = Manifest.load(path / MANIFEST_FILE), np.random.default_rng(0)
        one, two = session(path, 1), session(path, 2)
        sentences = sst2_sentences(m, data, rng) if m.task == "sentiment" else []
        for batch, steps in cases:
            if sentences:
                rows = [sentences[i] for i in rng.integers(0, len(sentences), batch)]
                feed, steps = sentence_feed(m, rows), max(len(r) for r in rows)
            else:
                feed = feeds(m, batch, steps, rng)
            n = max(10, repeats // max(1, batch * steps // 16))
            a, b = per_run_us(one, feed, n), per_run_us(two, feed, n)
            out.append({
                "model": f"{m.name}/{m.version}", "batch": batch, "time": steps, "one_thread_us": a,
                "two_threads_us": b, "speedup": a / b,
            })  # fmt: skip
    return out


def print_table(
    rows: list[dict[str, Any]],
    dependence: list[dict[str, Any]] | None = None,
    cache: list[dict[str, Any]] | None = None,
    padding: list[dict[str, Any]] | None = None,
    threads: list[dict[str, Any]] | None = None,
) -> None:
    print(
        "\nONNX Runtime, one run on one thread (median µs): int8 copies, fused graphs and ensembles against their "
        "parents (an ensemble's: one of its members):"
    )
    print(f"  {'parent':>12} {'model':>20} {'how':>8} {'batch x time':>13} {'parent':>9} {'model':>9} {'speed-up':>8}")
    for r in rows:
        shape = f"{r['batch']} x {r['time']}"
        print(
            f"  {r['parent']:>12} {r['model']:>20} {r['how']:>8} {shape:>13} {r['parent_us']:>9.1f} "
            f"{r['model_us']:>9.1f} {r['speedup']:>7.2f}x"
        )
    for d in dependence or []:
        print(
            f"  {d['model']}: batched with 15 other real prompts instead of alone, a next-character probability "
            f"moves by up to {d['max_prob_change']:.3f} (median over trials {d['median_trial_max_prob_change']:.3f}); "
            f"the most likely character changes in {d['argmax_changed']} of {d['steps']} steps"
        )
    if cache:
        print("  The char LM's softmax over one row (µs), timed after:")
        print("    " + "; ".join(f"{c['after']}: {c['softmax_us']:.1f}" for c in cache))
    if padding:
        print(f"  {padding[0]['model']} on random SST-2 dev sentences, padded to the batch's longest in one run, or in")
        print("  the batcher's length groups (pad_split_tokens), ms per batch:")
        for p in padding:
            print(
                f"    {p['batch']:>3} sentences: {p['one_run_ms']:.2f} in one run, {p['grouped_ms']:.2f} in "
                f"{p['runs_per_batch']:.1f} runs on average ({p['speedup']:.2f}x)"
            )
    if threads:
        print("  One run with 1 and with 2 intra-op threads (INTRA_OP_THREADS; ORT alone, median µs):")
        print(f"    {'model':>16} {'batch x time':>13} {'1 thread':>9} {'2 threads':>9} {'speed-up':>8}")
        for t in threads:
            shape = f"{t['batch']} x {t['time']}"
            print(
                f"    {t['model']:>16} {shape:>13} {t['one_thread_us']:>9.1f} {t['two_threads_us']:>9.1f} "
                f"{t['speedup']:>7.2f}x"
            )


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "runtime.json")
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args(argv)
    rows, dependence = run(args.models, args.repeats), real_text_dependence(args.models, TEXT)
    cache, padding, threads = cache_effect(args.models), padding_effect(args.models), threads_effect(args.models)
    cli.write_json(
        args.out,
        {"runs": rows, "batch_dependence": dependence, "cache_effect": cache, "padding": padding, "threads": threads},
    )
    print_table(rows, dependence, cache, padding, threads)
    return 0


if __name__ == "__main__":
    cli.run(main)
