"""A keystroke without a session: what the prefix cache (``PREFIX_CACHE_BYTES``) saves a stateless client.

A client that keeps no session (a KServe caller without a sequence, a stateless web tier) re-sends the whole text
at every keystroke. Without the cache the server feeds all of it every time; with it, only the character added
since the last call. Each keystroke here is one ``Complete`` call without a session, ``max_chars=1`` (the next
character), whose prompt is the previous one plus one character, as a typing user's would be; and again as a
KServe ``ModelInfer`` without a sequence (what a Triton client sends: the text, the next character's
distribution back), on another text so that neither finds the other's states. It is measured against a
server with the cache (the default) and one without (``SEQSERVE_PREFIX_CACHE_BYTES=0``), both with their default
worker count, for ``charlm`` at growing text lengths; the session keystroke of ``make bench``'s first table is the
same user with a session.

    python -m bench.prefixes [--models models] [--repeats 50] [--prefixes 16 256 1024 4000]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench import cli
from bench.launch import metric_families, serve
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.client import Client

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
) * 60


def typing(client: Client, start: int, repeats: int, model: str, warmup: int = 3) -> list[float]:
    """``repeats`` keystrokes from a text of ``start`` characters: each call sends the whole text so far."""
    out = []
    for i in range(warmup + repeats):
        prompt = TEXT[: start + i]
        t0 = time.perf_counter()
        (chunk,) = client.complete(prompt, model=model, max_chars=1, temperature=0.0)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
        assert chunk.finish_reason == "length"
    return out


KSERVE_TEXT = TEXT[7:]  # the KServe typist's text: no beginning in common with TEXT's


def kserve_typing(target: str, start: int, repeats: int, model: str, warmup: int = 3) -> list[float]:
    """The same typist through KServe ``ModelInfer`` without a sequence: the whole text in TEXT every time."""
    out = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for i in range(warmup + repeats):
            request = pb.ModelInferRequest(model_name=model)
            tensor = request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(KSERVE_TEXT[: start + i].encode())
            t0 = time.perf_counter()
            answer = stub.ModelInfer(request, timeout=600)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
            assert answer.outputs[0].name == "NEXT_CHAR_PROBS"
    return out


def lookups(metrics_port: int, model: str) -> dict[str, int]:
    """What the server's prefix cache answered so far (``seqserve_prefix_cache_lookups_total``), by result."""
    found = {"hit": 0, "partial": 0, "miss": 0}
    for family in metric_families(metrics_port):
        if family.name == "seqserve_prefix_cache_lookups":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("model") == model:
                    found[sample.labels["result"]] = int(sample.value)
    return found


def run(models: Path, prefixes: list[int], repeats: int, model: str = "charlm") -> list[dict[str, Any]]:
    """One row per text length: the keystroke's latency with the cache and without, and what each server's cache
    answered for that length's calls (the evidence that the cache, and only it, made the difference)."""
    if max(prefixes) + repeats + 3 > len(KSERVE_TEXT):
        raise ValueError(f"the text has {len(TEXT)} characters; use shorter prefixes or fewer repeats")
    rows: dict[int, dict[str, Any]] = {n: {"model": model, "prefix_chars": n} for n in prefixes}
    for label, env in (("cache", {}), ("no_cache", {"SEQSERVE_PREFIX_CACHE_BYTES": "0"})):
        with serve(models, env) as server, Client(server.target, timeout=600) as client:
            typists: dict[str, Callable[[int], list[float]]] = {
                "": lambda n: typing(client, n, repeats, model),
                "kserve_": lambda n: kserve_typing(server.target, n, repeats, model),
            }
            for n in prefixes:
                for api, keystrokes in typists.items():
                    before = lookups(server.metrics_port, model)
                    rows[n][api + label] = cli.percentiles(keystrokes(n))
                    after = lookups(server.metrics_port, model)
                    rows[n][api + label]["lookups"] = {k: after[k] - before[k] for k in after}
    return list(rows.values())


def print_table(rows: list[dict[str, Any]]) -> None:
    print("\nA keystroke without a session (the whole text re-sent each time; p50 ms with / without the prefix cache):")
    print(
        f"  {'model':>8}  {'text chars':>10}  {'Complete, 1 char':>26}  {'KServe ModelInfer':>26}  "
        "cache answered (hit/partial/miss)"
    )
    for row in rows:
        cells = []
        for api in ("", "kserve_"):
            c, n = row[api + "cache"], row[api + "no_cache"]
            cells.append(f"{c['p50_ms']:>7.2f} / {n['p50_ms']:>7.2f} {n['p50_ms'] / c['p50_ms']:>6.1f}x")
        got = [row[api + "cache"]["lookups"] for api in ("", "kserve_")]
        answered = ", ".join(f"{g['hit']}/{g['partial']}/{g['miss']}" for g in got)
        print(f"  {row['model']:>8}  {row['prefix_chars']:>10}  {cells[0]:>26}  {cells[1]:>26}  {answered}")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "prefixes.json")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--prefixes", type=int, nargs="+", default=[16, 256, 1024, 4000])
    ap.add_argument("--model", default="charlm")
    args = ap.parse_args(argv)
    rows = run(args.models, args.prefixes, args.repeats, args.model)
    cli.write_json(args.out, {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows})
    print_table(rows)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
