"""Triton's system shared-memory extension driven by the stock tritonclient (gRPC or HTTP) and its own
``tritonclient.utils.shared_memory`` (libcshm), as a Triton user writes it. Run in its own interpreter (the gRPC
client's protos must not meet ours); prints a JSON report. ``--url`` registers, ``--other`` (another frontend of
the same server, or the same address) infers: a region registered through one frontend serves through every one.

Usage: python shm_client.py --protocol grpc|http --url HOST:PORT --other HOST:PORT
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any

import numpy as np

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")  # (tritonclient's libcshm loader)
import tritonclient.utils.shared_memory as shm  # noqa: E402
from tritonclient.utils import InferenceServerException, serialize_byte_tensor  # noqa: E402

COLUMNS = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]


def _refusal(call: Any) -> dict[str, str]:
    try:
        call()
    except InferenceServerException as e:
        return {"status": str(e.status()), "message": str(e.message())}
    return {"status": "OK", "message": ""}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=["grpc", "http"], required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--other", required=True)
    args = parser.parse_args()
    if args.protocol == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    admin = triton.InferenceServerClient(args.url)
    user = triton.InferenceServerClient(args.other)
    tag = f"seqserve_test_{args.protocol}_{os.getpid()}"
    report: dict[str, Any] = {"extensions": list(_extensions(admin.get_server_metadata()))}

    text = bytes(serialize_byte_tensor(np.array([b"a fine film, and a moving one"], dtype=object)).item())
    history = np.random.default_rng(0).standard_normal((24, 7)).astype(np.float32)
    handles = [
        shm.create_shared_memory_region("in", f"/{tag}_in", 4096),
        shm.create_shared_memory_region("out", f"/{tag}_out", 4096),
    ]
    try:
        shm.set_shared_memory_region(handles[0], [np.frombuffer(text, dtype=np.uint8)])
        shm.set_shared_memory_region(handles[0], [history], offset=1024)
        admin.unregister_system_shared_memory()
        admin.register_system_shared_memory("in", f"/{tag}_in", 4096)
        admin.register_system_shared_memory("out", f"/{tag}_out", 2048, offset=1024)  # the second 2 KiB... of 4
        report["status"] = _status(user.get_system_shared_memory_status())
        report["status_out"] = _status(user.get_system_shared_memory_status("out"))

        # sentiment: TEXT from the region, PROBABILITIES into the other one, LABEL in the answer.
        plain = triton.InferInput("TEXT", [1], "BYTES")
        plain.set_data_from_numpy(np.array([b"a fine film, and a moving one"], dtype=object))
        expected = user.infer("sentiment", [plain])
        wire = triton.InferInput("TEXT", [1], "BYTES")
        wire.set_shared_memory("in", len(text))
        probs = triton.InferRequestedOutput("PROBABILITIES")
        probs.set_shared_memory("out", 8)
        label = triton.InferRequestedOutput("LABEL")
        got = user.infer("sentiment", [wire], outputs=[probs, label])
        out = got.get_output("PROBABILITIES")
        shape = list(out.shape) if args.protocol == "grpc" else out["shape"]
        from_region = shm.get_contents_as_numpy(handles[1], np.float32, shape, offset=1024)
        report["sentiment"] = {
            "expected": expected.as_numpy("PROBABILITIES").tolist(),
            "from_region": from_region.tolist(),
            "label": [x.decode() for x in got.as_numpy("LABEL").tolist()],
            "expected_label": [x.decode() for x in expected.as_numpy("LABEL").tolist()],
            "shape": shape,
        }

        # forecaster: HISTORY at an offset inside the region, COLUMNS in the request, FORECAST into the region.
        columns = triton.InferInput("COLUMNS", [7], "BYTES")
        columns.set_data_from_numpy(np.array([c.encode() for c in COLUMNS], dtype=object))
        hist = triton.InferInput("HISTORY", list(history.shape), "FP32")
        hist.set_data_from_numpy(history)
        expected = user.infer("forecaster", [hist, columns], outputs=[triton.InferRequestedOutput("FORECAST")])
        hist = triton.InferInput("HISTORY", list(history.shape), "FP32")
        hist.set_shared_memory("in", history.nbytes, offset=1024)
        forecast = triton.InferRequestedOutput("FORECAST")
        forecast.set_shared_memory("out", 1024, offset=256)
        user.infer("forecaster", [hist, columns], outputs=[forecast])
        want = expected.as_numpy("FORECAST")
        region = shm.get_contents_as_numpy(handles[1], np.float32, list(want.shape), offset=1024 + 256)
        report["forecast_max_diff"] = float(np.max(np.abs(region - want)))

        # Refusals, each saying what to fix; the regions and the server serve on.
        report["refusals"] = {
            "again": _refusal(lambda: admin.register_system_shared_memory("in", f"/{tag}_in", 16)),
            "no_object": _refusal(lambda: admin.register_system_shared_memory("x", f"/{tag}_missing", 16)),
            "bad_key": _refusal(lambda: admin.register_system_shared_memory("x", "../etc/passwd", 16)),
            "too_big": _refusal(lambda: admin.register_system_shared_memory("x", f"/{tag}_in", 4097)),
            "status_unknown": _refusal(lambda: user.get_system_shared_memory_status("nope")),
        }
        unknown = triton.InferInput("TEXT", [1], "BYTES")
        unknown.set_shared_memory("nope", len(text))
        report["refusals"]["unknown_region"] = _refusal(lambda: user.infer("sentiment", [unknown]))
        past = triton.InferInput("TEXT", [1], "BYTES")
        past.set_shared_memory("in", 4000, offset=1000)
        report["refusals"]["past_the_end"] = _refusal(lambda: user.infer("sentiment", [past]))
        small = triton.InferRequestedOutput("PROBABILITIES")
        small.set_shared_memory("out", 4)
        report["refusals"]["output_too_small"] = _refusal(lambda: user.infer("sentiment", [wire], outputs=[small]))

        admin.unregister_system_shared_memory("in")
        report["after_unregister"] = _status(user.get_system_shared_memory_status())
        report["refusals"]["unregistered"] = _refusal(lambda: user.infer("sentiment", [wire]))
        admin.unregister_system_shared_memory()
        report["after_unregister_all"] = _status(user.get_system_shared_memory_status())
        report["still_serving"] = user.infer("sentiment", [plain]).as_numpy("LABEL") is not None
    finally:
        for h in handles:
            shm.destroy_shared_memory_region(h)
    print(json.dumps(report))


def _extensions(meta: Any) -> list[str]:
    return list(meta["extensions"] if isinstance(meta, dict) else meta.extensions)


def _status(status: Any) -> list[list[Any]]:
    """Both clients' answers as sorted [name, key, offset, byte_size] rows (gRPC: a message; HTTP: a list)."""
    if isinstance(status, list):
        rows = [[r["name"], r["key"], int(r["offset"]), int(r["byte_size"])] for r in status]
    else:
        rows = [[r.name, r.key, r.offset, r.byte_size] for r in status.regions.values()]
    return sorted(rows)


if __name__ == "__main__":
    main()
