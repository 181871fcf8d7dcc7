"""yamllint (strict: warnings fail) on every YAML file we ship for deployment."""

from __future__ import annotations

from pathlib import Path

from tests.deploy.conftest import ROOT, run, tool

CONFIG = ROOT / "deploy" / "yamllint.yaml"


def test_yamllint_strict_on_deploy_files() -> None:
    files = sorted({*ROOT.joinpath("deploy").rglob("*.yml"), *ROOT.joinpath("deploy").rglob("*.yaml")})
    assert len(files) >= 15 and CONFIG in files  # the k8s manifests, Prometheus and Grafana files, this config
    paths = ["docker-compose.yml", *(str(f.relative_to(ROOT)) for f in files)]  # the config's ignores are relative
    proc = run([tool("yamllint"), "--strict", "--format", "parsable", "-c", CONFIG, *paths], cwd=ROOT)
    assert proc.stdout == ""


def test_yamllint_catches_what_it_should(tmp_path: Path) -> None:
    """The config is live: a duplicated key and trailing spaces are reported, not silently accepted."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2 \n")
    proc = run([tool("yamllint"), "--strict", "--format", "parsable", "-c", CONFIG, bad], check=False)
    assert proc.returncode != 0
    assert "key-duplicates" in proc.stdout and "trailing-spaces" in proc.stdout
