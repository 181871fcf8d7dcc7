"""The hot path compiled to C with mypyc, beside its Python source, and the import rule that keeps the two in step.

``python -m service.compile build`` compiles ``MODULES`` (the per-step path: the batcher, the sequence core, session
state, statistics, the KServe tensors and parameters...) with mypyc, the compiler that ships with mypy, into C
extension modules next to their ``.py`` files, plus one shared library (``service/compiled__mypyc*.so``) and
``service/compiled.digest``: the sha256 of the sources it compiled. Python imports an extension module before a
source file of the same name, so a built tree runs the compiled modules, the same code without the interpreter's
per-bytecode cost (``python -m bench.regress --base HEAD --env SEQSERVE_COMPILED=true --base-env
SEQSERVE_COMPILED=false``: README, *The compiled hot path*).

The compiled modules are one group: they call each other's functions natively, so they are used all together or
not at all. ``install()`` (run by ``service/__init__.py``, before any of them is imported) makes Python import
every one of them from its ``.py`` instead when the sources no longer match the digest (a module edited since the
build: its compiled copy is stale) or when ``SEQSERVE_COMPILED`` is false. A tree never built, or a machine without
a C compiler, runs the same code interpreted: nothing else changes. ``make serve``, ``make test`` and the image
build it (``make compiled``); ``python -m service.compile status`` says which is in use and why.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The per-step path of a served step, by profile (bench.core; tests/service/test_compiled.py checks each is compiled).
# Left out: modules with async generators (mypyc cannot compile them: the data plane, the servicers), the session
# store (plugins and the tests subclass it), the registry (its entries are weak-referenced), the runtime (the
# tests replace its module's functions) and the session manager: compiled, it took the core's CPU per step from
# 0.87x to 0.85x of the source's, and its async paths are where mypyc differs: an exception raised through an
# ``await`` in a ``finally`` (its leases' ``__aexit__`` have one) came back out of a later ``async with``
# (tests/service/core/test_session_store.py, compiled). Compiled code must not have one. Also tried and left out:
# the engine's codec and framing (``service/engine/codec.py``, ``wire.py``; msgpack's C does their work: with
# ``--workers 2``, perf_analyzer's charlm-stream and charlm-unary at c=16 and 64 measured 0.90-1.08x, three rounds,
# ``bench.regress --base e6f6b34 --workers 2``), ``service/metrics.py`` (the tests subclass ``Metrics``), the edge's
# decoding and the char-LM task (async generators), the task base class (plugins subclass it).
MODULES = (
    "service.api.kserve.params",
    "service.api.kserve.tensors",
    "service.core.arrays",
    "service.core.batching",
    "service.core.context",
    "service.core.pinning",
    "service.core.sequences",
    "service.core.sessions.state",
    "service.core.stats",
    "service.core.tokenizers",
)
GROUP = "service.compiled"  # the shared library's module: service/compiled__mypyc.<abi>.so
ROOT = Path(__file__).resolve().parent.parent  # the folder holding the ``service`` package
DIGEST = Path(__file__).with_name("compiled.digest")
_FALSE = {"0", "false", "no", "off", "n", "f"}  # pydantic's false strings (SEQSERVE_COMPILED is a Settings bool)


def source(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def digest() -> str:
    """sha256 over the compiled modules' names and sources, and this Python's version (the ABI they were built
    for)."""
    h = hashlib.sha256(sys.version.encode())
    for module in MODULES:
        h.update(module.encode() + b"\0" + source(module).read_bytes() + b"\0")
    return h.hexdigest()


def built() -> list[Path]:
    """Every compiled file in the package (the modules' extensions and the group's library; also those of a module
    since dropped from ``MODULES``, which Python would still import before its source)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for p in (ROOT / "service").rglob("*.so") if p.name.endswith(suffixes))


def _module(path: Path) -> str:
    """The module a compiled file is (``service/core/stats.cpython-311-x86_64-linux-gnu.so``: service.core.stats)."""
    return ".".join(path.relative_to(ROOT).with_name(path.name.split(".", 1)[0]).parts)


def _built_from(files: list[Path]) -> str | None:
    """Why the compiled ``files`` (``built()``) cannot stand for the sources as they are now; None when they can."""
    if not files:
        return "not built (python -m service.compile build; needs a C compiler and Python's headers)"
    try:
        recorded = DIGEST.read_text().strip()
    except OSError:
        return f"no {DIGEST.name}: the build did not finish (python -m service.compile build)"
    if recorded != digest():
        return "stale: a compiled module's source changed since the build (python -m service.compile build)"
    if {_module(p) for p in files} != {*MODULES, f"{GROUP}__mypyc"}:
        return "stale: built for another list of modules (python -m service.compile build)"
    return None


def current() -> bool:
    """Whether the compiled files are built from the sources as they are now."""
    return _built_from(built()) is None


def state(files: list[Path] | None = None) -> tuple[bool, str]:
    """(whether the compiled modules are to be used, why); ``files``: ``built()``, when the caller has it."""
    if os.environ.get("SEQSERVE_COMPILED", "true").strip().lower() in _FALSE:
        return False, "SEQSERVE_COMPILED is false"
    why = _built_from(built() if files is None else files)
    return (False, why) if why else (True, f"{len(MODULES)} modules compiled with mypyc")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the compiled modules from their ``.py`` files (the extension modules beside them are skipped)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source(fullname))

    def __init__(self, files: list[Path]) -> None:
        # the listed modules, and any other module a compiled file (of ``built()``) is left for
        self.modules = {*MODULES, *(_module(p) for p in files)} - {f"{GROUP}__mypyc"}


_decided: tuple[bool, str] | None = None  # install()'s state(): what this process imports


def install() -> None:
    """Run before any compiled module is imported: the sources stand in for the compiled modules unless they are
    built, current and wanted."""
    global _decided
    files = built()  # (one walk of the package for both)
    _decided = state(files)
    if not _decided[0] and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFirst(files))


def in_use() -> tuple[bool, str]:
    """Whether this process runs the compiled modules, and why: decided once, when the package was imported (the
    files are not read again)."""
    return _decided if _decided is not None else state()
