"""Triton's system shared-memory extension: POSIX shared-memory objects that a client on the same host registers
by name, so that an input is read from one, or an output written into one, instead of travelling in the request.

A region is (name, key, offset, byte_size): ``key`` names an object under ``/dev/shm`` (``shm_open``'s name, with or
without its leading slash), and the region is ``byte_size`` bytes of it from ``offset``. Registering opens the object
(read and write); unregistering closes it. The client owns the object: the server never creates,
resizes or unlinks one.

Regions are per principal, as sequences are: a region belongs to the principal that registered it, and its names
are that principal's own. Another principal's status, unregistering and tensors see it as not registered (and may
register the same name), and may not register the same object (PERMISSION_DENIED while any region of it is
registered), so no caller reads what another's region holds through a model, or writes its answers into another's
region. Without credentials every caller is the one anonymous principal, as on Triton.

With ``--workers N`` the engine's ``Regions`` is the one that registrations change (``CoreDataPlane``), and it
sends its table to every frontend, which opens the same objects (``follow``): the frontends read and write the
tensors, and a registration answers once every frontend has opened the region.

Off unless ``SEQSERVE_SHARED_MEMORY=system``: a registration makes the server open a file of its host that the
caller names, which only a client on the same host can use, and which a remote caller should not be able to ask
for by default.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from collections.abc import Iterable

from service.core.context import principal
from service.core.types import SharedRegion
from service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotOffered,
    Overloaded,
    PermissionDenied,
    RegionNotFound,
    echo,
)

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


class _Opened:
    """A registered region and its object's descriptor. Tensors are copied with ``pread``/``pwrite``, not through a
    mapping: touching a mapped page past the end of its file kills the process (SIGBUS), and the object's owner may
    shrink it at any time; a read past the end only comes back short."""

    __slots__ = ("fd", "region")

    def __init__(self, region: SharedRegion, fd: int) -> None:
        self.region, self.fd = region, fd


class Regions:
    """The registered regions of one process, opened. ``enabled`` False: every call says how to turn it on."""

    def __init__(self, enabled: bool, root: str = ROOT, limit: int = MAX_REGIONS) -> None:
        self.enabled = enabled
        self.root = root
        self.limit = limit
        self._regions: dict[tuple[str, str], _Opened] = {}  # (owner, name): each principal's names are its own

    def check_on(self) -> None:
        """UNIMPLEMENTED, naming the setting, when the extension is off."""
        if not self.enabled:
            raise NotOffered(OFF_MESSAGE)

    # --- registration -----------------------------------------------------------------------------------
    def register(self, region: SharedRegion) -> None:
        """Opens ``region``'s object as the caller's region; INVALID_ARGUMENT for a malformed one, NOT_FOUND when
        its key names no object, ALREADY_EXISTS when the caller has a region of that name (unregister it first, as
        in Triton)."""
        self.check_on()
        region = dataclasses.replace(region, owner=principal())
        if not region.name or len(region.name) > _NAME_CHARS:
            raise InvalidInput(f"a region's name is 1 to {_NAME_CHARS} characters, got {len(region.name)}")
        if (region.owner, region.name) in self._regions:
            raise AlreadyExists(
                f"shared-memory region {echo(region.name)} is registered already; unregister it first or use "
                "another name"
            )
        if len(self._regions) >= self.limit:  # (one descriptor each, all principals together)
            raise Overloaded(
                f"the server holds {self.limit} shared-memory regions, its most; unregister one first (regions "
                "a client no longer uses stay registered until it unregisters them)"
            )
        fd = self._open(region)
        try:
            self._check_object_is_the_callers(region, fd)
        except BaseException:
            os.close(fd)
            raise
        self._regions[region.owner, region.name] = _Opened(region, fd)

    def _check_object_is_the_callers(self, region: SharedRegion, fd: int) -> None:
        """PERMISSION_DENIED when another principal has a region of the same object (by file identity: a key with
        or without its slash, a link): region names alone kept principals apart, so a caller who knew another's key
        registered it under a name of its own, read its input through a model's answer and wrote its answers
        over it."""
        info = os.fstat(fd)
        for (owner, _), opened in self._regions.items():
            if owner == region.owner:
                continue
            other = os.fstat(opened.fd)
            if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
                raise PermissionDenied(
                    f"shared-memory object {echo(region.key)} is registered by another caller; create one of your "
                    "own (shm_open, a name no other client uses) and register that"
                )

    def _open(self, region: SharedRegion) -> int:
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
            return fd
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, name: str | None) -> None:
        """Closes the caller's region ``name`` (None or "": every region of the caller). A name not registered is
        no error, as in Triton."""
        self.check_on()
        owner = principal()
        for key in [k for k in self._regions if k[0] == owner and (not name or k[1] == name)]:
            _close(self._regions.pop(key))

    def status(self, name: str | None = None) -> list[SharedRegion]:
        """The caller's regions (``name``'s alone when given; NOT_FOUND when the caller has none of that name)."""
        self.check_on()
        owner = principal()
        if not name:
            return [m.region for (who, _), m in self._regions.items() if who == owner]
        opened = self._regions.get((owner, name))
        if opened is None:
            raise RegionNotFound(f"no shared-memory region {echo(name)} is registered")
        return [opened.region]

    def table(self) -> list[SharedRegion]:
        """Every principal's regions: what the engine sends its frontends (``follow``)."""
        return [m.region for m in self._regions.values()]

    def follow(self, table: Iterable[SharedRegion]) -> None:
        """Makes this process's regions match ``table`` (the engine's): opens the new regions, closes the gone
        ones, keeps the rest. A region that cannot be opened here is logged and left out (its use then fails with
        NOT_FOUND, naming it)."""
        wanted = {(r.owner, r.name): r for r in table}
        for key in [k for k, m in self._regions.items() if wanted.get(k) != m.region]:
            _close(self._regions.pop(key))
        for key, region in wanted.items():
            if key not in self._regions:
                try:
                    self._regions[key] = _Opened(region, self._open(region))
                except Exception:
                    log.exception("could not open shared-memory region %r that the engine registered", region.name)

    def close(self) -> None:
        for opened in self._regions.values():
            _close(opened)
        self._regions.clear()

    # --- tensors ----------------------------------------------------------------------------------------
    def _find(self, name: str, offset: int, byte_size: int, what: str) -> _Opened:
        self.check_on()
        opened = self._regions.get((principal(), name))
        if opened is None:
            raise RegionNotFound(f"{what}: no shared-memory region {echo(name)} is registered; register it first")
        if offset < 0 or byte_size < 0 or offset + byte_size > opened.region.byte_size:
            raise InvalidInput(
                f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} pass the end of "
                f"region {echo(name)} ({opened.region.byte_size} bytes)"
            )
        return opened

    def read(self, name: str, offset: int, byte_size: int, what: str) -> bytes:
        """A copy of ``byte_size`` bytes of region ``name`` from ``offset`` (within the region)."""
        opened = self._find(name, offset, byte_size, what)
        start = opened.region.offset + offset
        data = os.pread(opened.fd, byte_size, start)
        if len(data) < byte_size:
            _shrunk(opened, start + byte_size, what)
        return data

    def check(self, name: str, offset: int, byte_size: int, what: str) -> SharedRegion:
        """Raises what ``read`` or ``write`` would for these bounds, before anything runs; the registration checked
        (for ``write``'s ``checked``)."""
        return self._find(name, offset, byte_size, what).region

    def write(
        self, name: str, offset: int, byte_size: int, data: bytes, what: str, checked: SharedRegion | None = None
    ) -> None:
        """Writes ``data`` into region ``name`` at ``offset``; it must fit in ``byte_size``. ``checked``: the
        registration the request was checked against (``check``): one unregistered or registered anew since (another
        object, offset or size under the name) is not written into."""
        opened = self._find(name, offset, byte_size, what)
        if checked is not None and opened.region != checked:
            raise FailedPrecondition(
                f"{what}: region {echo(name)} was unregistered and registered again while the request ran, so its "
                "output was not written (it would have gone into another registration); keep an output's region "
                "registered until its request is answered"
            )
        if len(data) > byte_size:
            raise InvalidInput(
                f"{what} is {len(data)} bytes, more than its shared_memory_byte_size {byte_size}: give the output "
                f"a larger region (nothing was written into {echo(name)})"
            )
        start = opened.region.offset + offset
        if os.fstat(opened.fd).st_size < start + len(data):  # (never grow the owner's object)
            _shrunk(opened, start + len(data), what)
        os.pwrite(opened.fd, data, start)


def _close(opened: _Opened) -> None:
    os.close(opened.fd)


def _shrunk(opened: _Opened, end: int, what: str) -> None:
    size = os.fstat(opened.fd).st_size
    raise FailedPrecondition(
        f"{what}: shared-memory object {echo(opened.region.key)} is now {size} bytes, shorter than the {end} that "
        f"region {echo(opened.region.name)} needs here: its owner shrank it; unregister the region and register it "
        "again once the object has its size"
    )
