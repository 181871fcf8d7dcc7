"""``bench.sessions`` (the create-rate rows and the idle session memory of ``make bench``) keeps working: a quick
run against a real server on the tiny models writes every field. (No rate or ratio is asserted: speed and memory
targets live in the benchmark, not in tests.)"""

from __future__ import annotations

import json
from pathlib import Path

from bench.sessions import main
from service.core.manifest import MANIFEST_FILE, Manifest


def test_quick_session_bench_writes_every_field(tiny_models: Path, tmp_path: Path) -> None:
    out = tmp_path / "sessions.json"
    assert main(["--models", str(tiny_models), "--quick", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["live_sessions"] for row in r["create"]] == [1000]
    assert [row["live_sessions"] for row in r["core"]] == [1000]
    assert r["core"][0]["creates_per_s"] > 0 and r["core"][0]["full_gc_ms"] > 0
    row = r["create"][0]
    assert row["creates_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] and row["rss_mib"] > 0
    assert r["idle_live_sessions"] == 1500 and r["idle_cpu_percent"] >= 0
    m = r["memory_per_session"]
    manifest = Manifest.load(tiny_models / "charlm" / "1" / MANIFEST_FILE)
    assert manifest.tokenizer is not None
    # float32 [layers * directions, batch, hidden] per state, for one row
    state = sum(4 * int(spec.shape[0]) * int(spec.shape[2]) for spec in manifest.states)
    assert m["sessions"] == 2000 and m["fresh_raw_bytes"] == state
    assert m["stepped_raw_bytes"] == state + 4 * len(manifest.tokenizer.vocab)  # + the next-character logits
    assert m["fresh_ratio"] == m["fresh_bytes_per_session"] / state
