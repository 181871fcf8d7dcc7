"""Drives seqserve's KServe v2 endpoint with the stock ``tritonclient[grpc]``; prints one JSON report.

Run in its OWN interpreter (``python triton_client.py --url 127.0.0.1:PORT``): tritonclient registers the
upstream ``inference`` protos in protobuf's default pool, which clashes with our generated ones, so the
pytest process must never import it. ``test_tritonclient.py`` asserts on the report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import queue
import time
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

Report = dict[str, Any]


def _refusal(e: InferenceServerException) -> dict[str, str]:
    return {"status": str(e.status()), "message": str(e.message())}


def _error(fn: Callable[[], object]) -> dict[str, str]:
    """Runs ``fn`` expecting a server error; returns its status and message."""
    try:
        fn()
    except InferenceServerException as e:
        return _refusal(e)
    return {"status": "OK", "message": ""}


def _text(values: list[str], shape: list[int] | None = None) -> grpcclient.InferInput:
    data = np.array([v.encode() for v in values], dtype=np.object_)
    t = grpcclient.InferInput("TEXT", shape or [len(values)], "BYTES")
    t.set_data_from_numpy(data.reshape(shape or [len(values)]))
    return t


def _int32(name: str, value: int) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, [1], "INT32")
    t.set_data_from_numpy(np.array([value], dtype=np.int32))
    return t


def _history(rows: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput("HISTORY", list(rows.shape), "FP32")
    t.set_data_from_numpy(rows.astype(np.float32))
    return t


def _charlm(c: grpcclient.InferenceServerClient, text: str, **seq: Any) -> grpcclient.InferResult:
    return c.infer("charlm", [_text([text], [1])], **seq)


def health(c: grpcclient.InferenceServerClient) -> Report:
    return {
        "live": c.is_server_live(),
        "ready": c.is_server_ready(),
        "models_ready": {m: c.is_model_ready(m) for m in ("sentiment", "charlm", "forecaster")},
        "unknown_ready": c.is_model_ready("no-such-model"),
        "server_metadata": c.get_server_metadata(as_json=True),
        "metadata": {m: c.get_model_metadata(m, as_json=True) for m in ("sentiment", "charlm", "forecaster")},
        "config": {m: c.get_model_config(m, as_json=True) for m in ("sentiment", "charlm")},
        "index": c.get_model_repository_index(as_json=True),
        "metadata_unknown": _error(lambda: c.get_model_metadata("no-such-model")),
    }


def sentiment(c: grpcclient.InferenceServerClient) -> Report:
    before = c.get_inference_statistics("sentiment", as_json=True)
    texts = ["a great and wonderful film", "awful boring mess", "fine"]
    r = c.infer(
        "sentiment",
        [_text(texts)],
        outputs=[grpcclient.InferRequestedOutput("LABEL"), grpcclient.InferRequestedOutput("PROBABILITIES")],
        request_id="req-1",
        timeout=30_000_000,  # Triton's schedule-policy parameters: 30 s to answer, priority level 1
        priority=1,
    )
    only = c.infer("sentiment", [_text(texts[:2])], outputs=[grpcclient.InferRequestedOutput("PROBABILITIES")])
    bad = grpcclient.InferInput("TEXT", [1], "FP32")
    bad.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    errors = {  # each fails after the model is resolved, so each counts as a failed sentiment request
        "bad_dtype": _error(lambda: c.infer("sentiment", [bad])),
        "unknown_input": _error(lambda: c.infer("sentiment", [_int32("NUM_CHARS", 1)])),
        "unknown_output": _error(
            lambda: c.infer("sentiment", [_text(["x"])], outputs=[grpcclient.InferRequestedOutput("NOPE")])
        ),
        "with_sequence": _error(lambda: c.infer("sentiment", [_text(["x"])], sequence_id=5, sequence_start=True)),
        # a step (and an end) of a sequence on the stateless model: NOT_FOUND "send sequence_start=true" before
        "with_sequence_step": _error(lambda: c.infer("sentiment", [_text(["x"])], sequence_id=5)),
        "with_sequence_end": _error(lambda: c.infer("sentiment", [_text(["x"])], sequence_id=5, sequence_end=True)),
    }
    after = c.get_inference_statistics("sentiment", as_json=True)
    response = r.get_response(as_json=True)
    return {
        "labels": [x.decode() for x in r.as_numpy("LABEL")],
        "probs": r.as_numpy("PROBABILITIES").tolist(),
        "id": response["id"],
        "model_version": response["model_version"],
        "only_outputs": [o["name"] for o in only.get_response(as_json=True)["outputs"]],
        "only_probs_shape": list(only.as_numpy("PROBABILITIES").shape),
        **errors,
        "unknown_model": _error(lambda: c.infer("no-such-model", [_text(["x"])])),
        "negative_timeout": _error(lambda: c.infer("sentiment", [_text(["x"])], timeout=-5)),
        "stats_before": before,
        "stats_after": after,
        "texts_sent": len(texts) + 2,
        "ok_requests_sent": 2,
        "failed_requests_sent": len(errors),
    }


def charlm(c: grpcclient.InferenceServerClient) -> Report:
    text = "To be, or not to be"
    pieces = ["To be", ", or not", " to be"]
    whole = _charlm(c, text)
    out: Report = {
        "text_chars": len(text),
        "whole_probs": whole.as_numpy("NEXT_CHAR_PROBS").tolist(),
        "vocab": [v.decode() for v in whole.as_numpy("VOCAB")],
        "completion_default": [v.decode() for v in whole.as_numpy("COMPLETION")],
    }
    for algorithm in ("gzip", "deflate"):  # requests compressed by gRPC, as tritonclient's compression_algorithm asks
        try:
            answer = _charlm(c, text, compression_algorithm=algorithm)
            out[f"{algorithm}_probs"] = answer.as_numpy("NEXT_CHAR_PROBS").tolist()
        except InferenceServerException as e:
            out[f"{algorithm}_probs"] = _refusal(e)
    gen = c.infer("charlm", [_text([text], [1]), _int32("NUM_CHARS", 12)])
    out["completion_12"] = gen.as_numpy("COMPLETION")[0].decode()
    out["too_many_chars"] = _error(lambda: c.infer("charlm", [_text(["a"], [1]), _int32("NUM_CHARS", 10**6)]))
    out["bad_shape"] = _error(lambda: c.infer("charlm", [_text(["a", "b"])]))
    out["missing_input"] = _error(lambda: c.infer("charlm", [_int32("NUM_CHARS", 3)]))
    unsigned = grpcclient.InferInput("NUM_CHARS", [1], "UINT64")
    unsigned.set_data_from_numpy(np.array([3], dtype=np.uint64))
    out["unsigned_chars"] = _error(lambda: c.infer("charlm", [_text(["a"], [1]), unsigned]))
    for key, seq_id in (("int", 42), ("string", "user-7:chat")):
        last = None
        for i, piece in enumerate(pieces):
            last = _charlm(c, piece, sequence_id=seq_id, sequence_start=i == 0, sequence_end=i == len(pieces) - 1)
        assert last is not None
        out[f"seq_{key}_probs"] = last.as_numpy("NEXT_CHAR_PROBS").tolist()
        out[f"seq_{key}_steps"] = last.get_response().parameters["seqserve_steps"].int64_param
        # The sequence ended: continuing it must fail, saying why.
        out[f"seq_{key}_after_end"] = _error(functools.partial(_charlm, c, "x", sequence_id=seq_id))
    # A new start on a live id resets it.
    _charlm(c, "garbage that will be dropped", sequence_id=77, sequence_start=True)
    _charlm(c, "To be, or not", sequence_id=77, sequence_start=True)
    restarted = _charlm(c, " to be", sequence_id=77, sequence_end=True)
    out["restart_probs"] = restarted.as_numpy("NEXT_CHAR_PROBS").tolist()
    out["unknown_sequence"] = _error(lambda: _charlm(c, "hi", sequence_id=999_999))
    out["unknown_string_sequence"] = _error(lambda: _charlm(c, "hi", sequence_id="never-started"))
    return out


def stream(c: grpcclient.InferenceServerClient) -> Report:
    """Triton's bidirectional stream: a sequence step by step, with a failing request in the middle."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    pieces = ["To be", ", or not", " to be"]
    for i, piece in enumerate(pieces):
        c.async_stream_infer(
            "charlm",
            [_text([piece], [1])],
            request_id=f"s{i}",
            sequence_id=4242,
            sequence_start=i == 0,
            sequence_end=i == len(pieces) - 1,
        )
        if i == 1:
            c.async_stream_infer("no-such-model", [_text(["x"], [1])], request_id="bad")
    got = [results.get(timeout=60) for _ in range(len(pieces) + 1)]
    # The stream is still open after the error: one more (stateless) request.
    c.async_stream_infer("charlm", [_text(["To be, or not to be"], [1])], request_id="after")
    got.append(results.get(timeout=60))
    c.stop_stream()
    report: Report = {"order": [], "errors": []}
    for result, error in got:
        if error is not None:
            report["errors"].append(str(error.message()))
            report["order"].append("error")
        else:
            report["order"].append(result.get_response().id)
            report[f"steps_{result.get_response().id}"] = result.get_response().parameters["seqserve_steps"].int64_param
            report["last_probs" if result.get_response().id == "s2" else "other_probs"] = result.as_numpy(
                "NEXT_CHAR_PROBS"
            ).tolist()
    return report


