"""The stock tritonclient[grpc] against a real seqserve process (report produced by triton_client.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

Report = dict[str, Any]


@pytest.fixture(scope="module")
def report(triton_report: Report) -> Report:
    return triton_report


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> float:
    diff = float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    assert diff <= tol, f"max abs difference {diff} > {tol}"
    return diff


def test_health_and_server_metadata(report: Report) -> None:
    h = report["health"]
    assert h["live"] is True and h["ready"] is True
    assert h["models_ready"] == {"sentiment": True, "charlm": True, "forecaster": True}
    assert h["unknown_ready"] is False
    meta = h["server_metadata"]
    assert meta["name"] == "seqserve" and meta["version"]
    assert {"sequence", "sequence(string_id)", "statistics", "model_configuration"} <= set(meta["extensions"])


def test_model_metadata_shapes(report: Report) -> None:
    m = report["health"]["metadata"]

    def tensors(model: str, kind: str) -> dict[str, tuple[str, list[str]]]:
        return {t["name"]: (t["datatype"], t["shape"]) for t in m[model][kind]}

    assert m["sentiment"]["versions"] == ["1"] and m["sentiment"]["platform"] == "onnxruntime_onnx"
    assert tensors("sentiment", "inputs") == {"TEXT": ("BYTES", ["-1"])}
    assert tensors("sentiment", "outputs") == {"LABEL": ("BYTES", ["-1"]), "PROBABILITIES": ("FP32", ["-1", "2"])}
    assert tensors("charlm", "inputs") == {
        "TEXT": ("BYTES", ["1"]), "NUM_CHARS": ("INT32", ["1"]), "BACKSPACE": ("INT32", ["1"])
    }  # fmt: skip
    vocab = str(len(report["charlm"]["vocab"]))
    assert tensors("charlm", "outputs") == {
        "NEXT_CHAR_PROBS": ("FP32", [vocab]),
        "VOCAB": ("BYTES", [vocab]),
        "COMPLETION": ("BYTES", ["1"]),
    }
    assert tensors("forecaster", "inputs") == {"HISTORY": ("FP32", ["-1", "7"]), "COLUMNS": ("BYTES", ["7"])}
    assert tensors("forecaster", "outputs") == {
        "FORECAST": ("FP32", ["12", "7"]),  # export_tiny: horizon 12, 7 features
        "QUANTILES": ("FP32", ["3", "12", "7"]),
    }
    assert report["health"]["metadata_unknown"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in report["health"]["metadata_unknown"]["message"]


def test_model_config_and_repository_index(report: Report) -> None:
    cfg = report["health"]["config"]
    assert cfg["charlm"]["config"]["sequence_batching"]["max_sequence_idle_microseconds"] == "60000000"
    assert "sequence_batching" not in cfg["sentiment"]["config"]  # stateless
    # Triton always fills in instance_group (code reads cfg["instance_group"][0]["count"]); a stateless model is
    # batched by the server, as by Triton's dynamic batcher, up to MAX_BATCH_DELAY_MS (2 ms).
    for name in ("sentiment", "charlm"):
        assert cfg[name]["config"]["instance_group"] == [{"name": name, "kind": "KIND_CPU", "count": 1}]
    assert cfg["sentiment"]["config"]["dynamic_batching"] == {"max_queue_delay_microseconds": "2000"}
    assert "dynamic_batching" not in cfg["charlm"]["config"]  # (a sequence model: sequence_batching)
    assert [i["name"] for i in cfg["sentiment"]["config"]["input"]] == ["TEXT"]
    index = {(m["name"], m["version"], m["state"]) for m in report["health"]["index"]["models"]}
    assert index == {
        ("sentiment", "1", "READY"),
        ("charlm", "1", "READY"),
        ("charlm", "2", "READY"),
        ("forecaster", "1", "READY"),
    }
    assert sorted(report["health"]["metadata"]["charlm"]["versions"]) == ["1", "2"]


def test_sentiment_infer(report: Report) -> None:
    s = report["sentiment"]
    assert len(s["labels"]) == 3 and set(s["labels"]) <= {"negative", "positive"}
    probs = np.asarray(s["probs"])
    assert probs.shape == (3, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # LABEL is the argmax of PROBABILITIES, classes in the order negative, positive.
    assert s["labels"] == [["negative", "positive"][int(i)] for i in probs.argmax(axis=1)]
    assert s["id"] == "req-1" and s["model_version"] == "1"
    assert s["only_outputs"] == ["PROBABILITIES"] and s["only_probs_shape"] == [2, 2]
    # The first request carried tritonclient's timeout and priority; a negative timeout says what to send.
    assert s["negative_timeout"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "parameter timeout must be >= 0 microseconds (0: no limit), got -5" in s["negative_timeout"]["message"]


def test_bad_requests_name_the_tensor(report: Report) -> None:
    s, c, f = report["sentiment"], report["charlm"], report["forecaster"]
    cases = {
        "bad_dtype": (s, "TEXT"),
        "unknown_input": (s, "NUM_CHARS"),
        "unknown_output": (s, "NOPE"),
        "with_sequence": (s, "stateless"),
        "with_sequence_step": (s, "model sentiment is stateless: it does not take sequence_id"),
        "with_sequence_end": (s, "model sentiment is stateless: it does not take sequence_id"),
        "bad_shape": (c, "TEXT"),
        "missing_input": (c, "missing input TEXT"),
        # it said "must be INT32", though INT64 is taken too
        "unsigned_chars": (c, "input NUM_CHARS: datatype must be INT32 or INT64, got UINT64"),
        "too_many_chars": (c, "NUM_CHARS"),
        "bad_features": (f, "HISTORY"),
    }
    for key, (part, needle) in cases.items():
        assert part[key]["status"] == "StatusCode.INVALID_ARGUMENT", (key, part[key])
        assert needle in part[key]["message"], (key, part[key])
    assert s["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in s["unknown_model"]["message"]


def test_compressed_requests_get_the_same_answer(report: Report) -> None:
    """tritonclient's ``compression_algorithm`` (gRPC's gzip and deflate): the server reads the request as sent
    uncompressed and answers the same probabilities."""
    c = report["charlm"]
    for algorithm in ("gzip", "deflate"):
        assert isinstance(c[f"{algorithm}_probs"], list), c[f"{algorithm}_probs"]  # (else: the refusal)
        assert c[f"{algorithm}_probs"] == c["whole_probs"], algorithm


def test_charlm_sequences_match_whole_text(report: Report) -> None:
    c = report["charlm"]
    assert len(c["whole_probs"]) == len(c["vocab"])
    assert abs(sum(c["whole_probs"]) - 1.0) < 1e-4
    assert c["completion_default"] == [""]
    assert len(c["completion_12"]) == 12
    # Every piece reached the state: the sequence consumed exactly the whole text's characters.
    assert c["seq_int_steps"] == c["seq_string_steps"] == c["text_chars"]
    _close(c["seq_int_probs"], c["whole_probs"])
    _close(c["seq_string_probs"], c["whole_probs"])
    _close(c["restart_probs"], c["whole_probs"])  # sequence_start on a live id dropped its old state


def test_unknown_or_ended_sequences_are_clear_errors(report: Report) -> None:
    c = report["charlm"]
    for key in ("seq_int_after_end", "seq_string_after_end", "unknown_sequence", "unknown_string_sequence"):
        assert c[key]["status"] == "StatusCode.NOT_FOUND", (key, c[key])
        assert "unknown or expired" in c[key]["message"] and "sequence_start" in c[key]["message"], c[key]
    assert "'999999'" in c["unknown_sequence"]["message"]
    assert "'never-started'" in c["unknown_string_sequence"]["message"]


def test_stream_sequence_and_error_keeps_stream_open(report: Report) -> None:
    st = report["stream"]
    assert st["order"] == ["s0", "s1", "error", "s2", "after"]
    assert len(st["errors"]) == 1 and "no-such-model" in st["errors"][0]
    assert [st["steps_s0"], st["steps_s1"], st["steps_s2"]] == [5, 13, 19]  # "To be", ", or not", " to be"
    _close(st["last_probs"], report["charlm"]["whole_probs"])
    _close(st["other_probs"], report["charlm"]["whole_probs"])


def test_forecaster_stateless_and_sequence(report: Report) -> None:
    f = report["forecaster"]
    assert f["forecast_shape"] == [12, 7] and f["quantiles_shape"] == [3, 12, 7]
    # Rows fed in three chunks on a sequence forecast the same as all rows at once.
    assert f["seq_rows"] == 40
    _close(np.ravel(f["seq_forecast"]).tolist(), np.ravel(f["forecast"]).tolist(), tol=1e-4)


def test_statistics_count_what_was_sent(report: Report) -> None:
    s = report["sentiment"]

    def counts(stats: Report) -> tuple[int, int, int, int]:
        (m,) = stats["model_stats"]
        inf = m.get("inference_stats", {})
        return (
            int(m.get("inference_count", 0)),
            int(m.get("execution_count", 0)),
            int(inf.get("success", {}).get("count", 0)),
            int(inf.get("fail", {}).get("count", 0)),
        )

    before, after = counts(s["stats_before"]), counts(s["stats_after"])
    delta = tuple(a - b for a, b in zip(after, before, strict=True))
    assert delta == (s["texts_sent"], s["ok_requests_sent"], s["ok_requests_sent"], s["failed_requests_sent"])
    (m,) = s["stats_after"]["model_stats"]
    assert int(m["inference_stats"]["success"]["ns"]) > 0 and int(m["last_inference"]) > 0
    names = {m["name"] for m in report["stats_all"]["model_stats"]}
    assert names == {"sentiment", "charlm", "forecaster"}


def test_classification_extension(report: Report) -> None:
    """tritonclient's ``class_count`` (Triton's classification extension) was refused; it now answers, as Triton
    does, "<value>:<index>:<label>" strings, highest first: per text for sentiment, over the vocabulary for the
    char LM's next character, where a sequence step asking for it advances the sequence like any other."""
    r = report["classification"]
    assert "classification" in r["extensions"]
    assert r["top_datatype"] == "BYTES"
    assert len(r["top"]) == 2 and all(len(row) == 2 for row in r["top"])
    for row, probs, label in zip(r["top"], r["probs"], r["labels"], strict=True):
        parsed = [s.split(":", 2) for s in row]
        indexes = [int(i) for _, i, _ in parsed]
        assert indexes == sorted(range(len(probs)), key=lambda i: -probs[i])  # highest first
        for value, i, _ in parsed:
            assert value == f"{probs[int(i)]:f}"  # C's %f, as Triton's std::to_string
        assert parsed[0][2] == label  # the top class's name is the LABEL output
    assert r["one"] == [[row[0]] for row in r["top"]]
    assert r["many"] == r["top"]  # at most the classes there are
    vocab, ref = r["vocab"], r["reference_probs"]
    best = sorted(range(len(ref)), key=lambda i: -ref[i])[:3]
    assert r["next_chars"] == [f"{ref[i]:f}:{i}:{vocab[i]}" for i in best]
    # The refused request (class_count on a BYTES output) did not advance the sequence.
    assert r["bytes_refused"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "BYTES" in r["bytes_refused"]["message"] and "class_count" in r["bytes_refused"]["message"]
    assert r["last_steps"] == r["prefix_chars"] + 1
    _close(r["last_probs"], r["whole_probs"])
