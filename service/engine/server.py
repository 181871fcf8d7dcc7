"""The engine side: serves one ``CoreDataPlane`` (models, sessions, batchers) to every frontend.

Each call runs as its own task on the engine's event loop, so the batchers see the calls of all frontends at
once and merge their steps into one ONNX Runtime run. The model a call served (``note_model``) travels back
with its answer for the frontend's metrics labels. A CANCEL (the gRPC client went away) cancels the task, as
grpc would cancel the handler in one process: sessions stay consistent because tasks commit only at
consistent points.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from typing import Any, cast

from service import logs
from service.core.context import admitted, call_scope, mark_admitted, set_principal, set_priority
from service.core.dataplane import CoreDataPlane
from service.core.types import SharedRegion
from service.engine import wire
from service.engine.codec import error_payload, pack_replies, unpack
from service.errors import SeqServeError
from service.logs import CALL, LogSettings

log = logging.getLogger(__name__)


class _Connection(asyncio.Protocol):
    """One frontend connection: frames in, calls dispatched; answers of one loop iteration out in one write."""

    def __init__(self, engine: EngineServer) -> None:
        self.engine = engine
        self.framer = wire.Framer()
        self.transport: asyncio.Transport | None = None
        self.outbox: list[list[Any]] = []
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.link = False  # a frontend's main connection (said HELLO): gets events
        self.pid = 0  # the frontend's process id, from its HELLO
        self.heard = time.monotonic()  # when it last sent anything (its watchdog asks every second)
        self.acks: dict[int, asyncio.Future[None]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.engine.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.connections.discard(self)
        self.transport = None
        for fut in self.acks.values():  # a frontend that is gone acknowledges nothing: stop waiting for it
            if not fut.done():
                fut.set_result(None)
        for task in self.tasks.values():  # the frontend is gone: nobody waits for these answers
            task.cancel()

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        try:
            for payload in self.framer.feed(data):
                for message in unpack(payload):
                    self.dispatch(*message)
        except Exception:
            log.exception("engine: unreadable message from a frontend; closing its connection")
            if self.transport is not None:
                self.transport.close()

    def dispatch(self, kind: int, call_id: int, method: str, args: Any, kwargs: Any, context: Any = None) -> None:
        if kind == wire.BEAT:
            return  # (heard: data_received noted the time)
        if kind == wire.CANCEL:
            task = self.tasks.pop(call_id, None)
            if task is not None:
                task.cancel()
            return
        if kind == wire.HELLO:
            self.link = True
            self.pid = int(args[0]) if args else 0
            self.send([0, wire.EVENT, [wire.LOGS_CHANGED, 0, logs.current()], None, False])  # (no ACK for 0)
            if self.engine.dataplane.regions.enabled:  # the regions registered before it started
                table = self.engine.dataplane.regions.table()
                self.send([0, wire.EVENT, [wire.REGIONS_CHANGED, 0, table], None, False])
            return
        if kind == wire.ACK:
            fut = self.acks.pop(call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if method in wire.CALLABLE.get(kind, ()):
            run = self.engine.call(self, call_id, method, args, kwargs, context)
        elif kind == wire.STREAM and method in wire.STREAM_METHODS:
            run = self.engine.stream(self, call_id, method, args, kwargs, context)
        else:
            self.send([call_id, wire.ERROR, ["", f"engine: no such call {method!r}"], None, False])
            return
        self.tasks[call_id] = asyncio.create_task(run)

    def send(self, message: list[Any]) -> None:
        if not self.outbox:
            asyncio.get_running_loop().call_soon(self.flush)
        self.outbox.append(message)

    def flush(self) -> None:
        messages, self.outbox = self.outbox, []
        if self.transport is not None and messages:
            self.transport.write(wire.frame(pack_replies(messages, self.abandon)))

    def abandon(self, call_id: int) -> None:
        """The call's caller got an error instead of an answer that could not be sent: stop its work (a stream
        would otherwise go on generating for nobody)."""
        task = self.tasks.pop(call_id, None)
        if task is not None:
            task.cancel()


class EngineServer:
    def __init__(self, dataplane: CoreDataPlane, path: str) -> None:
        self.dataplane = dataplane
        self.path = path
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._events = itertools.count(1)

    async def start(self) -> None:
        """Listens (frontends may connect before the models are loaded) and follows the model table."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), self.path)
        os.chmod(self.path, 0o600)  # only this user's processes may call the engine
        self.dataplane.registry.subscribe(on_load=self._changed, on_unload=self._changed)
        self.dataplane.on_store_change(self._store_changed)
        self.dataplane.on_log_change(self._logs_changed)
        self.dataplane.on_regions_change(self._regions_changed)

    def heard(self) -> dict[int, float]:
        """When each connected frontend (by process id) last sent anything (``time.monotonic``)."""
        return {c.pid: c.heard for c in self.connections if c.link and c.pid}

    async def _store_changed(self, ok: bool) -> None:
        await self._changed(None, False)  # frontends re-read their health (the Sessions service follows the store)

    async def _changed(self, entry: object, replaced: bool) -> None:
        """Tells every frontend; returns when each has acknowledged (its health follows), or after a timeout."""
        await self._tell("a model change", wire.MODELS_CHANGED)

    async def _logs_changed(self, settings: LogSettings) -> None:
        await self._tell("a change of the log settings", wire.LOGS_CHANGED, settings)

    async def _regions_changed(self, table: list[SharedRegion]) -> None:
        await self._tell("a change of the shared-memory regions", wire.REGIONS_CHANGED, table)

    async def _tell(self, what: str, kind: str, *payload: Any) -> None:
        """Sends an EVENT to every frontend; returns when each has acknowledged it, or after a timeout."""
        event = next(self._events)
        waiting = []
        for conn in [c for c in self.connections if c.link]:
            fut = conn.acks[event] = asyncio.get_running_loop().create_future()
            waiting.append(fut)
            conn.send([0, wire.EVENT, [kind, event, *payload], None, False])
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=wire.EVENT_ACK_SECONDS)
            if late:
                log.warning("%d frontends did not acknowledge %s within %.0fs", len(late), what,
                            wire.EVENT_ACK_SECONDS)  # fmt: skip

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
            for task in conn.tasks.values():
                task.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # --- calls ------------------------------------------------------------------------------------------
    @staticmethod
    def _enter(context: Any) -> list[str]:
        """The call's context in this task (see wire.py), and the holder of the model it will note."""
        if context:
            who, was_admitted, call, level = context
            set_principal(who)
            if was_admitted:
                mark_admitted()
            CALL.set((call[0], call[1], call[2]))
            if level is not None:
                set_priority(level)
        return call_scope()

    async def call(
        self, conn: _Connection, call_id: int, method: str, args: Any, kwargs: dict[str, Any], context: Any
    ) -> None:
        noted = self._enter(context)
        reply: list[Any]
        try:
            result = await getattr(self.dataplane, method)(*args, **kwargs)
            reply = [call_id, wire.OK, result, noted[0] if noted else None, admitted()]
        except asyncio.CancelledError:
            return  # the frontend gave up on this call: nobody is waiting for an answer
        except Exception as exc:
            if not isinstance(exc, SeqServeError):
                log.exception("engine: %s failed", method)
            reply = [call_id, wire.ERROR, error_payload(exc), noted[0] if noted else None, admitted()]
        finally:
            conn.tasks.pop(call_id, None)
        conn.send(reply)

    async def stream(
        self, conn: _Connection, call_id: int, method: str, args: Any, kwargs: dict[str, Any], context: Any
    ) -> None:
        noted = self._enter(context)
        reply: list[Any]
        gen = getattr(self.dataplane, method)(*args, **kwargs)
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    conn.send([call_id, wire.ITEM, item, noted[0] if noted else None, admitted()])
            reply = [call_id, wire.END, None, noted[0] if noted else None, admitted()]
        except asyncio.CancelledError:
            return
        except Exception as exc:
            if not isinstance(exc, SeqServeError):
                log.exception("engine: %s failed", method)
            reply = [call_id, wire.ERROR, error_payload(exc), noted[0] if noted else None, admitted()]
        finally:
            conn.tasks.pop(call_id, None)
        conn.send(reply)