def keepalive(url: str, pause: float) -> Report:
    """A stream that pings every second through a pause (tritonclient's ``KeepAliveOptions``, as clients behind a
    NAT set them): a sequence step, ``pause`` seconds of quiet, another step. Each answer's step count, or the
    stream's error."""
    options = grpcclient.KeepAliveOptions(
        keepalive_time_ms=1000,
        keepalive_timeout_ms=5000,
        keepalive_permit_without_calls=True,
        http2_max_pings_without_data=0,
    )
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    report: Report = {"answers": []}
    with grpcclient.InferenceServerClient(url, keepalive_options=options) as c:
        c.start_stream(callback=lambda result, error: results.put((result, error)))
        for i, piece in enumerate(["To be", ", or"]):
            if i:
                time.sleep(pause)
            with contextlib.suppress(InferenceServerException):  # the stream ended meanwhile: its callback says why
                c.async_stream_infer("charlm", [_text([piece], [1])], sequence_id=31, sequence_start=i == 0)
            result, error = results.get(timeout=60)
            if error is not None:
                report["answers"].append(_refusal(error))
                break
            report["answers"].append(result.get_response().parameters["seqserve_steps"].int64_param)
        c.stop_stream()
    return report


def forecaster(c: grpcclient.InferenceServerClient) -> Report:
    meta = c.get_model_metadata("forecaster", as_json=True)
    features = int(meta["inputs"][0]["shape"][1])
    rng = np.random.default_rng(0)
    rows = (rng.normal(size=(40, features)) * 3 + 10).astype(np.float32)  # (rows, features), original units
    whole = c.infer("forecaster", [_history(rows)])
    last = None
    for i, (a, b) in enumerate([(0, 25), (25, 33), (33, 40)]):
        last = c.infer("forecaster", [_history(rows[a:b])], sequence_id="fc-1", sequence_start=i == 0)
    assert last is not None
    bad = rng.normal(size=(10, features + 1)).astype(np.float32)
    return {
        "forecast": whole.as_numpy("FORECAST").tolist(),
        "quantiles_shape": list(whole.as_numpy("QUANTILES").shape),
        "forecast_shape": list(whole.as_numpy("FORECAST").shape),
        "seq_forecast": last.as_numpy("FORECAST").tolist(),
        "seq_rows": last.get_response().parameters["seqserve_steps"].int64_param,
        "bad_features": _error(lambda: c.infer("forecaster", [_history(bad)])),
    }


