"""seqserve-train end to end on tiny generated data: train -> ONNX + manifest + report -> evaluate from ONNX."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service.core.arrays import zero_states
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from tests.conftest import stopped_within
from tests.training.conftest import write_csv
from tests.training.fast import FAST, TINY_FORECAST, train_tiny_forecaster
from training import learned_scale
from training.cards import NOT_CALIBRATED, TEMPERATURE_SCALED
from training.cli import main
from training.data import data_sha256, load_sst2


def _evaluate(capsys: pytest.CaptureFixture[str], model: Path, data: Path) -> dict[str, float]:
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--data", str(data)]) == 0
    result: dict[str, float] = json.loads(capsys.readouterr().out)
    return result


def _check_outputs(out: Path) -> Manifest:
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.sha256 == sha256_file(out / MODEL_FILE)
    assert m.training["parity_max_abs_diff"] <= 1e-4
    assert m.metrics and "seqserve-train evaluate" in m.metrics[0].command
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] >= 1 and report["evaluations"]
    assert (out / "training_curve.png").stat().st_size > 1000
    return m


@pytest.mark.slow
def test_charlm_train_evaluate_resume_sample(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = tmp_path / "models" / "lm" / "2", tmp_path / "run"
    args = ["charlm", "--data", str(tiny_text), "--out", str(out), "--run-dir", str(run), *FAST]
    args += ["--hidden", "16", "--layers", "2", "--embedding", "8", "--batch-size", "4", "--bptt", "16"]
    assert main([*args, "--epochs", "2", "--eval-every", "10"]) == 0
    m = _check_outputs(out)
    assert (m.name, m.version, m.task, m.stateful) == ("lm", 2, "charlm", True)
    assert m.description.startswith(f"Character-level LSTM language model trained on {tiny_text.name} (first 90%")
    assert m.card is not None and m.card.data.startswith("The file named in training.data")
    metric = m.metrics[0]
    assert metric.name == "val_loss_nats_per_char" and metric.value < np.log(len(m.tokenizer.vocab))  # type: ignore[union-attr]
    assert _evaluate(capsys, out, tiny_text)["val_loss_nats_per_char"] == pytest.approx(metric.value, abs=1e-4)
    first = json.loads((out / "metrics.json").read_text())["steps"]
    assert (run / "checkpoint.pt").exists()
    assert main([*args, "--epochs", "3", "--eval-every", "10", "--resume"]) == 2  # never into the model it wrote
    assert "already exists and is not empty" in capsys.readouterr().err
    more = out.parent / "3"  # more epochs of the same run: a new version
    args[args.index(str(out))] = str(more)
    assert main([*args, "--epochs", "3", "--eval-every", "10", "--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert json.loads((more / "metrics.json").read_text())["steps"] > first
    assert main([*args, "--epochs", "4", "--hidden", "8", "--resume", "--out", str(out.parent / "4")]) == 2
    err = capsys.readouterr().err  # other settings than the checkpoint's: named, not a load_state_dict traceback
    assert f"--resume: {run / 'checkpoint.pt'} was saved by a run with other settings" in err and err.count("\n") == 1
    assert not (out.parent / "4").exists()
    assert main(["sample", "--model", str(out), "--prompt", "RO", "--length", "20", "--top-k", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("RO") and len(text.rstrip("\n")) >= 20


@pytest.mark.slow
def test_charlm_half_stores_float16_weights_that_answer_as_the_float32_export(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--half`` (charlm/2 in the image): the same seeded run exported twice, once with its large weights stored as
    float16. Half the bytes, every large tensor float16 and cast back, answers within float16 rounding of the
    float32 file's, and the manifest says so."""
    common = ["charlm", "--data", str(tiny_text), *FAST, "--hidden", "32", "--layers", "2", "--embedding", "8"]
    common += ["--batch-size", "4", "--bptt", "16", "--epochs", "1", "--eval-every", "10", "--seed", "3"]
    full, half = tmp_path / "models" / "lm" / "1", tmp_path / "models" / "lm" / "2"
    assert main([*common, "--out", str(full), "--run-dir", str(tmp_path / "r1")]) == 0
    assert main([*common, "--out", str(half), "--run-dir", str(tmp_path / "r2"), "--half"]) == 0
    m = _check_outputs(half)
    assert m.training["weights"] == "float16 (computed in float32)" and "--half" in m.training["command"]
    assert 0 < m.training["parity_max_abs_diff_half"] <= 1e-2 and "float16" in (m.architecture.notes or "")
    assert "weights" not in Manifest.load(full / MANIFEST_FILE).training
    graph = onnx.load(str(half / MODEL_FILE)).graph
    f16 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert f16 and {n.input[0] for n in graph.node if n.op_type == "Cast"} >= f16
    assert (half / MODEL_FILE).stat().st_size < 0.7 * (full / MODEL_FILE).stat().st_size
    ids = np.random.default_rng(0).integers(0, len(m.tokenizer.vocab), size=(3, 40)).astype(np.int64)  # type: ignore[union-attr]
    feeds = {"input_ids": ids, **zero_states(m.states, {"batch": 3})}
    a, b = (ort.InferenceSession(str(d / MODEL_FILE)).run(None, feeds) for d in (full, half))
    assert 0 < max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) <= 1e-2
    assert _evaluate(capsys, half, tiny_text)["val_loss_nats_per_char"] == pytest.approx(m.metrics[0].value, abs=1e-4)


