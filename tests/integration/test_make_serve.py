"""The README's first command: ``make serve`` starts the server on the committed, trained models, and SIGTERM stops it
cleanly. Run through make itself (the venv `make test` built is reused), on free loopback ports."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from bench.launch import server_env
from service.client import Client
from tests.integration.conftest import ROOT, free_port, http_get, log_tail, wait_for

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_make_serve_answers_with_the_committed_models_and_stops_on_sigterm(tmp_path: Path) -> None:
    port, metrics_port, rest_port, log = free_port(), free_port(), free_port(), tmp_path / "serve.log"
    # Settings as the README gives them: SEQSERVE_* variables (PORT and HOST in the environment mean nothing to it).
    settings = {"SEQSERVE_PORT": str(port), "SEQSERVE_METRICS_PORT": str(metrics_port), "SEQSERVE_LOG_LEVEL": "WARNING"}
    settings["SEQSERVE_HTTP_PORT"] = str(rest_port)  # (make serve's own default: 8000)
    env = server_env(settings | {"PYTHONUNBUFFERED": "1", "PORT": "1", "HOST": "nowhere.invalid"})
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "serve"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:

        def ready() -> bool:
            if make.poll() is not None:
                raise AssertionError(f"make serve exited with {make.returncode}:\n{log_tail(log)}")
            return http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200

        wait_for("make serve's /readyz = 200", ready)
        with Client(f"127.0.0.1:{port}") as client:
            good, bad = client.classify(["a warm , funny and deeply moving film .", "a dull , lifeless mess ."])
            assert (good.label, bad.label) == ("positive", "negative")  # trained weights, not a placeholder
            assert abs(sum(good.probabilities) - 1.0) < 1e-5
            text = "".join(chunk.text for chunk in client.complete("ROMEO:", max_chars=20, temperature=0))
            assert 0 < len(text) <= 20
        assert http_get(f"http://127.0.0.1:{rest_port}/v2/health/ready")[0] == 200  # KServe REST, as in the image
        server = children(make.pid)
        assert len(server) == 1, f"make serve should run one seqserve process, found {server}"
        os.kill(server[0], signal.SIGTERM)  # what docker stop / Kubernetes send
        assert make.wait(timeout=60) == 0, log_tail(log)  # make exits with the server's status: drained, 0
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=10)