def trained(c: grpcclient.InferenceServerClient) -> Report:
    """The committed (trained) models: clear-cut sentiment, a charlm sequence, real forecast shapes."""
    r = c.infer("sentiment", [_text(["a wonderful , moving and beautifully acted film", "a dull , tedious mess"])])
    text = "ROMEO:\nBut soft, what light through yonder window breaks"
    whole = _charlm(c, text)
    cut = [0, 7, 20, 33, len(text)]
    last = None
    for i in range(len(cut) - 1):
        last = _charlm(c, text[cut[i] : cut[i + 1]], sequence_id="trained", sequence_start=i == 0)
    assert last is not None
    meta = c.get_model_metadata("forecaster", as_json=True)
    window = 96
    features = int(meta["inputs"][0]["shape"][1])
    t = np.arange(2 * window, dtype=np.float32)[:, None]
    rows = (10 + 3 * np.sin(2 * np.pi * t / 24) + np.zeros((1, features), dtype=np.float32)).astype(np.float32)
    fc = c.infer("forecaster", [_history(rows)])
    # charlm-int8/2 and /3 (static int8 of charlm/1 and /2): the same pieces through a sequence give bit-identical
    # probabilities.
    int8 = {}
    for version in ("2", "3"):
        exact = c.infer("charlm-int8", [_text([text], [1])], model_version=version)
        for i in range(len(cut) - 1):
            piece = [_text([text[cut[i] : cut[i + 1]]], [1])]
            sid = f"int8-{version}"
            stepped = c.infer("charlm-int8", piece, model_version=version, sequence_id=sid, sequence_start=i == 0)
        int8[stepped.get_response().model_version] = {
            "whole": exact.as_numpy("NEXT_CHAR_PROBS").tolist(), "seq": stepped.as_numpy("NEXT_CHAR_PROBS").tolist()
        }  # fmt: skip
    return {
        "int8": int8,
        "labels": [x.decode() for x in r.as_numpy("LABEL")],
        "whole_probs": whole.as_numpy("NEXT_CHAR_PROBS").tolist(),
        "seq_probs": last.as_numpy("NEXT_CHAR_PROBS").tolist(),
        "seq_steps": last.get_response().parameters["seqserve_steps"].int64_param,
        "text_chars": len(text),
        "prefix_probs": _charlm(c, text[cut[-2] :]).as_numpy("NEXT_CHAR_PROBS").tolist(),
        "forecast_shape": list(fc.as_numpy("FORECAST").shape),
        "quantiles": fc.as_numpy("QUANTILES").tolist(),
        "forecast_finite": bool(np.isfinite(fc.as_numpy("FORECAST")).all()),
        "metadata": meta,
    }