@pytest.mark.slow
def test_sentiment_train_and_evaluate(tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sentiment" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--hidden", "16", "--embedding", "16", "--epochs", "8", "--batch-size", "16", "--heldout-fraction", "0.2"]
    args += ["--lr", "0.01", "--dropout", "0", "--patience", "8"]
    assert main(args) == 0
    m = _check_outputs(out)
    assert m.labels == ["negative", "positive"] and m.architecture.directions == 2
    # sentiment/1's recipe: --glove-dropout (default 0.25) applies only with --glove or --lexicon
    assert m.training["blank_dropout"] == 0.0 and "frozen_words_added" not in m.training
    assert [x.name for x in m.metrics] == ["accuracy", "heldout_accuracy", "ece"]
    # a temperature was fitted (--calibrate, the default), and the card says so
    assert m.card is not None and TEMPERATURE_SCALED in m.card.limits and NOT_CALIBRATED not in m.card.limits
    # trained on a folder of its own (not SST-2's published files), and named "sentiment": nothing claims SST-2
    assert m.card.data.startswith("The file named in training.data") and "SST" not in m.card.model_dump_json()
    assert m.description.startswith(f"{tiny_sst2.name} binary sentiment") and "BiLSTM ensemble" in m.description
    accuracy = m.metrics[0]
    assert accuracy.dataset == f"{tiny_sst2.name} (dev.tsv)" and accuracy.target is None
    assert accuracy.split.startswith(f"dev ({len(load_sst2(tiny_sst2)[1])} sentences)")
    assert m.training["data_sha256"] == data_sha256(tiny_sst2)
    acc = _evaluate(capsys, out, tiny_sst2)["dev_accuracy"]
    assert acc == pytest.approx(m.metrics[0].value) and acc > 0.9  # the toy task is separable


@pytest.mark.slow
def test_sentiment_holds_out_whole_sentences(tmp_path: Path, tiny_sst2: Path) -> None:
    out = tmp_path / "sentiment" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--hidden", "8", "--embedding", "8", "--epochs", "1", "--batch-size", "32", "--ensemble", "1"]
    args += ["--heldout", "sentences", "--heldout-fraction", "0.2", "--no-calibrate"]
    assert main(args) == 0
    m = _check_outputs(out)
    assert m.training["temperature"] == 1.0  # --no-calibrate: no temperature fitted, and the card says so
    assert m.card is not None and NOT_CALIBRATED in m.card.limits and TEMPERATURE_SCALED not in m.card.limits
    held = {x.name: x for x in m.metrics}["heldout_accuracy"]
    # 10 distinct sentences (no phrases) in the toy train.tsv: 2 held out, once each, whatever their repeats
    assert held.split.startswith("2 whole sentences held out from train.tsv")
    assert held.value in (0.0, 0.5, 1.0)


