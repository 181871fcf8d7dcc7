"""What the frontend <-> engine codec (``service/engine/codec.py``) costs per char-LM step with ``--workers N``:
the frontend packs a KServe ``infer`` call (one character, in a sequence) and the engine unpacks it; the engine packs
its answer (an InferResult of the char LM's three outputs: 65 probabilities, the 65-character VOCAB, the completion)
and the frontend unpacks it (and, in one more row, encodes the KServe response from it). µs per message, the best
of ``--repeats`` timeit runs of ``--number`` each, one core.

    python -m bench.codec [--number 20000] [--repeats 7]
"""

from __future__ import annotations

import time
import timeit
from typing import Any

import numpy as np

from bench import cli
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.tensors import WireInput, encode_outputs
from service.core.types import InferResult, ModelRef, SequenceRef, Tensor
from service.engine import wire
from service.engine.codec import pack, pack_replies, unpack

VOCAB = [bytes([c]) for c in range(32, 97)]


def messages() -> tuple[list[Any], list[Any]]:
    """(a frontend's infer call, the engine's reply) as they cross the link: one step of a sequence."""
    header = pb.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    args = [ModelRef("charlm"), [WireInput(header, b"\x01\x00\x00\x00a")], None, SequenceRef("42"), None]
    call = [[wire.CALL, 17, "infer", args, {}, ["", True, ["0123abcd", "ModelStreamInfer", ""], None]]]
    probs = np.random.default_rng(0).random((1, len(VOCAB)), dtype=np.float32)
    outputs = [
        Tensor("NEXT_CHAR_PROBS", "FP32", probs.shape, array=probs),
        Tensor("VOCAB", "BYTES", (len(VOCAB),), items=VOCAB),
        Tensor("COMPLETION", "BYTES", (1,), items=[b"a"]),
    ]
    reply = [[17, wire.OK, InferResult("charlm", 2, outputs, inferences=1, steps=3), "charlm", True]]
    return call, reply


def measure(number: int, repeats: int) -> dict[str, float]:
    call, reply = messages()
    pack_replies(reply)  # the engine has answered before: the VOCAB list crosses as it does at every later step
    sent_call, sent_reply = pack(call), pack_replies(reply)

    def best(fn: Any) -> float:
        return round(min(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6, 2)

    def answer() -> None:  # what a frontend does with the reply: decode it, then encode the KServe response
        result = unpack(sent_reply)[0][2]
        encode_outputs(pb.ModelInferResponse(), result.model, result.version, result.outputs)

    return {
        "reply_to_response_frontend_us": best(answer),
        "call_pack_frontend_us": best(lambda: pack(call)),
        "call_unpack_engine_us": best(lambda: unpack(sent_call)),
        "reply_pack_engine_us": best(lambda: pack_replies(reply)),
        "reply_unpack_frontend_us": best(lambda: unpack(sent_reply)),
        "call_bytes": len(sent_call),
        "reply_bytes": len(sent_reply),
    }


def print_table(row: dict[str, float]) -> None:
    engine = row["call_unpack_engine_us"] + row["reply_pack_engine_us"]
    frontend = row["call_pack_frontend_us"] + row["reply_unpack_frontend_us"]
    print("\nThe engine link's codec (--workers N), µs per message of one char-LM step, one core (bench/codec.py):")
    print(f"  {'message':>8}  {'bytes':>6}  {'packed':>8}  {'unpacked':>9}")
    for name, packed, unpacked in (
        ("call", row["call_pack_frontend_us"], row["call_unpack_engine_us"]),
        ("reply", row["reply_pack_engine_us"], row["reply_unpack_frontend_us"]),
    ):
        print(f"  {name:>8}  {row[name + '_bytes']:>6}  {packed:>8.2f}  {unpacked:>9.2f}")
    print(f"  per step: the engine {engine:.1f} µs, a frontend {frontend:.1f} µs")
    response_us = row["reply_to_response_frontend_us"]
    print(f"  a frontend's reply unpacked and encoded as the KServe response: {response_us:.1f} µs")


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "codec.json")
    ap.add_argument("--number", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    row = measure(args.number, args.repeats)
    cli.write_json(args.out, {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row})
    print_table(row)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