def classification(c: grpcclient.InferenceServerClient) -> Report:
    """Triton's classification extension (``class_count``) on sentiment and on a char-LM sequence step."""
    texts = ["a great and wonderful film", "awful boring mess"]

    def out(name: str, count: int = 0) -> grpcclient.InferRequestedOutput:
        return grpcclient.InferRequestedOutput(name, class_count=count)

    plain = c.infer("sentiment", [_text(texts)], outputs=[out("LABEL"), out("PROBABILITIES")])
    top = c.infer("sentiment", [_text(texts)], outputs=[out("PROBABILITIES", 2)])
    one = c.infer("sentiment", [_text(texts)], outputs=[out("PROBABILITIES", 1)])
    many = c.infer("sentiment", [_text(texts)], outputs=[out("PROBABILITIES", 50)])
    prefix = "To be, or not to b"
    reference = _charlm(c, prefix)
    first = c.infer(
        "charlm", [_text([prefix], [1])], sequence_id=5, sequence_start=True, outputs=[out("NEXT_CHAR_PROBS", 3)]
    )
    refused = _error(lambda: c.infer("charlm", [_text(["e"], [1])], sequence_id=5, outputs=[out("VOCAB", 2)]))
    last = _charlm(c, "e", sequence_id=5, sequence_end=True)

    def strings(r: grpcclient.InferResult, name: str) -> list[Any]:
        return cast(list[Any], np.vectorize(bytes.decode, otypes=[object])(r.as_numpy(name)).tolist())

    return {
        "labels": [x.decode() for x in plain.as_numpy("LABEL")],
        "probs": plain.as_numpy("PROBABILITIES").tolist(),
        "top": strings(top, "PROBABILITIES"),
        "top_datatype": top.get_output("PROBABILITIES").datatype,
        "one": strings(one, "PROBABILITIES"),
        "many": strings(many, "PROBABILITIES"),
        "reference_probs": reference.as_numpy("NEXT_CHAR_PROBS").tolist(),
        "vocab": [v.decode() for v in reference.as_numpy("VOCAB")],
        "next_chars": strings(first, "NEXT_CHAR_PROBS"),
        "bytes_refused": refused,
        "last_steps": last.get_response().parameters["seqserve_steps"].int64_param,
        "last_probs": last.as_numpy("NEXT_CHAR_PROBS").tolist(),
        "whole_probs": _charlm(c, prefix + "e").as_numpy("NEXT_CHAR_PROBS").tolist(),
        "prefix_chars": len(prefix),
        "extensions": c.get_server_metadata(as_json=True).get("extensions", []),
    }


