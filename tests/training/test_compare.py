"""``seqserve-train compare``: two sentiment models paired on the same sentences, with McNemar's exact p."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.core.manifest import MANIFEST_FILE
from training.cli import main
from training.compare import mcnemar_exact

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_exact(0, 0) == 1.0  # no disagreement: nothing tells the models apart
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # all six disagreements one way
    assert mcnemar_exact(6, 0) == mcnemar_exact(0, 6)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(31, 26) == pytest.approx(0.5966, abs=1e-4)
    assert mcnemar_exact(83, 47) < 0.01
    assert mcnemar_exact(2000, 2000) == 1.0 and mcnemar_exact(2600, 2400) == pytest.approx(0.0050, abs=5e-4)


def _compare(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    capsys.readouterr()
    assert main(["compare", *args]) == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


@pytest.mark.parametrize("split", ["dev", "heldout"])
def test_compare_pairs_the_answers(tiny_sst2: Path, capsys: pytest.CaptureFixture[str], split: str) -> None:
    one, three = str(MODELS / "sentiment" / "1"), str(MODELS / "sentiment" / "3")
    r = _compare(capsys, "--model", one, "--model", three, "--data", str(tiny_sst2), "--split", split)
    correct, only = r["correct"], r["only_this_one_correct"]
    assert isinstance(correct, dict) and isinstance(only, dict)
    assert r["examples"] == (40 if split == "dev" else 15)  # tiny dev.tsv; 5% of its 300 train rows
    assert correct[one] - correct[three] == only[one] - only[three]  # agreements count for both
    assert r["mcnemar_exact_p"] == mcnemar_exact(only[one], only[three])
    # the fused graph answers as its parent: no disagreement at all
    same = _compare(capsys, "--model", one, "--model", str(MODELS / "sentiment" / "2"), "--data", str(tiny_sst2))
    assert same["only_this_one_correct"] == {one: 0, str(MODELS / "sentiment" / "2"): 0}
    assert same["mcnemar_exact_p"] == 1.0


def test_compare_refuses_what_it_cannot_pair(
    tmp_path: Path, tiny_sst2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = MODELS / "sentiment" / "1"
    other = tmp_path / "sentiment" / "9"  # the same graph, but its manifest says it held out 20% of train
    shutil.copytree(one, other)
    raw = json.loads((other / MANIFEST_FILE).read_text())
    raw["training"]["heldout_fraction"] = 0.2
    (other / MANIFEST_FILE).write_text(json.dumps(raw))
    data = ["--data", str(tiny_sst2)]
    cases = [
        (["--model", str(one)], "compare takes exactly two --model, got 1"),
        (["--model", str(one), "--model", str(MODELS / "charlm" / "1")], "is a 'charlm' model"),
        (["--model", str(one), "--model", str(other), "--split", "heldout"], "held out different rows"),
    ]
    for args, says in cases:
        capsys.readouterr()
        assert main(["compare", *args, *data]) == 2
        assert says in capsys.readouterr().err
    assert main(["compare", "--model", str(one), "--model", str(other), *data]) == 0  # on dev they pair fine
