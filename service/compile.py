"""``python -m service.compile build [--if-stale] | status | clean | copy --into DIR``: compiles the hot path with
mypyc (``service/compiled.py`` says what and why), says whether it is in use, removes it, or copies it into another
copy of the package (the image: built in the source tree, copied into the installed package)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from service.compiled import DIGEST, GROUP, MODULES, ROOT, built, current, digest, source, state


def build(mypy_args: list[str] | None = None, jobs: int = os.cpu_count() or 1) -> None:
    """Compiles ``MODULES`` in place (mypyc, then the C compiler) and records the sources' digest. ``mypy_args``:
    mypy options for the type check mypyc starts with (the image's builder names the Python whose packages it
    checks against)."""
    from mypyc.build import mypycify  # mypy's compiler: a dev and build dependency, not a runtime one
    from setuptools import Distribution  # type: ignore[import-untyped]

    clean()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="seqserve-compile-") as tmp:
        os.chdir(ROOT)  # mypyc names the modules by their paths (and reads pyproject.toml's mypy settings if any)
        try:
            paths = [str(source(m).relative_to(ROOT)) for m in MODULES]
            extensions = mypycify(
                [*(mypy_args or []), *paths], opt_level="3", debug_level="0", group_name=GROUP, target_dir=tmp
            )
            # A bare Distribution: setup() would read a pyproject.toml in the folder (the image builds in
            # site-packages, where a dependency left one that setuptools refuses).
            dist = Distribution({"name": "seqserve-compiled", "ext_modules": extensions})
            command = dist.get_command_obj("build_ext")
            command.inplace, command.build_temp, command.parallel = True, tmp, jobs
            dist.run_command("build_ext")
        finally:
            os.chdir(cwd)
    DIGEST.write_text(digest() + "\n")


def copy(into: Path) -> None:
    """Copies the compiled files and the digest into ``into``, a folder holding another copy of the same ``service``
    package (the image builds in its source tree and copies into the installed package; ``status`` there then says
    whether that copy's sources match)."""
    if not (into / "service" / "__init__.py").is_file():
        raise SystemExit(f"{into} holds no service package to copy the compiled modules into")
    for path in [*built(), DIGEST]:
        shutil.copy2(path, into / path.relative_to(ROOT))


def clean() -> None:
    for path in [*built(), DIGEST]:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m service.compile", description=__doc__)
    ap.add_argument("command", choices=["build", "status", "clean", "copy"])
    ap.add_argument("--into", type=Path, help="copy: the folder holding the other copy of the service package")
    ap.add_argument("--if-stale", action="store_true", help="build only when not built or built from other sources")
    ap.add_argument("--require", action="store_true", help="exit 1 unless the compiled modules are in use")
    ap.add_argument("--python-executable", help="check against this Python's packages (default: this one's)")
    args = ap.parse_args(argv)
    mypy_args = [f"--python-executable={args.python_executable}"] if args.python_executable else []
    if args.command == "build" and not (args.if_stale and current()):
        build(mypy_args)
    elif args.command == "clean":
        clean()
    elif args.command == "copy":
        if args.into is None:
            ap.error("copy needs --into")
        copy(args.into)
    use, why = state()
    print(f"compiled hot path: {'in use' if use else 'not in use'} ({why})")
    return 1 if args.require and not use else 0


if __name__ == "__main__":
    sys.exit(main())