def repository(c: grpcclient.InferenceServerClient, op: str, model: str) -> Report:
    """tritonclient's load_model / unload_model, then what the server says about the model."""
    action = c.load_model if op == "load" else c.unload_model
    error = _error(lambda: action(model))
    infer = _error(lambda: c.infer(model, [_text(["a fine film"])])) if model == "sentiment" else {}
    return {
        "error": error,
        "ready": c.is_model_ready(model),
        "index": c.get_model_repository_index(as_json=True),
        "infer": infer,
        "extensions": c.get_server_metadata(as_json=True).get("extensions", []),
    }


def load_config(c: grpcclient.InferenceServerClient, model: str) -> Report:
    """tritonclient's load_model(config=...): ModelConfig's answer with its batching delay and instance count
    changed, sent back with the load; then one that changes what a load cannot; then a load without config."""
    config = c.get_model_config(model, as_json=True)["config"]
    before = json.loads(json.dumps(config))
    config["dynamic_batching"]["max_queue_delay_microseconds"] = "5000"
    config["instance_group"][0]["count"] = 2
    c.load_model(model, config=json.dumps(config))
    after = c.get_model_config(model, as_json=True)["config"]
    refused = _error(lambda: c.load_model(model, config=json.dumps({**config, "max_batch_size": 8})))
    unchanged = c.get_model_config(model, as_json=True)["config"]
    c.load_model(model)
    return {"before": before, "after": after, "refused": refused, "unchanged": unchanged,
            "again": c.get_model_config(model, as_json=True)["config"]}  # fmt: skip


def logging_extension(c: grpcclient.InferenceServerClient) -> Report:
    """tritonclient's get_log_settings / update_log_settings (Triton's logging extension)."""
    return {
        "extensions": c.get_server_metadata(as_json=True).get("extensions", []),
        "before": c.get_log_settings(as_json=True)["settings"],
        "after": c.update_log_settings({"log_verbose_level": 1, "log_format": "json"}, as_json=True)["settings"],
        "refused": _error(lambda: c.update_log_settings({"log_info": False, "log_file": "/tmp/seqserve.log"})),
        "again": c.get_log_settings(as_json=True)["settings"],
    }


def trace_extension(c: grpcclient.InferenceServerClient) -> Report:
    """tritonclient's get_trace_settings / update_trace_settings (Triton's trace extension)."""
    settings = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_file": "grpc.json"}
    return {
        "extensions": c.get_server_metadata(as_json=True).get("extensions", []),
        "before": c.get_trace_settings(as_json=True)["settings"],
        "server": c.update_trace_settings(settings=settings, as_json=True)["settings"],
        "model": c.update_trace_settings(model_name="charlm", settings={"trace_rate": "2"}, as_json=True)["settings"],
        "refused": _error(lambda: c.update_trace_settings(settings={"trace_count": "-5"})),
        "unknown": _error(lambda: c.get_trace_settings(model_name="no-such-model")),
        "again": c.get_trace_settings(as_json=True)["settings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--trained", action="store_true", help="only the checks for the committed models")
    parser.add_argument(
        "--repository", metavar="OP:MODEL", help="load:NAME, unload:NAME or load-config:NAME, then report"
    )
    parser.add_argument("--logging", action="store_true", help="only the logging extension (changes the settings)")
    parser.add_argument("--trace", action="store_true", help="only the trace extension (changes the settings)")
    parser.add_argument("--keepalive", type=float, metavar="PAUSE", help="only a pinging stream's pause of PAUSE s")
    args = parser.parse_args()
    if args.keepalive is not None:
        print(json.dumps(keepalive(args.url, args.keepalive)))
        return
    with grpcclient.InferenceServerClient(args.url) as c:
        if args.logging:
            print(json.dumps(logging_extension(c)))
            return
        if args.trace:
            print(json.dumps(trace_extension(c)))
            return
        if args.repository:
            op, _, model = args.repository.partition(":")
            print(json.dumps(load_config(c, model) if op == "load-config" else repository(c, op, model)))
            return
        if args.trained:
            print(json.dumps(trained(c)))
            return
        report = {"health": health(c), "sentiment": sentiment(c), "charlm": charlm(c), "stream": stream(c)}
        report["forecaster"] = forecaster(c)
        report["stats_all"] = c.get_inference_statistics(as_json=True)
        report["classification"] = classification(c)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