@pytest.mark.slow
def test_forecast_ett_preset_train_and_evaluate(
    tmp_path: Path, tiny_ett: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fc" / "1"
    args = ["forecast", "--data", str(tiny_ett), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--preset", "ett-h", "--hidden", "16", "--epochs", "1", "--batch-size", "256"]
    args += ["--window", "48", "--horizon", "24"]
    assert main(args) == 0
    m = _check_outputs(out)
    assert m.forecast is not None and m.normalization is not None
    f = m.forecast
    assert (f.window, f.horizon, f.features, f.targets, f.frequency, f.time_column) == (48, 24, 3, [], "1h", "date")
    assert f.split == {"train": [0, 8640], "val": [8640, 11520], "test": [11520, 14400]}  # Informer's protocol
    assert np.asarray(f.quantile_offsets).shape == (3, 24, 3)
    ev = _evaluate(capsys, out, tiny_ett)
    assert ev["test_mse"] == pytest.approx(m.metrics[0].value, rel=1e-4) and ev["test_windows"] == 2880 - 24 + 1
    assert ev["test_coverage_q0.1"] < ev["test_coverage_q0.5"] < ev["test_coverage_q0.9"]
    assert ev["test_mase"] > 0 and ev["season"] == 24
    names = {x.name: x for x in m.metrics}
    assert names["test_coverage_band_p10_p90"].target == 0.8 and names["test_coverage_q0.9"].target == 0.9


@pytest.mark.slow
def test_forecast_with_covariates(tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """price is forecast; load and temp are inputs only: the graph returns (batch, horizon, 1)."""
    out = tmp_path / "fc-cov" / "1"
    args = ["forecast", "--data", str(tiny_csv), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--targets", "price", *TINY_FORECAST]
    args += ["--epochs", "2", "--batch-size", "32", "--lr", "0.01", "--revin", "mean"]
    assert main(args) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None and m.normalization is not None
    assert m.normalization.columns == ["load", "temp", "price"] and m.forecast.targets == ["price"]
    assert m.forecast.target_count == 1 and m.forecast.features == 3
    assert m.outputs[0].shape == ["batch", 12, 1] and m.inputs[0].shape == ["batch", "time", 3]
    assert np.asarray(m.forecast.quantile_offsets).shape == (3, 12, 1)
    assert m.forecast.split == {"train": [0, 336], "val": [336, 384], "test": [384, 480]}
    ev = _evaluate(capsys, out, tiny_csv)
    assert ev["test_windows"] == 96 - 12 + 1 and np.isfinite(ev["test_mse"])
    assert ev["test_mse"] == pytest.approx(m.metrics[0].value, rel=1e-4)
    # the interval studies read the target column only, and refuse a model that is not a forecaster
    assert learned_scale.main(["--model", str(out), "--data", str(tiny_csv)]) == 0
    report = capsys.readouterr().out
    assert f"learned on {336 - 24 - 12 + 1} train windows" in report
    assert f"checked on {48 + 24 - 24 - 12 + 1} validation windows" in report
    assert "learned from train residuals, pooled" in report and "the interval rule picks: " in report
    with pytest.raises(SystemExit, match="not a forecaster"):
        learned_scale.main(["--model", str(Path(__file__).parents[2] / "models/charlm/1"), "--data", str(tiny_csv)])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--columns", "load,cost"], "sales.csv: no column 'cost'; the header has ['time', 'load', 'temp', 'price']"),
        (["--targets", "cost"], "--targets: 'cost' is not one of the input columns ['load', 'temp', 'price']"),
        (["--time-column", "when"], "sales.csv: no time column 'when'"),
        (["--split", "0.9,0.2,0.1"], "--split: fractions must be in (0, 1) and sum to at most 1"),
        (["--window", "480", "--horizon", "24"], "sales.csv: 480 rows are too few for window 480 + horizon 24 = 504"),
        (["--freq", "2h"], "sales.csv: line 3: irregular step of 1h between 2021-01-01 00:00:00 and"),
        (["--preset", "ett-m"], "sales.csv: no time column 'date'; the header has"),
        (
            ["--preset", "ett-m", "--time-column", "time", "--freq", "auto"],
            "--split: 34560+11520+11520 = 57600 rows, but the file has only 480",
        ),
        (  # the preset's 15-minute step is checked (the hourly rows are a gap), before the split is
            ["--preset", "ett-m", "--time-column", "time"],
            "sales.csv: line 3: gap of 1h between 2021-01-01 00:00:00 and 2021-01-01 01:00:00; the rows step by 15min",
        ),
    ],
)
def test_forecast_data_errors_exit_2_with_one_line(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    args = ["forecast", "--data", str(tiny_csv), "--out", str(tmp_path / "o" / "1"), "--window", "24", *FAST]
    assert main([*args, "--horizon", "12", "--segment", "6", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("seqserve-train: error: ") and message in err


def test_forecast_bad_cell_names_row_and_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("date,a,b\n2020-01-01,1,2\n2020-01-02,3,x7\n")
    assert main(["forecast", "--data", str(p), "--out", str(tmp_path / "o" / "1"), *FAST]) == 2
    assert capsys.readouterr().err.strip() == f"seqserve-train: error: {p}: line 3, column 'b': 'x7' is not a number"


def test_missing_data_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.txt"
    assert main(["charlm", "--data", str(missing), "--out", str(tmp_path / "o" / "1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"seqserve-train: error: {missing}: file not found"


def test_malformed_data_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t1\nbad\tpositive\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    assert main(["sentiment", "--data", str(tmp_path), "--out", str(tmp_path / "o" / "1"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.tsv: line 3" in err


def test_evaluate_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--model", str(tmp_path / "m" / "1"), "--data", str(tmp_path)]) == 2
    assert "manifest.json: file not found" in capsys.readouterr().err


def test_bad_hyperparameter_exits_2(tmp_path: Path, tiny_ett: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["forecast", "--data", str(tiny_ett), "--out", str(tmp_path / "f" / "1"), "--window", "50", *FAST]
    args += ["--preset", "ett-h"]
    assert main(args) == 2
    assert "window: 50 must be a multiple of segment 12" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("task", "option", "value", "message"),
    [
        ("forecast", "--window", "0", "argument --window: must be >= 1, got 0"),
        ("forecast", "--horizon", "0", "argument --horizon: must be >= 1, got 0"),
        ("forecast", "--segment", "0", "argument --segment: must be >= 1, got 0"),
        ("forecast", "--batch-size", "0", "argument --batch-size: must be in [1, 65536], got 0"),
        ("forecast", "--threads", "0", "argument --threads: must be in [1, 256], got 0"),
        ("forecast", "--epochs", "0", "argument --epochs: must be >= 1, got 0"),
        ("forecast", "--hidden", "x", "argument --hidden: 'x' is not a whole number"),
        ("forecast", "--embedding", "-1", "argument --embedding: must be in [0, 8192], got -1"),
        ("forecast", "--lr", "0", "argument --lr: must be > 0, got 0"),
        ("forecast", "--lr", "nan", "argument --lr: must be > 0, got nan"),
        ("forecast", "--clip", "-1", "argument --clip: must be > 0, got -1"),
        ("forecast", "--patience", "0", "argument --patience: must be >= 1, got 0"),
        ("forecast", "--eval-every", "-5", "argument --eval-every: must be >= 0, got -5"),
        ("forecast", "--max-minutes", "-1", "argument --max-minutes: must be >= 0, got -1"),
        ("forecast", "--warmup-steps", "-1", "argument --warmup-steps: must be >= 0, got -1"),
        ("forecast", "--dropout", "1.5", "argument --dropout: must be in [0, 1), got 1.5"),
        ("forecast", "--weight-decay", "inf", "argument --weight-decay: must be >= 0, got inf"),
        ("forecast", "--targets", "", "argument --targets: expected comma-separated column names, got ''"),
        ("forecast", "--columns", "a,,b", "argument --columns: expected comma-separated column names, got 'a,,b'"),
        ("charlm", "--embedding", "0", "argument --embedding: must be in [1, 8192], got 0"),
        ("charlm", "--bptt", "0", "argument --bptt: must be >= 1, got 0"),
        ("sentiment", "--heldout-fraction", "1", "argument --heldout-fraction: must be in (0, 1), got 1"),
        ("sentiment", "--word-dropout", "-0.1", "argument --word-dropout: must be in [0, 1), got -0.1"),
        ("sentiment", "--ensemble", "0", "argument --ensemble: must be >= 1, got 0"),
        ("sentiment", "--max-length", "0", "argument --max-length: must be >= 1, got 0"),
    ],
)
def test_a_bad_option_exits_2_with_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str, option: str, value: str, message: str
) -> None:
    """Each of these once trained nothing, crashed with a traceback (ZeroDivisionError, RuntimeError) or ran with
    a silently meaningless setting; the data file need not even exist for the option to be refused."""
    out = tmp_path / "m" / "1"
    assert main([task, "--data", str(tmp_path / "none.csv"), "--out", str(out), option, value]) == 2
    err = capsys.readouterr().err
    assert err == f"seqserve-train {task}: error: {message} (--help lists the options)\n"
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "--method", "int4"], "argument --method: invalid choice: 'int4'"),
        (["sample", "--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
        (["sample", "--length", "0"], "argument --length: must be >= 1, got 0"),
        (["sample", "--top-k", "-1"], "argument --top-k: must be >= 0, got -1"),
    ],
)
def test_other_commands_refuse_bad_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    model = ["--model", str(tmp_path / "m" / "1")]
    rest = ["--data", str(tmp_path), "--out", str(tmp_path / "q" / "1")] if argv[0] == "quantize" else []
    assert main([argv[0], *model, *rest, *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqserve-train {argv[0]}: error: {message}") and err.count("\n") == 1


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["forecast", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--window" in out
    assert "\ntrain a forecaster on any time-series CSV" in out  # (what the parent's list says of it, first)


def test_a_text_too_short_for_one_step_says_what_to_lower(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tiny_text's train part (~2,900 characters) cannot fill the defaults' 128 streams x 128 characters; before,
    that ended in 'text of 0 characters is too short for 128 parallel streams' (or a random crash, as an epoch
    starts at a random offset)."""
    out = tmp_path / "lm" / "1"
    assert main(["charlm", "--data", str(tiny_text), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqserve-train: error: {tiny_text}: the train part has ") and err.count("\n") == 1
    assert "--batch-size 128 streams x --bptt 128 characters needs 16,639: lower --batch-size or --bptt" in err
    assert not out.exists()


def test_too_few_rows_to_hold_any_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two rows at the default 5% held out: none held out, which used to end in torch.cat()'s 'expected a
    non-empty list of Tensors'."""
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    out = tmp_path / "s" / "1"
    assert main(["sentiment", "--data", str(tmp_path), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "train.tsv: 2 rows; holding out 0.05 of the rows leaves 0 held out" in err and err.count("\n") == 1
    assert "both need at least one; give more rows or change --heldout-fraction" in err and not out.exists()


def test_evaluating_on_too_little_data_names_the_file_and_the_need(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: 'text of 1 characters is too short for 32 parallel streams' (no file), and for held-out rows
    numpy's 'need at least one array to concatenate'."""
    models = Path(__file__).resolve().parents[2] / "models"
    text = tmp_path / "two.txt"
    text.write_text("ab")
    assert main(["evaluate", "--model", str(models / "charlm" / "1"), "--data", str(text)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"seqserve-train: error: {text}: the validation part (its last 10%) has 1 characters; evaluation reads it "
        "as 32 streams and needs at least 64\n"
    )
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    assert main(["heldout", "--model", str(models / "sentiment" / "4"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train.tsv: 2 rows; holding out 0.05 of its rows, as these models did, leaves none" in err
    assert err.count("\n") == 1


def test_training_never_writes_into_a_folder_that_holds_a_model(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """forecast/sentiment/charlm --out an existing model folder used to overwrite it (a served version rewritten in
    place); the derived commands already refused. Refused before any work; --resume still continues a run."""
    out = tmp_path / "models" / "sales" / "1"
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"a model already served")
    args = ["forecast", "--data", str(tiny_csv), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    assert main([*args, *TINY_FORECAST, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqserve-train: error: {out}: already exists and is not empty") and err.count("\n") == 1
    assert (out / "model.onnx").read_bytes() == b"a model already served" and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_business_days_train_with_freq_irregular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Daily rows without weekends could not be read at all ("gap of 3 days ..., the rows step by 1D"), and no
    option let them through. --freq irregular keeps the checks for duplicates and order, not the constant step."""
    data = write_csv(tmp_path / "hourly.csv")
    lines = data.read_text().splitlines()
    days = [dt.date(2021, 1, 4) + dt.timedelta(days=i) for i in range(700)]
    weekdays = [d for d in days if d.weekday() < 5][: len(lines) - 1]
    rows = [f"{d},{row.split(',', 1)[1]}" for d, row in zip(weekdays, lines[1:], strict=True)]
    data.write_text("\n".join([lines[0], *rows]) + "\n")
    out = tmp_path / "bd" / "1"
    args = ["forecast", "--data", str(data), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += [*TINY_FORECAST, "--epochs", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "line 7: gap of 3D between 2021-01-08 and 2021-01-11; the rows step by 1D (fill or interpolate" in err
    assert err.endswith("; or, where the rows step unevenly by nature (business days), pass --freq irregular\n")
    assert main([*args, "--freq", "irregular"]) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None and m.forecast.frequency == "irregular" and "at irregular steps" in m.description
    ev = _evaluate(capsys, out, data)  # the data re-read as the manifest records it
    assert np.isfinite(ev["test_mse"]) and "test_mase" not in ev  # no season at irregular steps
    data.write_text(data.read_text().replace(str(weekdays[5]), str(weekdays[3]), 1))  # a duplicate still fails
    assert main([*args, "--freq", "irregular", "--out", str(tmp_path / "bd" / "2")]) == 2
    assert "duplicate timestamp" in capsys.readouterr().err


def test_seasonal_scores_left_out_where_undefined_and_the_model_still_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An hour-of-day column (repeats exactly every day: seasonal-naive scale 0) made MASE infinite, written to the
    manifest as null, which then failed to load anywhere; a target that is exactly 0 at night gave a MAPE of
    millions of percent (the zero check ran on values rebuilt from z-scores, ~1e-8). Both are left out now."""
    rng = np.random.default_rng(0)
    lines = ["time,hour,solar"]
    for i in range(480):
        hour = i % 24
        solar = max(0.0, np.sin(np.pi * (hour - 6) / 12)) * (1 + 0.1 * rng.standard_normal())
        lines.append(f"2021-01-{1 + i // 24:02d} {hour:02d}:00:00,{hour},{max(solar, 0.0):.3f}")
    data = tmp_path / "solar.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "solar" / "1"
    train_tiny_forecaster(data, out, tmp_path / "run")
    names = {metric.name: metric.value for metric in Manifest.load(out / MANIFEST_FILE).metrics}  # loads: all finite
    assert "test_mse" in names and not any(k.startswith(("test_mase", "test_snaive", "test_mape")) for k in names)
    ev = _evaluate(capsys, out, data)
    assert "test_mape" not in ev and "test_mase" not in ev and np.isfinite(ev["test_mse"])
    # the solar column alone: MASE is defined (its scale is not 0), MAPE is not (zeros at night)
    solo = tmp_path / "solo" / "1"
    args = ["forecast", "--data", str(data), "--out", str(solo), "--run-dir", str(tmp_path / "run2"), *FAST]
    args += ["--columns", "solar", *TINY_FORECAST]
    assert main([*args, "--epochs", "1"]) == 0
    ev = _evaluate(capsys, solo, data)
    assert np.isfinite(ev["test_mase"]) and "test_mape" not in ev


def test_a_cell_beyond_float32_is_named_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_csv(tmp_path / "huge.csv")
    lines = p.read_text().splitlines()
    lines[50] = lines[50].rsplit(",", 1)[0] + ",1e300"
    p.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o" / "1"
    assert main(["forecast", "--data", str(p), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"seqserve-train: error: {p}: line 51, column 'price': '1e300' is beyond float32's range (+-3.4e+38), in "
        "which models compute; rescale the column"
    )
    assert not out.exists()


def test_resume_without_a_run_never_rewrites_a_model(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume continues a run's checkpoint; with no checkpoint it trained from scratch and replaced the model."""
    out = tmp_path / "models" / "sales" / "1"
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"a model already served")
    args = ["forecast", "--data", str(tiny_csv), "--out", str(out), "--run-dir", str(tmp_path / "none"), *FAST]
    assert main([*args, "--resume", *TINY_FORECAST]) == 2
    err = capsys.readouterr().err
    assert f"--resume: {tmp_path / 'none' / 'checkpoint.pt'} does not exist" in err and err.count("\n") == 1
    assert (out / "model.onnx").read_bytes() == b"a model already served"


def test_a_failed_run_leaves_no_half_written_model(
    tmp_path: Path, tiny_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training import forecasting

    def broken(job: object) -> None:
        out = job.out  # type: ignore[attr-defined]
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.onnx").write_bytes(b"half")
        raise ValueError("export failed")

    monkeypatch.setattr(forecasting, "train_forecast", broken)
    out = tmp_path / "m" / "1"
    assert main(["forecast", "--data", str(tiny_csv), "--out", str(out), *FAST]) == 2
    assert not (tmp_path / "m").exists()  # nor the models/NAME/ folder made for it
    empty = tmp_path / "made-before" / "1"  # a folder that was there, empty: left empty
    empty.mkdir(parents=True)
    assert main(["forecast", "--data", str(tiny_csv), "--out", str(empty), *FAST]) == 2
    assert empty.is_dir() and not any(empty.iterdir())


def test_sample_and_quantize_refuse_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    charlm = Path(__file__).parents[2] / "models" / "charlm" / "1"
    assert main(["sample", "--model", str(charlm), "--prompt", "Café ROMEO:", "--length", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqserve-train: error: prompt: character 'é' is not in the model's vocabulary")
    assert err.count("\n") == 1
    for bad in ("nan", "inf", "-inf"):  # (a NaN tolerance passed every comparison: the release gate was off)
        args = ["quantize", "--model", str(charlm), "--data", str(tmp_path), "--out", str(tmp_path / "q" / "1")]
        assert main([*args, f"--tolerance={bad}"]) == 2
        assert "argument --tolerance: must be a finite number" in capsys.readouterr().err


def _one_line(capsys: pytest.CaptureFixture[str], code: int, start: str) -> None:
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqserve-train: error: {start}") and err.count("\n") == 1, err


def test_a_broken_model_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing, empty or corrupt model.onnx, or a manifest that serving would refuse, was an ORT or onnx
    traceback, an AssertionError or a 7-line pydantic dump that never named the file."""
    charlm = Path(__file__).parents[2] / "models" / "charlm" / "1"
    manifest = json.loads((charlm / MANIFEST_FILE).read_text())

    def folder(name: str, onnx: bytes | None, **changes: object) -> Path:
        d = tmp_path / name / "1"
        d.mkdir(parents=True)
        (d / MANIFEST_FILE).write_text(json.dumps(manifest | changes))
        if onnx is not None:
            (d / MODEL_FILE).write_bytes(onnx)
        return d

    cases = [
        (folder("noonnx", None), "noonnx/1/model.onnx: file not found"),
        (folder("empty", b""), "empty/1/model.onnx: empty"),
        (folder("garbage", b"not a graph at all"), "garbage/1/model.onnx: its sha256 is "),  # (as the server says)
        # A graph that is not the manifest's (another export's) was evaluated as if it were, or failed in ORT:
        (folder("other", (charlm.parent / "2" / MODEL_FILE).read_bytes()), "other/1/model.onnx: its sha256 is "),
        (folder("notok", b"x", tokenizer=None), "notok/1/manifest.json: not a valid manifest: a 'charlm' model needs"),
        (folder("schema", b"x", version="one"), "schema/1/manifest.json: not a valid manifest: version: Input should"),
    ]
    for model, start in cases:
        _one_line(capsys, main(["evaluate", "--model", str(model), "--data", str(tmp_path)]), str(tmp_path / start))
    out = tmp_path / "q" / "1"
    _one_line(capsys, main(["quantize", "--model", str(cases[0][0]), "--data", "x", "--out", str(out)]), str(tmp_path))
    assert not (tmp_path / "q").exists()


def test_folders_that_cannot_be_made_are_named_before_training(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out under a file failed only after the whole training (about an hour for the char LM), a --run-dir
    that is a file at the first checkpoint, and a missing --glove-dir or --lexicon-dir with a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    args = ["charlm", "--data", str(tiny_text), *FAST, "--hidden", "8", "--embedding", "4", "--bptt", "16"]
    run = ["--run-dir", str(tmp_path / "run")]
    _one_line(capsys, main([*args, *run, "--out", str(blocker / "lm" / "1")]), f"--out {blocker / 'lm' / '1'}")
    _one_line(capsys, main([*args, "--out", str(tmp_path / "lm" / "1"), "--run-dir", str(blocker)]), "--run-dir")
    words = ["sentiment", "--data", str(tmp_path), "--out", str(tmp_path / "s" / "1"), *run]
    for flag in ("glove", "lexicon"):
        missing = tmp_path / "nowhere"
        _one_line(capsys, main([*words, f"--{flag}", f"--{flag}-dir", str(missing)]), f"--{flag}-dir {missing}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "input.txt"]  # nothing created


def test_a_diverging_run_says_so_and_leaves_nothing(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--lr 1e30 trained on NaN to the end, then failed the export's ORT-vs-PyTorch check with a traceback."""
    out = tmp_path / "lm" / "1"
    args = ["charlm", "--data", str(tiny_text), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--hidden", "8", "--embedding", "4", "--batch-size", "4", "--bptt", "16", "--epochs", "2", "--lr", "1e30"]
    _one_line(capsys, main(args), "training diverged: ")
    assert not (tmp_path / "lm").exists()


def test_a_run_whose_weights_blew_up_with_a_finite_loss_says_so(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--lr 1e9 on the sentiment model: its held-out accuracy and a finite validation loss (1e31) ran to the end,
    and the export's ORT-vs-PyTorch check failed with a traceback ("max abs diff 3.02e+23 exceeds 1e-4"); the
    same with the char model at 1e4 on real data (on the tiny text here its loss turns inf first: the test above)."""
    out = tmp_path / "m" / "1"
    args = ["sentiment", "--data", str(tiny_sst2), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--lr", "1e9", "--hidden", "8", "--embedding", "8", "--epochs", "1", "--subword-buckets", "0"]
    args += ["--ensemble", "1"]
    _one_line(capsys, main(args), "training diverged: a weight of the best checkpoint is ")
    assert not (tmp_path / "m").exists()


def test_resume_needs_a_checkpoint(tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --run-dir silently restarted a long run from scratch."""
    out, run = tmp_path / "lm" / "1", tmp_path / "typo"
    args = ["charlm", "--data", str(tiny_text), "--out", str(out), "--run-dir", str(run), *FAST, "--resume"]
    _one_line(capsys, main(args), f"--resume: {run / 'checkpoint.pt'} does not exist")
    assert not out.exists()


def test_a_damaged_checkpoint_is_named_not_a_traceback(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cut checkpoint.pt was torch.load's traceback (OSError); a text file an unnamed "invalid literal for int()"."""
    run = tmp_path / "run"
    run.mkdir()
    for damaged in (b"PK\x03\x04" + b"\x00" * 200, b"garbage\n"):
        (run / "checkpoint.pt").write_bytes(damaged)
        out = tmp_path / "lm" / "1"
        args = ["charlm", "--data", str(tiny_text), "--out", str(out), "--run-dir", str(run), *FAST, "--resume"]
        args += ["--hidden", "8", "--embedding", "4", "--batch-size", "4", "--bptt", "16"]
        _one_line(capsys, main(args), f"--resume: {run / 'checkpoint.pt'} is not a readable checkpoint (")
        assert not out.exists()


def test_a_text_of_one_character_and_unservable_versions_are_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One distinct character trained, then failed at the ONNX export with a traceback; an --out version the server
    never loads (0, 01, ten digits) trained, then failed in the manifest (0) or wrote a folder no server serves."""
    same = tmp_path / "a.txt"
    same.write_text("a" * 5000)
    args = ["charlm", "--data", str(same), "--out", str(tmp_path / "lm" / "1"), "--run-dir", str(tmp_path / "r"), *FAST]
    _one_line(capsys, main(args), f"{same}: holds only the character 'a'; a language model needs at least two")
    for version in ("0", "01", "1234567890"):
        out = tmp_path / "lm" / version
        args = ["charlm", "--data", str(same), "--out", str(out), "--run-dir", str(tmp_path / "r"), *FAST]
        _one_line(capsys, main(args), f"{out}: --out's last folder is the version, 1 to 999999999 without leading")
    assert not (tmp_path / "lm").exists() and not (tmp_path / "r").exists()


def test_an_out_folder_that_is_no_version_folder_is_noted(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--out models/NAME/latest trained and wrote a model no server loads (it ignores folders not named by a
    number), without a word; such a folder is a run's (ensemble, fuse and quantize take it), so it is noted."""
    out = tmp_path / "models" / "lm" / "latest"
    args = ["charlm", "--data", str(tiny_text), "--out", str(out), "--run-dir", str(tmp_path / "r"), *FAST]
    assert main([*args, "--hidden", "8", "--embedding", "4", "--bptt", "16"]) == 0
    assert f"note: {out} is not a version folder (MODEL/VERSION, the version a number): a server reading its " in (
        capsys.readouterr().err
    )
    assert (out / "model.onnx").exists()


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["charlm", "--hidden", "10000000000"], "argument --hidden: must be in [1, 8192]"),
        (["charlm", "--threads", "100000"], "argument --threads: must be in [1, 256]"),
        (["sentiment", "--seed", "18446744073709551616"], "argument --seed: must be in [0, 4294967295]"),
        (["sample", "--seed", "-1"], "argument --seed: must be in [0, 4294967295]"),
    ],
)
def test_sizes_threads_and_seeds_are_bounded(
    argv: list[str], words: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A huge --hidden was an allocation traceback, --threads 100000 a segfault, a huge --seed an overflow that
    did not name the option."""
    where = ["--model", str(tmp_path)] if argv[0] == "sample" else ["--data", str(tmp_path), "--out", str(tmp_path)]
    assert main([*argv, *where]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_the_same_model_twice_is_refused(tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """compare and heldout of one folder twice (compare's JSON even collapsed to one key), and an ensemble of one
    graph twice or of a model beside its own fused graph (the same weights at twice the cost)."""
    models = Path(__file__).parents[2] / "models"
    s3, s4 = str(models / "sentiment" / "3"), str(models / "sentiment" / "4")
    for argv in (["compare", "--model", s3, "--model", s3], ["heldout", "--model", s4, "--model", s4 + "/"]):
        _one_line(capsys, main([*argv, "--data", str(tiny_sst2)]), f"--model {Path(argv[-1])} is given twice")
    out = ["--data", str(tiny_sst2), "--out", str(tmp_path / "e" / "1")]
    _one_line(capsys, main(["ensemble", "--model", s4, "--model", s3, *out]), f"--model {s4} and --model {s3} answer")
    copy = tmp_path / "copy" / "4"
    copy.mkdir(parents=True)
    for name in (MANIFEST_FILE, MODEL_FILE):
        (copy / name).write_bytes((Path(s4) / name).read_bytes())
    _one_line(capsys, main(["ensemble", "--model", s4, "--model", str(copy), *out]), f"--model {s4} and --model {copy}")
    assert not (tmp_path / "e").exists()


def test_ctrl_c_is_one_line_and_keeps_the_checkpoint(tmp_path: Path, tiny_text: Path) -> None:
    """Ctrl-C printed a 40-line KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys

    out, run = tmp_path / "lm" / "1", tmp_path / "run"
    # SIGINT as a terminal delivers it, whoever started the suite: a suite started in the background by a shell
    # without job control (`make test &` in a script, nohup) inherits SIGINT ignored, and Python installs no
    # KeyboardInterrupt for a signal ignored at start-up (a user's background job is meant to ignore Ctrl-C). The
    # child puts Python's own handler back before it runs the CLI as `python -m training.cli` would. (Not with
    # Popen's preexec_fn: Python code between fork and exec in this process, whose gRPC threads other tests
    # started, once printed gRPC's poller error into the child's stderr.)
    child = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('training.cli', run_name='__main__', alter_sys=True)"
    )
    cmd = [sys.executable, "-c", child, "charlm", "--data", str(tiny_text), "--out", str(out)]
    cmd += ["--run-dir", str(run), *FAST, "--hidden", "8", "--embedding", "4", "--batch-size", "4", "--bptt", "16"]
    # No early stop (patience 100,000): the run must still be training when the signal comes, however far it got
    # while this process read its first lines.
    cmd += ["--epochs", "100000", "--eval-every", "5", "--max-minutes", "5", "--patience", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    evaluations = 0
    for line in proc.stdout:  # an evaluation prints its line, then writes the checkpoint
        evaluations += line.startswith("step")
        if evaluations == 2:
            break
    proc.send_signal(signal.SIGINT)
    _, err = stopped_within(proc, 120, "the training run")
    assert proc.returncode == 130
    assert err == (
        f"seqserve-train: interrupted; {run / 'checkpoint.pt'} is kept: the same command with --resume continues "
        "the run\n"
    )
    assert not (tmp_path / "lm").exists() and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_a_bad_interval_scale_is_refused_before_the_data_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed --interval-scale is refused before anything else: not after reading the data (here missing)
    and, with data, after a whole training."""
    out = tmp_path / "o" / "1"
    argv = ["forecast", "--data", str(tmp_path / "none.csv"), "--out", str(out), "--interval-scale", "range:4", *FAST]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqserve-train: error: --interval-scale: expected auto, none or KIND[:K]")
    assert err.count("\n") == 1 and not out.exists()
    for scale in ("mad:0", "std:96"):
        argv[argv.index("--interval-scale") + 1] = scale  # was accepted, then failed after training
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"seqserve-train: error: --interval-scale {scale}: K counts the last K row-to-row")
        assert "it must be at least 1 and below --window 96 (a window of 96 rows has 95 changes)" in err
        assert err.count("\n") == 1 and not out.exists()


def test_download_needs_a_checksum(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--download without --sha256 is refused before anything is fetched: a file from elsewhere is checked."""
    data, out = tmp_path / "input.txt", tmp_path / "lm" / "1"
    argv = ["charlm", "--data", str(data), "--out", str(out), "--download", (tmp_path / "nowhere.txt").as_uri(), *FAST]
    assert main(argv) == 2
    assert capsys.readouterr().err == "seqserve-train: error: --download needs --sha256 to check the file\n"
    assert not data.exists() and not out.exists()


@pytest.mark.slow
def test_forecast_metrics_match_an_independent_recomputation(
    tmp_path: Path, tiny_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every test metric of a covariate forecaster recomputed here from the CSV and the ONNX graph with plain
    numpy (evaluate and the manifest share one code path, so comparing them with each other checks no formula);
    and the manifest records the data and interval options it was given, the issue's goal on test_mse, which
    metrics are higher-is-better, and no test_windows among the metrics."""
    out = tmp_path / "models" / "forecaster" / "1"  # a name with an issue goal: test_mse 0.40
    args = ["forecast", "--data", str(tiny_csv), "--out", str(out), "--run-dir", str(tmp_path / "run"), *FAST]
    args += ["--targets", "price", *TINY_FORECAST]
    assert main([*args, "--epochs", "1", "--calibration", "pooled", "--interval-scale", "none"]) == 0
    m = Manifest.load(out / MANIFEST_FILE)
    assert m.forecast is not None
    t = m.training
    assert t["calibration"] == "pooled" and t["interval_choice"]["pooled"] is True
    assert (t["split"], t["targets"], t["time_column"], t["frequency"]) == ("0.7,0.1,0.2", ["price"], "auto", "auto")
    metrics = {x.name: x for x in m.metrics}
    assert metrics["test_mse"].target == 0.40 and "test_windows" not in metrics
    assert metrics["test_mape_gain_vs_snaive"].higher_is_better and not metrics["test_mape"].higher_is_better

    raw = np.loadtxt(tiny_csv, delimiter=",", skiprows=1, usecols=(1, 2, 3))  # load, temp, price: 480 rows
    mean, std = raw[:336].mean(0), raw[:336].std(0)  # train rows [0, 336)
    z = ((raw - mean) / std).astype(np.float32)
    start, n = 384 - 24, 96 - 12 + 1  # test rows [384, 480), histories from 24 rows before
    x = np.stack([z[start + i : start + i + 24] for i in range(n)])
    y = np.stack([z[start + i + 24 : start + i + 36, 2:] for i in range(n)])
    sess = ort.InferenceSession(str(out / MODEL_FILE), providers=["CPUExecutionProvider"])
    pred = sess.run(["forecast"], {"history": x, **zero_states(m.states, {"batch": n, "features": 3})})[0]
    ev = _evaluate(capsys, out, tiny_csv)
    assert ev["test_windows"] == n
    assert ev["test_mse"] == pytest.approx(((pred - y) ** 2).mean(), rel=1e-5)
    assert ev["test_mae"] == pytest.approx(np.abs(pred - y).mean(), rel=1e-5)
    off = np.asarray(m.forecast.quantile_offsets)  # (3, 12, 1), no scale output
    for tau, o in zip((0.1, 0.5, 0.9), off, strict=True):
        d = y - (pred + o)
        assert ev[f"test_coverage_q{tau:g}"] == pytest.approx((d <= 0).mean())
        assert ev[f"test_pinball_q{tau:g}"] == pytest.approx(np.maximum(tau * d, (tau - 1) * d).mean(), rel=1e-5)
    # original units; the seasonal naive forecast of row r is row r - 24 (season 24 of hourly rows)
    truth = np.stack([raw[start + i + 24 : start + i + 36, 2] for i in range(n)])
    naive = np.stack([raw[start + i : start + i + 12, 2] for i in range(n)])
    model = pred[..., 0] * std[2] + mean[2]
    scale = np.abs(raw[24:336, 2] - raw[:312, 2]).mean()
    assert ev["season"] == 24
    assert ev["test_mase"] == pytest.approx(np.abs(truth - model).mean() / scale, rel=1e-4)
    assert ev["test_snaive_mase"] == pytest.approx(np.abs(truth - naive).mean() / scale, rel=1e-4)
    mape, snaive = 100 * np.abs((truth - model) / truth).mean(), 100 * np.abs((truth - naive) / truth).mean()
    assert ev["test_mape"] == pytest.approx(mape, rel=1e-4) and ev["test_snaive_mape"] == pytest.approx(
        snaive, rel=1e-4
    )
    assert ev["test_mape_gain_vs_snaive"] == pytest.approx(1 - mape / snaive, rel=1e-4, abs=1e-6)


def test_the_default_run_dir_is_runs_name_version(
    tmp_path: Path, tiny_text: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --run-dir the checkpoint goes to runs/NAME-VERSION."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "models" / "lm" / "1"
    assert main(["charlm", "--data", str(tiny_text), "--out", str(out), "--resume", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seqserve-train: error: --resume: {Path('runs') / 'lm-1' / 'checkpoint.pt'} does not exist")


def test_sentiment_evaluate_matches_an_independent_recomputation(tmp_path: Path) -> None:
    """dev_accuracy and dev_ece recomputed from the ONNX logits with plain numpy (training and evaluate share
    eval_sentiment, so comparing them with each other checks no formula): ECE of the predicted class's
    probability, its bins weighted by their size."""
    from service.core.tokenizers import Encoder
    from tests.tiny_models import export_tiny
    from training.data import long_texts
    from training.evaluate import evaluate_model

    model = export_tiny("sentiment", tmp_path / "models", cell="gru")
    rng = np.random.default_rng(0)
    words = [
        "a",
        "great",
        "movie",
        "boring",
        "film",
        "bad",
        "fun",
        "the",
        "very",
        "not",
        "love",
        "hate",
        "n't",
        "'s",
        ",",
    ]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 16)))) for _ in range(200)]
    labels = rng.integers(0, 2, size=200)
    data = tmp_path / "sst2"
    data.mkdir()
    (data / "dev.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels, strict=True))
    )
    ev = evaluate_model(model, data)

    m = Manifest.load(model / MANIFEST_FILE)
    assert m.tokenizer is not None
    sess = ort.InferenceSession(str(model / MODEL_FILE), providers=["CPUExecutionProvider"])
    enc = Encoder(m.tokenizer)

    def logits_of(texts: list[str]) -> list[np.ndarray]:
        out = []
        for t in texts:  # one text at a time: no padding involved
            ids = enc.encode(t)[None, :]
            feeds = {"input_ids": ids, "lengths": np.array([ids.shape[1]]), **zero_states(m.states, {"batch": 1})}
            out.append(sess.run(["logits"], feeds)[0][0])
        return out

    logits = logits_of(texts)
    written = [t.replace(" n't", "n't").replace(" 's", "'s").replace(" ,", ",") for t in texts]
    assert sum(w != t for w, t in zip(written, texts, strict=True)) > 50
    pred_written = np.asarray(logits_of(written)).argmax(1)
    assert ev["dev_accuracy_written"] == pytest.approx((pred_written == labels).mean(), abs=1e-12)
    negations = np.array(["n't" in t for t in texts])
    assert ev["dev_negations"] == negations.sum() > 0
    assert ev["dev_accuracy_written_negations"] == pytest.approx((pred_written == labels)[negations].mean(), abs=1e-12)
    long = long_texts(list(zip(texts, labels.tolist(), strict=True)))  # read whole, as served, past max_length
    assert m.tokenizer.max_length is not None and max(len(enc.encode(t)) for t, _ in long) > m.tokenizer.max_length
    pred_long = np.asarray(logits_of([t for t, _ in long])).argmax(1)
    assert ev["dev_accuracy_long"] == pytest.approx((pred_long == [y for _, y in long]).mean(), abs=1e-12)
    assert ev["dev_long_words"] == pytest.approx(np.mean([len(t.split()) for t, _ in long]))
    z = np.asarray(logits, dtype=np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    conf, pred = probs.max(1), probs.argmax(1)
    assert ev["dev_examples"] == 200
    assert ev["dev_accuracy"] == pytest.approx((pred == labels).mean(), abs=1e-12)
    bins = np.minimum((conf * 15 - 1e-12).astype(int), 14)  # 15 equal-width bins, (lo, hi]
    want = sum((bins == b).mean() * abs((pred == labels)[bins == b].mean() - conf[bins == b].mean())
               for b in range(15) if (bins == b).any())  # fmt: skip
    assert ev["dev_ece"] == pytest.approx(want, abs=1e-6)


def test_help_opens_with_what_the_command_does(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse reflows the description: it was the docstring's first line, half a list of subcommands."""
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "``seqserve-train``: train the served models, derive new versions from them and evaluate them" in out
