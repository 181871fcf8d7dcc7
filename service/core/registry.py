"""The model repository: ``<settings.models>/<name>/<version>/{model.onnx,manifest.json}`` (Triton-style).

One ``ModelEntry`` per version: loaded (manifest valid, task accepts it, sha256 matches, ORT session built,
batcher running) or failed (the reason is kept and reported; a failed model never stops the others). The
newest *ready* version serves requests that name no version.

Live management: ``load_model(name)`` (re)loads every version of a model from disk, ``unload_model(name)``
drains and frees it, ``sync()`` polls the whole repository (``--watch-models``): a new version folder is
loaded and becomes the default, a removed folder is unloaded, a changed ``model.onnx`` (sha256) or manifest is
reloaded (a manifest alone keeps the weights, and so the sessions pinned to them).
Unloading stops new requests at once, lets in-flight ones finish (``grace_seconds`` at most), then frees the
model. Batching lives in the entry; metrics and health subscribe to the load/unload hooks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from service.core.batching import Batcher
from service.core.manifest import MANIFEST_FILE, MODEL_FILE, VERSION_FOLDER, VERSION_RULE, Manifest, sha256_file
from service.core.prefixes import PrefixCache
from service.core.runtime import Runtime, load_runtime, select_providers
from service.core.serving import SERVING_FILE, checked, model_settings
from service.core.stats import StatsBook
from service.core.tasks import Task, task_class
from service.core.tasks.base import capabilities_of
from service.core.traces import Tracer
from service.core.types import ModelInfo, ModelRef
from service.errors import RETRY_LATER, FailedPrecondition, InvalidInput, ModelNotFound, ModelUnavailable, echo
from service.metrics import Metrics
from service.settings import Settings, chosen_versions, named_versions

log = logging.getLogger(__name__)
Hook = Callable[["ModelEntry", bool], Awaitable[None] | None]  # (entry, replaced by a reload)
State = Literal["READY", "UNAVAILABLE", "UNLOADING"]
_SCOPES = itertools.count(1)  # one per started model version: the first part of its prefix cache keys


def _signature(path: Path) -> tuple[tuple[int, int], ...]:
    """(mtime_ns, size) of the two files and of the model's ``serving.json``: a cheap test for "changed on disk"
    before hashing anything."""
    out = []
    for file in (path / MODEL_FILE, path / MANIFEST_FILE, path.parent / SERVING_FILE):
        try:
            st = file.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, -1))
    return tuple(out)


def _what_changed(old: ModelEntry | None, new: ModelEntry) -> str:
    """What a reload found changed, for its log line ("; manifest.json changed, same weights"); "" for new weights
    (the sha256 the line gives says so)."""
    if old is None or old.sha256 != new.sha256:
        return ""
    changed = [MANIFEST_FILE] if old.loaded_manifest != new.loaded_manifest else []
    changed += ["its settings"] if old.serving != new.serving else []
    return f"; {' and '.join(changed)} changed, same weights" if changed else ""


def _broken_link(file: Path, root: Path) -> str | None:
    """Where ``file``, a symbolic link whose target is missing (or no file), points, and what is wrong there
    ("forecaster/3/model.onnx, which does not exist"); None when ``file`` is no such link. A target outside the
    repository is not named (load errors reach callers)."""
    if not file.is_symlink() or file.is_file():
        return None
    target = Path(os.path.normpath(file.parent / os.readlink(file)))
    inside = any(target.is_relative_to(r) for r in (root, root.absolute(), root.resolve()))
    where = str(target) if inside else "a file outside the model repository"
    return f"{where}, which {'is not a file' if target.exists() else 'does not exist'}"


def not_a_folder(root: Path) -> str | None:
    """Why ``root`` cannot be a model repository ("does not exist", "is not a directory"), or None."""
    if root.is_dir():
        return None
    return "is not a directory" if root.exists() else "does not exist"


def _within_repository(message: str, root: Path) -> str:
    """``message`` with the repository's own path cut from the paths it names ("charlm/2/manifest.json says ..."):
    load errors reach callers (UNAVAILABLE, the repository index), who need the model's folder, not the server's
    file system layout."""
    for prefix in sorted({str(root.resolve()), str(root.absolute()), str(root)}, key=len, reverse=True):
        # only where a path starts (not "tinymodels/" for root "models"), longest first
        message = re.sub(r"(?<![\w.~/-])" + re.escape(prefix + os.sep), "", message)
    return message


def warm_up(cls: type[Task], manifest: Manifest, runtime: Runtime, max_rows: int) -> tuple[int, ...]:
    """Runs the graph on the task's warm-up input of one row and of ``max_rows`` (``settings.warmup``); returns the
    batch sizes it ran (none when the task gives no input); raises ValueError, saying what failed, when a run fails
    or answers NaN."""
    ran: list[int] = []
    for rows in sorted({1, max_rows}):
        feeds = cls.warmup_input(manifest, rows)
        if feeds is None:
            break
        try:
            outputs = runtime.run(feeds, rows)
        except Exception as exc:  # ORT's own exception types: the graph loads but cannot run
            fix = "re-export it" if rows == 1 else "it runs one row: lower SEQSERVE_MAX_BATCH_SIZE, or re-export it"
            raise ValueError(
                f"model.onnx loads but failed its warm-up run on a sample of {rows} row(s) ({exc}); {fix}"
            ) from exc
        nan = [name for name, out in outputs.items() if out.dtype.kind == "f" and np.isnan(out).any()]
        if nan:
            raise ValueError(
                f"model.onnx answered NaN in {nan} on its warm-up sample of {rows} row(s); its weights are broken: "
                "retrain or re-export it"
            )
        ran.append(rows)
    return tuple(ran)


@dataclass(eq=False)
class ModelEntry:
    """One ``<name>/<version>`` directory, loaded or failed. The task, runtime and batcher exist when ready."""

    name: str
    version: int
    path: Path
    loaded_manifest: Manifest | None = None  # None when the manifest itself failed to load
    sha256: str = ""
    signature: tuple[tuple[int, int], ...] = ()
    error: str | None = None
    failed_again: str | None = None  # ready, but its files changed since into ones that failed to load (why)
    load_seconds: float = 0.0
    state: State = "UNAVAILABLE"
    stats: StatsBook = field(default_factory=StatsBook)
    capabilities: frozenset[str] = frozenset()
    _runtime: Runtime | None = None
    _batcher: Batcher | None = None
    _task: Task | None = None
    _metrics: Metrics | None = None
    _prefixes: PrefixCache | None = None
    prefix_scope: int = 0  # this load's own part of the prefix cache's keys (a reload never reads the last one's)
    facts: dict[str, object] = field(default_factory=dict)  # the task's ``inspect`` of the loaded graph
    warmed: tuple[int, ...] = ()  # the batch sizes its warm-up ran at load (none: off, or no input from the task)
    tracer: Tracer | None = None  # the trace extension's settings and traces (its requests may be traced)
    settings: Settings | None = None  # what it is served with: the server's, with its model's serving.json
    serving: dict[str, object] = field(default_factory=dict)  # what its serving.json set, and a load's config
    _inflight: int = 0
    _drained: asyncio.Event | None = None

    @property
    def label(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def served_with(self) -> Settings:
        assert self.settings is not None, f"{self.label} read no settings"
        return self.settings

    @property
    def ready(self) -> bool:
        return self.state == "READY"

    def _gone(self) -> ModelUnavailable:
        return ModelUnavailable(f"model {self.label} was unloaded while this call used it; retry the call")

    @property
    def manifest(self) -> Manifest:
        assert self.loaded_manifest is not None, f"{self.label} has no valid manifest"
        return self.loaded_manifest

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:  # a call still running when its version was unloaded (past the grace period)
            raise self._gone()
        return self._runtime

    @property
    def batcher(self) -> Batcher:
        if self._batcher is None:  # a call still running when its version was unloaded (past the grace period)
            raise self._gone()
        return self._batcher

    @property
    def task(self) -> Task:
        if self._task is None:  # a call still running when its version was unloaded (past the grace period)
            raise self._gone()
        return self._task

    @property
    def metrics(self) -> Metrics:
        assert self._metrics is not None, f"{self.label} is not loaded"
        return self._metrics

    @property
    def prefixes(self) -> PrefixCache | None:
        """The server's prefix cache (None or disabled: calls without a session feed their whole text)."""
        return self._prefixes

    def info(self) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            task=self.loaded_manifest.task if self.loaded_manifest is not None else "unknown",
            ready=self.ready,
            provider=self._runtime.provider if self._runtime is not None else "",
            error=self.error,
            load_seconds=self.load_seconds,
        )

    def check_ready(self) -> None:
        if self.state == "UNLOADING":
            raise ModelUnavailable(f"model {self.label} is being unloaded; retry to reach another version")
        if not self.ready:
            raise ModelUnavailable(f"model {self.label} failed to load: {self.error}")

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Counts a request in flight; unloading waits for the count to reach zero."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def enter(self) -> None:
        """A request starts (``busy`` as two calls, for callers that are not one block)."""
        self._inflight += 1

    def leave(self) -> None:
        self._inflight -= 1
        if self._inflight == 0 and self._drained is not None:
            self._drained.set()

    # --- load / unload (registry only) ------------------------------------------------------------------
    def load_files(self, settings: Settings, loaded: dict[str, object] | None = None) -> None:
        """Validates and builds the ORT session (blocking: call in a thread); records ``error`` on failure.
        ``loaded``: the per-model settings a RepositoryModelLoad's config set, over its serving.json."""
        t0 = time.perf_counter()
        self.signature = _signature(self.path)
        try:
            settings, self.serving = model_settings(settings, self.path.parent, loaded)
            self.settings = settings
            manifest_path, model_path = self.path / MANIFEST_FILE, self.path / MODEL_FILE
            for file in (model_path, manifest_path):
                if (link := _broken_link(file, settings.models)) is not None:
                    raise ValueError(
                        f"{file} is a link to {link}: a version whose files are links depends on the folder they "
                        f"link into; restore that file, or copy it into {self.label} in place of the link"
                    )
            if not manifest_path.is_file() or not model_path.is_file():
                raise ValueError(f"{self.path} must contain {MODEL_FILE} and {MANIFEST_FILE}")
            try:
                manifest = Manifest.read(manifest_path)
            except ValueError as exc:  # (read says what is wrong in one line; a UnicodeDecodeError is one too)
                raise ValueError(f"{manifest_path} is not a valid manifest: {exc}") from None
            self.loaded_manifest = manifest
            if (manifest.name, manifest.version) != (self.name, self.version):
                raise ValueError(
                    f"{manifest_path} says {manifest.name}/{manifest.version} but lives in {self.label}; "
                    "the directory names are authoritative, fix one of them"
                )
            cls = task_class(manifest.task)
            missing = [m for m in ("contract", "infer") if getattr(cls, m) is getattr(Task, m)]
            if missing:  # (a plugin's task: every call failed, as "not implemented by this server")
                raise ValueError(
                    f"task {manifest.task!r} ({cls.__module__}.{cls.__qualname__}) does not define "
                    f"{' or '.join(f'{m}()' for m in missing)}: a task class must (docs/architecture.md)"
                )
            cls.check(manifest)
            self.sha256 = sha256_file(model_path)
            if self.sha256 != manifest.sha256:
                raise ValueError(
                    f"sha256 of {model_path} is {self.sha256} but manifest.json says {manifest.sha256}; "
                    "the file is corrupt or from another export: re-export or copy both files together"
                )
            self._runtime = load_runtime(manifest, model_path, settings, cls.symbols(manifest))
            self.facts = cls.inspect(manifest, self._runtime)
            if settings.warmup:
                self.warmed = warm_up(cls, manifest, self._runtime, settings.max_batch_size)
        except (ValueError, OSError, ModelUnavailable) as exc:
            self.error = _within_repository(str(exc), settings.models)
        except Exception as exc:  # a schema-valid but odd manifest can trip a task's or plugin's check anywhere
            log.exception("model %s: unexpected error while loading", self.label)
            plugin = self._plugin_task()
            advice = (
                f"a fault in the code of task {self.loaded_manifest.task!r} ({plugin}), not in the export"
                if plugin and self.loaded_manifest is not None
                else "re-export it with this version of seqserve-train"
            )
            self.error = _within_repository(
                f"its manifest or graph could not be checked ({type(exc).__name__}: {exc}); {advice}",
                settings.models,
            )
        self.load_seconds = time.perf_counter() - t0

    def _plugin_task(self) -> str | None:
        """The module of this version's task when a plugin registered it (not seqserve's own), else None."""
        if self.loaded_manifest is None:
            return None
        try:
            module = task_class(self.loaded_manifest.task).__module__
        except Exception:  # (an unknown task: said by its own error)
            return None
        return None if module.startswith("service.") else module

    def start(self, settings: Settings, metrics: Metrics, prefixes: PrefixCache | None = None) -> None:
        """On the event loop, after ``load_files`` succeeded: the batcher and the task instance."""
        self._metrics = metrics
        self._prefixes, self.prefix_scope = prefixes, next(_SCOPES)
        self._batcher = Batcher(self.name, self.version, self.runtime, settings, metrics, self.stats)
        self._batcher.start()
        self._task = task_class(self.manifest.task)(self, settings)
        self.capabilities = capabilities_of(self._task)
        self.state = "READY"

    async def stop(self, grace: float) -> None:
        """Refuses new requests, waits up to ``grace`` seconds for in-flight ones, then frees the model."""
        self.state = "UNLOADING"
        if self._inflight:
            self._drained = asyncio.Event()
            try:
                await asyncio.wait_for(self._drained.wait(), grace)
            except TimeoutError:
                log.warning(
                    "%s: %d requests still running after %.1fs; unloading anyway", self.label, self._inflight, grace
                )
        if self._batcher is not None:
            await self._batcher.stop()
        if self._prefixes is not None:
            self._prefixes.drop(self.prefix_scope)
        self._task, self._batcher, self._runtime = None, None, None


