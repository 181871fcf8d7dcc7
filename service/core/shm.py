"""Triton's system shared-memory extension: POSIX shared-memory objects that a client on the same host registers
by name, so that an input is read from one, or an output written into one, instead of travelling in the request.

A region is (name, key, offset, byte_size): ``key`` names an object under ``/dev/shm`` (``shm_open``'s name, with or
without its leading slash), and the region is ``byte_size`` bytes of it from ``offset``. Registering maps the object
(``mmap``, read and write); unregistering unmaps it. The client owns the object: the server never creates,
resizes or unlinks one.

With ``--workers N`` the engine's ``Regions`` is the one that registrations change (``CoreDataPlane``), and it
sends its table to every frontend, which maps the same objects (``follow``): the frontends read and write the
tensors, and a registration answers once every frontend has mapped the region.

Off unless ``SEQSERVE_SHARED_MEMORY=system``: a registration makes the server open a file of its host that the
caller names, which only a client on the same host can use, and which a remote caller should not be able to ask
for by default.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
from collections.abc import Iterable

from service.core.types import SharedRegion
from service.errors import AlreadyExists, InvalidInput, NotOffered, RegionNotFound, echo

log = logging.getLogger(__name__)

ROOT = "/dev/shm"
MAX_REGIONS = 1024
# shm_open's names: one path component. Letters, digits and ._- only, so a key can never leave ROOT.
_KEY = re.compile(r"/?([A-Za-z0-9_.-]{1,255})")
_NAME_CHARS = 256
OFF_MESSAGE = (
    "the system shared-memory extension is off on this server: send the tensors in the request, or start the "
    "server with SEQSERVE_SHARED_MEMORY=system (the client must run on the server's host)"
)


class _Mapped:
    __slots__ = ("map", "region")

    def __init__(self, region: SharedRegion, mapped: mmap.mmap) -> None:
        self.region, self.map = region, mapped


class Regions:
    """The registered regions of one process, mapped. ``enabled`` False: every call says how to turn it on."""

    def __init__(self, enabled: bool, root: str = ROOT, limit: int = MAX_REGIONS) -> None:
        self.enabled = enabled
        self.root = root
        self.limit = limit
        self._regions: dict[str, _Mapped] = {}

    def check_on(self) -> None:
        """UNIMPLEMENTED, naming the setting, when the extension is off."""
        if not self.enabled:
            raise NotOffered(OFF_MESSAGE)

    # --- registration -----------------------------------------------------------------------------------
    def register(self, region: SharedRegion) -> None:
        """Maps ``region``; INVALID_ARGUMENT for a malformed one, NOT_FOUND when its key names no object,
        ALREADY_EXISTS when the name is taken (unregister it first, as in Triton)."""
        self.check_on()
        if not region.name or len(region.name) > _NAME_CHARS:
            raise InvalidInput(f"a region's name is 1 to {_NAME_CHARS} characters, got {len(region.name)}")
        if region.name in self._regions:
            raise AlreadyExists(
                f"shared-memory region {echo(region.name)} is registered already; unregister it first or use "
                "another name"
            )
        if len(self._regions) >= self.limit:
            raise InvalidInput(f"{self.limit} shared-memory regions are registered; unregister one first")
        self._regions[region.name] = _Mapped(region, self._map(region))

    def _map(self, region: SharedRegion) -> mmap.mmap:
        m = _KEY.fullmatch(region.key)
        if m is None or m[1] in (".", ".."):
            raise InvalidInput(
                f"shared-memory key {echo(region.key)} is not a POSIX shared-memory name: one component of "
                "letters, digits and ._- with an optional leading slash, as given to shm_open (e.g. /input0)"
            )
        if region.offset < 0 or region.byte_size <= 0:
            raise InvalidInput(
                f"region {echo(region.name)}: offset must be >= 0 and byte_size > 0, got {region.offset} and "
                f"{region.byte_size}"
            )
        path = os.path.join(self.root, m[1])
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RegionNotFound(
                f"no shared-memory object {echo(region.key)} on the server's host ({echo(path)}): create it there "
                "(shm_open) before registering it; a client in another container needs the server's IPC "
                "namespace (docker --ipc)"
            ) from None
        except OSError as exc:
            raise InvalidInput(
                f"shared-memory object {echo(region.key)} cannot be opened for reading and writing by the "
                f"server: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(f"{echo(path)} is not a shared-memory object")
            end = region.offset + region.byte_size
            if end > info.st_size:
                raise InvalidInput(
                    f"region {echo(region.name)}: offset {region.offset} + byte_size {region.byte_size} passes the "
                    f"end of shared-memory object {echo(region.key)} ({info.st_size} bytes)"
                )
            return mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def unregister(self, name: str | None) -> None:
        """Unmaps ``name`` (None or "": every region). A name not registered is no error, as in Triton."""
        self.check_on()
        for key in list(self._regions) if not name else [name]:
            mapped = self._regions.pop(key, None)
            if mapped is not None:
                _close(mapped)

    def status(self, name: str | None = None) -> list[SharedRegion]:
        """The regions (``name``'s alone when given; NOT_FOUND when it is not registered)."""
        self.check_on()
        if not name:
            return [m.region for m in self._regions.values()]
        mapped = self._regions.get(name)
        if mapped is None:
            raise RegionNotFound(f"no shared-memory region {echo(name)} is registered")
        return [mapped.region]

    def follow(self, table: Iterable[SharedRegion]) -> None:
        """Makes this process's mappings match ``table`` (the engine's): maps the new regions, unmaps the gone
        ones, keeps the rest. A region that cannot be mapped here is logged and left out (its use then fails with
        NOT_FOUND, naming it)."""
        wanted = {r.name: r for r in table}
        for name in [n for n, m in self._regions.items() if wanted.get(n) != m.region]:
            _close(self._regions.pop(name))
        for name, region in wanted.items():
            if name not in self._regions:
                try:
                    self._regions[name] = _Mapped(region, self._map(region))
                except Exception:
                    log.exception("could not map shared-memory region %r that the engine registered", name)

    def close(self) -> None:
        for mapped in self._regions.values():
            _close(mapped)
        self._regions.clear()

    # --- tensors ----------------------------------------------------------------------------------------
    def _find(self, name: str, offset: int, byte_size: int, what: str) -> _Mapped:
        self.check_on()
        mapped = self._regions.get(name)
        if mapped is None:
            raise RegionNotFound(f"{what}: no shared-memory region {echo(name)} is registered; register it first")
        if offset < 0 or byte_size < 0 or offset + byte_size > mapped.region.byte_size:
            raise InvalidInput(
                f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} pass the end of "
                f"region {echo(name)} ({mapped.region.byte_size} bytes)"
            )
        return mapped

    def read(self, name: str, offset: int, byte_size: int, what: str) -> bytes:
        """A copy of ``byte_size`` bytes of region ``name`` from ``offset`` (within the region)."""
        mapped = self._find(name, offset, byte_size, what)
        start = mapped.region.offset + offset
        return mapped.map[start : start + byte_size]

    def check(self, name: str, offset: int, byte_size: int, what: str) -> None:
        """Raises what ``read`` or ``write`` would for these bounds, before anything runs."""
        self._find(name, offset, byte_size, what)

    def write(self, name: str, offset: int, byte_size: int, data: bytes, what: str) -> None:
        """Writes ``data`` into region ``name`` at ``offset``; it must fit in ``byte_size``."""
        mapped = self._find(name, offset, byte_size, what)
        if len(data) > byte_size:
            raise InvalidInput(
                f"{what} is {len(data)} bytes, more than its shared_memory_byte_size {byte_size}: give the output "
                f"a larger region (nothing was written into {echo(name)})"
            )
        start = mapped.region.offset + offset
        mapped.map[start : start + len(data)] = data


def _close(mapped: _Mapped) -> None:
    mapped.map.close()  # (reads copy out of the map and writes copy in: no view of it outlives a call)
