"""The model repository: ``<settings.models>/<name>/<version>/{model.onnx,manifest.json}`` (Triton-style).

Every version directory becomes a ``ModelVersion``: loaded (manifest valid, sha256 matches, ORT session built)
or failed (the reason is kept and reported; a failed model never stops the others from loading). The newest
*ready* version serves requests that name no version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.manifest import MANIFEST_FILE, MODEL_FILE, Manifest, sha256_file
from service.core.runtime import Runtime, load_runtime, select_providers
from service.core.types import ModelInfo, ModelRef
from service.errors import ModelNotFound, ModelUnavailable
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ModelVersion:
    """One ``<name>/<version>`` directory. ``runtime`` is None when it failed to load (see ``error``)."""

    name: str
    version: int
    path: Path
    manifest: Manifest | None = None
    runtime: Runtime | None = None
    error: str | None = None
    load_seconds: float = 0.0

    @property
    def ready(self) -> bool:
        return self.runtime is not None

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            task=self.manifest.task if self.manifest is not None else "unknown",
            ready=self.ready,
            provider=self.runtime.provider if self.runtime is not None else "",
            error=self.error,
            load_seconds=self.load_seconds,
        )

    def loaded(self) -> tuple[Manifest, Runtime]:
        """Manifest and runtime of a ready model; ``ModelUnavailable`` with the load error otherwise."""
        if self.runtime is None or self.manifest is None:
            raise ModelUnavailable(f"model {self.name} version {self.version} failed to load: {self.error}")
        return self.manifest, self.runtime


# The tensors serving relies on, per task (the rest of the contract is checked by ``Manifest`` itself).
REQUIRED = {
    "charlm": (["input_ids"], ["logits"]),
    "sentiment": (["input_ids"], ["logits"]),
    "forecast": (["history"], ["forecast"]),
}


def check_contract(m: Manifest) -> None:
    """Raises ValueError when the manifest cannot be served: missing tensors, inconsistent sizes."""
    ins, outs = {t.name for t in m.inputs}, {t.name for t in m.outputs}
    need_in, need_out = REQUIRED[m.task]
    missing = [n for n in need_in if n not in ins] + [n for n in need_out if n not in outs]
    if missing:
        raise ValueError(f"a {m.task!r} model must declare tensors {missing} in manifest.json (see the ONNX contract)")
    last = m.output("logits").shape[-1] if "logits" in outs else None
    if m.task == "charlm" and m.tokenizer and isinstance(last, int) and last != len(m.tokenizer.vocab):
        raise ValueError(f"logits have {last} classes but the tokenizer vocab has {len(m.tokenizer.vocab)} entries")
    if m.task == "sentiment" and m.labels and isinstance(last, int) and last != len(m.labels):
        raise ValueError(f"logits have {last} classes but manifest.labels has {len(m.labels)}")
    if m.task == "forecast" and m.forecast is not None and m.normalization is not None:
        f = m.forecast
        if len(m.normalization.columns) != f.features:
            raise ValueError(
                f"normalization has {len(m.normalization.columns)} columns, forecast.features={f.features}"
            )
        shape = list(np.asarray(f.quantile_offsets, dtype=np.float64).shape)
        if f.quantile_offsets and shape != [len(f.quantiles), f.horizon, f.features]:
            raise ValueError(
                f"forecast.quantile_offsets has shape {shape}; expected [quantiles={len(f.quantiles)}, "
                f"horizon={f.horizon}, features={f.features}]"
            )


def load_version(name: str, version: int, path: Path, settings: Settings) -> ModelVersion:
    """Validates and loads one version directory; never raises for a broken model (records ``error``)."""
    mv = ModelVersion(name=name, version=version, path=path)
    t0 = time.perf_counter()
    try:
        manifest_path, model_path = path / MANIFEST_FILE, path / MODEL_FILE
        if not manifest_path.is_file() or not model_path.is_file():
            raise ValueError(f"{path} must contain {MODEL_FILE} and {MANIFEST_FILE}")
        try:
            manifest = Manifest.load(manifest_path)
        except ValueError as exc:  # pydantic.ValidationError and JSON errors are ValueErrors
            raise ValueError(f"{manifest_path} is not a valid manifest: {exc}") from exc
        mv.manifest = manifest
        if (manifest.name, manifest.version) != (name, version):
            raise ValueError(
                f"{manifest_path} says {manifest.name}/{manifest.version} but lives in {name}/{version}; "
                "the directory names are authoritative, fix one of them"
            )
        check_contract(manifest)
        digest = sha256_file(model_path)
        if digest != manifest.sha256:
            raise ValueError(
                f"sha256 of {model_path} is {digest} but manifest.json says {manifest.sha256}; "
                "the file is corrupt or from another export: re-export or copy both files together"
            )
        mv.runtime = load_runtime(manifest, model_path, settings)
    except (ValueError, OSError, ModelUnavailable) as exc:
        mv.error = str(exc)
    mv.load_seconds = time.perf_counter() - t0
    return mv


class ModelRegistry:
    """All model versions found in the repository, loaded or failed. Sync: call ``scan`` from a thread."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._versions: dict[tuple[str, int], ModelVersion] = {}

    def _discover(self) -> dict[tuple[str, int], Path]:
        root = self.settings.models
        if not root.is_dir():
            log.warning("model repository %s does not exist; no models will be served", root)
            return {}
        found: dict[tuple[str, int], Path] = {}
        for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for vdir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
                if not vdir.name.isdigit() or int(vdir.name) < 1:
                    log.warning("ignoring %s: version directories must be positive integers", vdir)
                    continue
                found[(model_dir.name, int(vdir.name))] = vdir
        return found

    def scan(self) -> tuple[list[ModelVersion], list[ModelVersion]]:
        """Loads versions that appeared (or failed before), drops versions whose directory is gone.

        Returns ``(added, removed)``. Raises ``ModelUnavailable`` only when ``device='cuda'`` cannot be had,
        since then no model could load as configured.
        """
        select_providers(self.settings.device)  # fail fast on an impossible device setting
        found = self._discover()
        # Build the new table aside and swap it in at the end: readers on the event loop never see it half done.
        table = dict(self._versions)
        removed = [mv for key, mv in table.items() if key not in found]
        for mv in removed:
            del table[(mv.name, mv.version)]
            log.info("model %s version %d removed from the repository; unloaded", mv.name, mv.version)
        added: list[ModelVersion] = []
        for (name, version), path in found.items():
            old = table.get((name, version))
            if old is not None and old.ready:
                continue
            mv = load_version(name, version, path, self.settings)
            table[(name, version)] = mv
            added.append(mv)
            if mv.ready:
                log.info(
                    "loaded model %s version %d on %s in %.2fs", name, version, mv.info().provider, mv.load_seconds
                )
            else:
                log.error("model %s version %d failed to load: %s", name, version, mv.error)
            self.metrics.model_loaded(name, version, mv.info().provider, mv.load_seconds, mv.ready)
        self._versions = table
        return added, removed

    def versions(self) -> list[ModelVersion]:
        return [self._versions[k] for k in sorted(self._versions)]

    def get(self, name: str, version: int) -> ModelVersion | None:
        return self._versions.get((name, version))

    def find(self, ref: ModelRef) -> ModelVersion:
        """The version ``ref`` names (ready or not); without a version, the newest ready one, else the newest."""
        mine = sorted((mv for mv in self._versions.values() if mv.name == ref.name), key=lambda m: m.version)
        if not mine:
            names = sorted({mv.name for mv in self._versions.values()})
            raise ModelNotFound(f"model {ref.name!r} is not in the repository; available models: {names}")
        if ref.version is None:
            ready = [mv for mv in mine if mv.ready]
            return (ready or mine)[-1]
        for mv in mine:
            if mv.version == ref.version:
                return mv
        raise ModelNotFound(
            f"model {ref.name!r} has no version {ref.version}; available versions: {[m.version for m in mine]}"
        )

    def resolve(self, ref: ModelRef) -> ModelVersion:
        """Like ``find`` but the version must be ready (``ModelUnavailable`` with the load error otherwise)."""
        mv = self.find(ref)
        mv.loaded()
        return mv