class ModelRegistry:
    """All model versions, loaded or failed, with load/unload hooks. Operations are serialized."""

    def __init__(self, settings: Settings, metrics: Metrics, tracer: Tracer | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.tracer = tracer  # handed to every version loaded (the trace extension)
        self._loaded_with: dict[str, dict[str, object]] = {}  # per model: the settings its last load's config set
        self._entries: dict[tuple[str, int], ModelEntry] = {}  # changed only through _put, _drop and _clear
        self._by_name: dict[str, list[ModelEntry]] = {}  # per name, oldest version first (a cache of _entries)
        self._unloaded: set[str] = set()  # unloaded on request: not reloaded by sync() until load_model()
        # load_models: the names loaded at start and by load_model(), the only ones sync() follows (None = all)
        self._chosen: set[str] | None = set(settings.load_models) if settings.load_models else None
        self._on_disk: set[str] = set()  # model names found at the last look at the repository
        self._folders: set[str] = set()  # every folder the repository held then, with versions or not
        self._root_problem: str | None = None  # why the repository itself could not be read at the last sync
        self._served: set[tuple[str, int]] = set()  # every (name, version) this process has ever served
        self._unreadable: set[str] = set()  # model folders that could not be listed at the last sync (warned once)
        self._strays: set[Path] = set()  # folders not named as a version at the last sync (warned once)
        self._loading: Counter[str] = Counter()  # names load_model() is loading now: how many loads of each
        self._missing: dict[str, tuple[str, tuple[int, ...]] | None] = {}  # per model: missing versions warned of
        self._outside: dict[str, tuple[str, list[int]]] = {}  # per model: its version_policy, the versions it leaves
        self._kept: set[tuple[str, int]] = set()  # versions outside their policy kept serving (warned once)
        self._lock = asyncio.Lock()
        self.prefixes = PrefixCache(settings.prefix_cache_bytes)  # shared by every model version, one budget
        self._on_load: list[Hook] = []
        self._on_unload: list[Hook] = []

    def subscribe(self, on_load: Hook | None = None, on_unload: Hook | None = None) -> None:
        if on_load is not None:
            self._on_load.append(on_load)
        if on_unload is not None:
            self._on_unload.append(on_unload)

    async def _fire(self, hooks: list[Hook], entry: ModelEntry, replaced: bool) -> None:
        for hook in hooks:
            try:
                result = hook(entry, replaced)
                if result is not None:
                    await result
            except Exception:  # a subscriber's bug must not break loading
                log.exception("model hook failed for %s", entry.label)

    # --- reading ----------------------------------------------------------------------------------------
    def versions(self) -> list[ModelEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def unloaded(self) -> list[str]:
        """Models not loaded on purpose: unloaded on request, or left out of ``load_models``."""
        skipped = self._on_disk - self._chosen if self._chosen is not None else set()
        return sorted((self._unloaded | skipped) - {name for name, _ in self._entries})

    def outside(self) -> dict[str, tuple[str, list[int]]]:
        """Per model whose version_policy leaves versions on disk out at the last sync: (policy, those versions)."""
        return {name: (policy, list(versions)) for name, (policy, versions) in self._outside.items() if versions}

    def left_out(self, name: str, version: int) -> str:
        """The version_policy of ``name`` when it leaves ``version`` (on disk at the last sync) out, else ""."""
        policy, versions = self._outside.get(name, ("", []))
        return policy if version in versions else ""

    def get(self, name: str, version: int) -> ModelEntry | None:
        return self._entries.get((name, version))

    def _put(self, entry: ModelEntry) -> None:
        self._entries[(entry.name, entry.version)] = entry
        if entry.ready:
            self._served.add((entry.name, entry.version))
        self._by_name.clear()

    def _drop(self, entry: ModelEntry) -> None:
        del self._entries[(entry.name, entry.version)]
        self._by_name.clear()

    def _clear(self) -> None:
        self._entries.clear()
        self._by_name.clear()

    def skipped(self, name: str) -> str:
        """Why ``name``, which the repository has, is not loaded: left out of ``load_models`` (and not loaded
        since), as the end of a message; "" otherwise."""
        if self._chosen is None or name in self._chosen or name not in self._on_disk or self._versions_of(name):
            return ""
        return (
            f"this server loads {sorted(self._chosen)} (load_models); load it with RepositoryModelLoad, or start "
            "the server with it in SEQSERVE_LOAD_MODELS"
        )

    def behind(self, name: str, version: int) -> str:
        """Why ``name`` ``version`` is one this process has yet to serve while another may (a release newer than
        this one, mid rolling update): never served here, not unloaded on request, and newer than every version of
        ``name`` here. "" when none of that holds (then it was served here and withdrawn, or is an old one).
        Callers ask ``skipped`` first: a model left out of ``load_models`` is no rolling update."""
        mine = self._versions_of(name)
        if (name, version) in self._served or name in self._unloaded or any(e.version >= version for e in mine):
            return ""
        return f"it serves versions {[e.version for e in mine]}" if mine else f"it serves no model {echo(name)}"

    def _versions_of(self, name: str) -> list[ModelEntry]:
        """Every version of ``name``, oldest first (computed once per change of the table, not per request)."""
        mine = self._by_name.get(name)
        if mine is None:
            mine = sorted((e for e in self._entries.values() if e.name == name), key=lambda e: e.version)
            if mine:
                self._by_name[name] = mine
        return mine

    def find(self, ref: ModelRef) -> ModelEntry:
        """The version ``ref`` names (ready or not); without a version, the newest ready one, else the newest."""
        mine = self._versions_of(ref.name)
        if not mine:
            if ref.name in self._loading:
                raise ModelUnavailable(
                    f"model {echo(ref.name)} is loading (RepositoryModelLoad); retry shortly", retry_after=RETRY_LATER
                )
            if ref.name in self._unloaded:
                raise ModelUnavailable(f"model {echo(ref.name)} was unloaded; load it again (RepositoryModelLoad)")
            if skipped := self.skipped(ref.name):
                raise ModelUnavailable(f"model {echo(ref.name)} is not loaded: {skipped}")
            names = sorted({e.name for e in self._entries.values()})
            raise ModelNotFound(f"model {echo(ref.name)} is not in the repository; available models: {names}")
        if ref.version is None:
            for e in reversed(mine):
                if e.ready:
                    return e
            return mine[-1]
        for e in mine:
            if e.version == ref.version:
                return e
        if policy := self.left_out(ref.name, ref.version):
            raise ModelNotFound(
                f"model {echo(ref.name)} version {ref.version} is in the repository but not served: the model's "
                f"version_policy is {policy} (SEQSERVE_VERSION_POLICY, its serving.json or a load's config); served "
                f"versions: {[e.version for e in mine]}"
            )
        raise ModelNotFound(
            f"model {echo(ref.name)} has no version {ref.version}; available versions: {[e.version for e in mine]}"
        )

    def resolve(self, ref: ModelRef) -> ModelEntry:
        """Like ``find`` but the version must be ready (``ModelUnavailable`` with the reason otherwise)."""
        entry = self.find(ref)
        entry.check_ready()
        return entry

    # --- changing -----------------------------------------------------------------------------------------
    def _discover(self) -> tuple[dict[tuple[str, int], Path], set[str]]:
        """The version folders on disk, and the names of model folders that could not be read (their loaded
        versions stay as they are: an unreadable folder is not a removed one)."""
        root = self.settings.models
        problem = not_a_folder(root)
        if problem is not None:
            # A repository gone as a whole (an unmount, a folder replaced by a deploy) is not every model removed:
            # the versions loaded from it keep serving until it is back (an empty folder still unloads them all).
            kept = {name for name, _ in self._entries}
            if problem != self._root_problem:  # (once per change, not at every poll)
                if kept:
                    log.warning("model repository %s %s; the models loaded from it keep serving (%s) until it is "
                                "back", root, problem, ", ".join(sorted(kept)))  # fmt: skip
                else:
                    log.warning("model repository %s %s; no models will be served", root, problem)
            self._root_problem, self._folders = problem, set()
            self._unreadable, self._on_disk = kept, set(kept)
            return {}, kept
        if self._root_problem is not None:
            log.info("model repository %s is back", root)
            self._root_problem = None
        found: dict[tuple[str, int], Path] = {}
        unreadable: set[str] = set()
        strays: set[Path] = set()
        folders = [p for p in root.iterdir() if p.is_dir()]
        self._folders = {p.name for p in folders}
        for model_dir in sorted(p for p in folders if not p.name.startswith(".")):
            try:
                versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError as exc:  # e.g. ext4's lost+found, or a folder being replaced
                unreadable.add(model_dir.name)
                if model_dir.name not in self._unreadable:
                    log.warning("ignoring %s: %s", model_dir, exc)
                continue
            for vdir in versions:
                if not VERSION_FOLDER.fullmatch(vdir.name):
                    strays.add(vdir)
                    if vdir not in self._strays:  # (--watch-models: once, not at every poll)
                        log.warning("ignoring %s: a version folder's name must be %s", vdir, VERSION_RULE)
                    continue
                found[(model_dir.name, int(vdir.name))] = vdir
        self._unreadable, self._strays = unreadable, strays
        self._on_disk = {name for name, _ in found} | unreadable
        return found, unreadable

    def strays(self) -> list[Path]:
        """Folders inside model folders that are not named as a version (ignored, warned of once at the sync)."""
        return sorted(self._strays)

    async def start(self) -> None:
        """The first sync. With ``load_models``, every name in it must be in the repository: a name misspelt
        would otherwise leave a server up that serves nothing it was meant to."""
        problem = not_a_folder(self.settings.models)
        if problem is not None and self.settings.exit_on_error:
            raise RuntimeError(
                f"exit_on_error (SEQSERVE_EXIT_ON_ERROR, --exit-on-error) is set and the model repository "
                f"{self.settings.models} {problem}: point --models (SEQSERVE_MODELS) at the folder of model folders"
            )
        failures = await self.sync()
        if problem is None and not self._entries and not self._on_disk:  # (a missing folder was said by the sync)
            log.warning(
                "model repository %s holds no model versions (MODEL/VERSION/ folders, e.g. charlm/1/ with "
                "model.onnx and manifest.json): nothing is served, and readiness stays NOT_SERVING until some "
                "appear (--watch-models polls for them; RepositoryModelLoad loads one added)",
                self.settings.models,
            )
        missing = sorted(self._chosen - self._on_disk) if self._chosen is not None else []
        if missing:
            raise RuntimeError(
                f"load_models (SEQSERVE_LOAD_MODELS, --load-model) names {missing}, which the model repository "
                f"{self.settings.models} does not have; its models are {sorted(self._on_disk)}"
            )
        if failures and self.settings.exit_on_error:
            why = "; ".join(f"{n}/{v}: {failures[n, v]}" for n, v in sorted(failures))
            raise RuntimeError(
                f"exit_on_error (SEQSERVE_EXIT_ON_ERROR, --exit-on-error) is set and {len(failures)} model version(s) "
                f"failed to load: {why}"
            )

    async def sync(
        self, names: set[str] | None = None, force: bool = False, retry: bool = False
    ) -> dict[tuple[str, int], str]:
        """Brings the table in line with the disk, for ``names`` (None = every model not unloaded on request);
        ``force``: reload them even when nothing changed on disk (their settings did); ``retry``: load again the
        versions whose files failed to load, changed or not (an explicit load). Returns the versions that failed
        to load in this sync, with why."""
        async with self._lock:
            return await self._sync(names, force, retry)

    async def _sync(self, names: set[str] | None, force: bool, retry: bool) -> dict[tuple[str, int], str]:
        """``sync``, with the lock held."""
        select_providers(self.settings.device)  # fail fast on an impossible device setting
        failures: dict[tuple[str, int], str] = {}
        found, unreadable = await asyncio.to_thread(self._discover)

        def wanted(name: str) -> bool:
            if names is not None:
                return name in names
            return name not in self._unloaded and (self._chosen is None or name in self._chosen)

        for key, entry in list(self._entries.items()):
            if wanted(key[0]) and key not in found and key[0] not in unreadable:
                log.info("model %s removed from the repository; unloading", entry.label)
                await self._unload(entry)
        policies = await asyncio.to_thread(self._policies, {n for n, _ in found if wanted(n)})
        outside = self._outside_policies(found, policies, failures)
        # Newest first: the version a call naming none gets is loaded before the older ones.
        for (name, version), path in sorted(found.items(), key=lambda item: (item[0][0], -item[0][1])):
            if not wanted(name) or version in outside.get(name, ()):
                continue
            old = self._entries.get((name, version))
            failed = old is not None and (old.error is not None or old.failed_again is not None)
            if old is not None and old.signature == _signature(path) and not force and not (retry and failed):
                continue  # unchanged on disk
            why = await self._load(name, version, path, old)
            if why is not None:
                failures[(name, version)] = why
        for name, versions in outside.items():
            await self._leave_outside(name, versions, policies[name])
        return failures

    def _policies(self, names: set[str]) -> dict[str, str]:
        """Each model's version_policy (``_policy``, with the config of its last load)."""
        return {name: self._policy(name, self._loaded_with.get(name)) for name in names}

    def _policy(self, name: str, loaded: dict[str, object] | None) -> str:
        """``name``'s version_policy: ``loaded``'s (a load's config), its serving.json's or the server's. A
        serving.json that is not valid counts as ``all`` here: every version then loads, and fails saying what is
        wrong with it."""
        try:
            settings, _ = model_settings(self.settings, self.settings.models / name, loaded)
        except ValueError:
            return "all"
        return settings.version_policy

    def _outside_policies(
        self, found: dict[tuple[str, int], Path], policies: dict[str, str], failures: dict[tuple[str, int], str]
    ) -> dict[str, list[int]]:
        """Per model in ``policies``, the versions on disk its policy leaves out (remembered for ``find``). A model
        whose policy chooses none of them failed to load (``_none_chosen``, into ``failures``); no version of it
        loads in this sync, so whether it serves one is known here already."""
        outside: dict[str, list[int]] = {}
        for name, policy in policies.items():
            on_disk = sorted(v for n, v in found if n == name)
            chosen = set(chosen_versions(policy, on_disk))
            outside[name] = [v for v in on_disk if v not in chosen]
            self._outside[name] = (policy, outside[name])
            self._warn_missing(name, policy, on_disk, chosen)
            if not chosen and (why := self._none_chosen(name, policy, on_disk, found)):
                failures[(name, on_disk[-1])] = why
        return outside

    def _warn_missing(self, name: str, policy: str, on_disk: list[int], chosen: set[int]) -> None:
        """Logs, once per policy and repository, the versions a ``specific`` policy names that are not on disk while
        it chooses others (as Triton logs them); a policy that chooses none fails the model (``_none_chosen``)."""
        missing = sorted((named_versions(policy) or set()) - set(on_disk))
        said = (policy, tuple(missing)) if missing and chosen else None
        if said is not None and self._missing.get(name) != said:
            log.warning("model %s: its version_policy %s names version(s) %s, which the repository does not have; "
                        "serving %s", name, policy, missing, sorted(chosen))  # fmt: skip
        self._missing[name] = said

    def _none_chosen(
        self, name: str, policy: str, on_disk: list[int], found: dict[tuple[str, int], Path]
    ) -> str | None:
        """A model whose version_policy chooses none of its versions on disk, and that serves none: it failed to
        load, as Triton's does ("at least one version must be available under the version policy"). Its newest
        version is entered as failed with that reason, so the index, ModelReady, ServerReady, the metrics and the
        calls say so, instead of the model vanishing. Returns the reason when newly entered. (A model that still
        serves versions loaded before keeps serving them: ``_leave_outside``.)"""
        if any(e.ready for e in self._versions_of(name)):
            return None
        has = ", ".join(map(str, on_disk))
        why = (
            f"its version_policy {policy} chooses none of the model's versions in the repository ({has}); at least "
            "one version must be available under the version policy: change the policy (its serving.json, a "
            "load's config or SEQSERVE_VERSION_POLICY) or add the version it names"
        )
        newest = on_disk[-1]
        old = self._entries.get((name, newest))
        if old is not None and old.error == why:
            return None  # (entered at an earlier sync)
        entry = ModelEntry(name, newest, found[(name, newest)], tracer=self.tracer)
        entry.error = why
        self._put(entry)
        log.error("model %s failed to load: %s", entry.label, why)
        self.metrics.model_loaded(name, newest, "", 0.0, False)
        return why

    async def _leave_outside(self, name: str, versions: list[int], policy: str) -> None:
        """Unloads the loaded versions of ``name`` that its policy leaves out, once a version it chooses is ready;
        until then they serve on (a new version that fails to load does not take the model away)."""
        loaded = [e for e in self._versions_of(name) if e.version in versions]
        if not loaded:
            return
        if not any(e.ready for e in self._versions_of(name) if e.version not in versions):
            for e in loaded:
                if e.ready and (e.name, e.version) not in self._kept:
                    self._kept.add((e.name, e.version))
                    log.warning("model %s is outside its version_policy %s but serves on: no version the policy "
                                "chooses is ready", e.label, policy)  # fmt: skip
            return
        for e in loaded:
            self._kept.discard((e.name, e.version))
            log.info("model %s is outside its version_policy %s; unloading", e.label, policy)
            await self._unload(e)

    async def _load(self, name: str, version: int, path: Path, old: ModelEntry | None) -> str | None:
        """Loads one version's files (replacing ``old``, its entry, once the new one is ready); the reason when
        they failed to load (``old``, when ready, then serves on)."""
        entry = ModelEntry(name, version, path, tracer=self.tracer)
        await asyncio.to_thread(entry.load_files, self.settings, self._loaded_with.get(name))
        same = old is not None and (entry.sha256, entry.serving, entry.loaded_manifest) == (
            old.sha256,
            old.serving,
            old.loaded_manifest,
        )
        if old is not None and old.ready and entry.error is None and same:
            old.signature = entry.signature  # touched, same files and settings: keep serving the loaded one
            if old.failed_again is not None:
                old.failed_again = None
                self.metrics.model_reload_failed_now(name, version, False)
            return None
        if entry.error is None:
            try:
                entry.start(entry.served_with, self.metrics, self.prefixes)
            except Exception as exc:  # the task refused this version (a plugin's constructor, an odd manifest)
                log.exception("model %s: its task could not start", entry.label)
                await entry.stop(0.0)
                entry.state, entry.error = "UNAVAILABLE", f"its task could not start ({type(exc).__name__}: {exc})"
        if entry.error is not None:
            if old is not None and old.ready:
                old.signature = entry.signature  # retry only when the files change again (or on an explicit load)
                old.failed_again = entry.error
                self.metrics.model_reload_failed_now(name, version, True)
                log.error("model %s changed on disk but failed to load; still serving the old one: %s", old.label,
                          entry.error)  # fmt: skip
                return f"{entry.error} (the weights it loaded before serve on)"
            self._put(entry)
            log.error("model %s failed to load: %s", entry.label, entry.error)
            self.metrics.model_loaded(name, version, "", entry.load_seconds, False)
            return entry.error
        self._put(entry)
        replaced = old is not None and old.ready
        log.info(
            "%s model %s on %s in %.2fs (sha256 %s%s)", "reloaded" if replaced else "loaded", entry.label,
            entry.info().provider, entry.load_seconds, entry.sha256[:12], _what_changed(old, entry) if replaced else "",
        )  # fmt: skip
        if old is not None and old.ready:
            await self._fire(self._on_load, entry, True)
            await old.stop(self.settings.grace_seconds)
            await self._fire(self._on_unload, old, True)
        else:
            await self._fire(self._on_load, entry, False)
        return None

    async def _unload(self, entry: ModelEntry) -> None:
        self._drop(entry)
        if entry.ready:
            await entry.stop(self.settings.grace_seconds)
        await self._fire(self._on_unload, entry, False)

    async def load_model(self, name: str, serving: dict[str, object] | None = None) -> None:
        """Triton's load_model: (re)loads every version of ``name`` found on disk. Until its newest version is
        loaded, calls that name no version get UNAVAILABLE saying it is loading (never an older version).
        ``serving``: per-model settings over its serving.json (a load's config, as Triton's ``config`` parameter),
        kept until the next load, which without one goes back to the files. As Triton's, the load fails
        (FAILED_PRECONDITION, saying why) when a version's files fail to load, tried again here even when unchanged;
        the versions that did load serve, and a version that was serving before serves on with its old weights."""
        try:
            loaded = checked(serving, "load parameter config") if serving else None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        self._loading[name] += 1  # (counted: a load that ends while another of the model runs leaves it loading)
        try:
            found, _ = await asyncio.to_thread(self._discover)
            on_disk = sorted(v for n, v in found if n == name)
            if not on_disk:
                raise ModelNotFound(self._not_found(name))
            await self._check_policy(name, loaded, on_disk)
            async with self._lock:  # (an unload of the model either ends before these changes or begins after it)
                self._unloaded.discard(name)
                if self._chosen is not None:
                    self._chosen.add(name)  # followed by --watch-models from now on
                changed = self._loaded_with.get(name) != loaded
                if loaded:
                    self._loaded_with[name] = loaded
                else:
                    self._loaded_with.pop(name, None)
                failures = await self._sync({name}, force=changed, retry=True)
        finally:
            self._loading[name] -= 1
            if not self._loading[name]:
                del self._loading[name]
        if failures:
            why = "; ".join(f"version {v} failed to load: {failures[n, v]}" for n, v in sorted(failures))
            raise FailedPrecondition(f"model {echo(name)}: {why}; load it again once its files are fixed")

    def _not_found(self, name: str) -> str:
        """Why a load of ``name`` finds nothing to load: no folder of that name in the repository, or one without a
        version folder. (Only the repository's own listing, as ``_discover`` just read it, is consulted, never a
        path built from ``name``; the server's paths are not told.)"""
        if name in self._folders:
            return (
                f"model {echo(name)} has no version to load: its folder in the repository holds no version folder "
                f"({name}/1/, {name}/2/, ...: its name must be {VERSION_RULE}); add one, then load it"
            )
        return f"model {echo(name)} is not in the repository; its models are {sorted(self._on_disk)}"

    async def _check_policy(self, name: str, loaded: dict[str, object] | None, on_disk: list[int]) -> None:
        """Refuses a load, before it changes anything, whose version_policy chooses none of the versions on disk
        (Triton: "at least one version must be available under the version policy"): INVALID_ARGUMENT when the
        load's config set the policy, else FAILED_PRECONDITION (its serving.json's, or the server's)."""
        policy = await asyncio.to_thread(self._policy, name, loaded)
        if chosen_versions(policy, on_disk):
            return
        has = ", ".join(map(str, on_disk))
        if loaded and "version_policy" in loaded:
            raise InvalidInput(
                f"load parameter config: version_policy {policy} chooses none of the versions of model {echo(name)} "
                f"in the repository ({has}); at least one version must be available under the version policy"
            )
        raise FailedPrecondition(
            f"model {echo(name)}: its version_policy {policy} (its serving.json's, or the server's VERSION_POLICY) "
            f"chooses none of its versions in the repository ({has}); at least one version must be available under "
            "the version policy: change the policy, or add the version it names"
        )

    async def unload_model(self, name: str) -> None:
        """Triton's unload_model: every version stops taking requests, drains, and is freed."""
        async with self._lock:
            mine = [e for e in self._entries.values() if e.name == name]
            if not mine and name not in self._unloaded and not self.skipped(name):
                raise ModelNotFound(f"model {echo(name)} is not loaded")
            self._unloaded.add(name)
            for entry in mine:
                log.info("unloading model %s on request", entry.label)
                await self._unload(entry)

    async def stop(self) -> None:
        async with self._lock:
            for entry in list(self._entries.values()):
                if entry.ready:
                    await entry.stop(0.0)
            self._clear()
