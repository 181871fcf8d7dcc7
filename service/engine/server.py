"""The engine side: serves one ``CoreDataPlane`` (models, sessions, batchers) to every frontend over ZeroMQ.

Each call runs as its own task on the engine's event loop, so the batchers see the calls of all frontends at
once and merge their steps into one ONNX Runtime run. The model a call served (``note_model``) travels back
with its answer for the frontend's metrics labels. A CANCEL (the gRPC client went away) cancels the task, as
grpc would cancel the handler in one process: sessions stay consistent because tasks commit only at
consistent points.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import zmq
import zmq.asyncio

from service.core.context import call_scope
from service.core.dataplane import CoreDataPlane
from service.engine import wire
from service.engine.codec import error_payload, pack, unpack
from service.errors import SeqServeError

log = logging.getLogger(__name__)


class EngineServer:
    def __init__(self, dataplane: CoreDataPlane, addresses: wire.EngineAddresses) -> None:
        self.dataplane = dataplane
        self.addresses = addresses
        self._ctx = zmq.asyncio.Context()
        self._calls = self._ctx.socket(zmq.ROUTER)
        self._control = self._ctx.socket(zmq.ROUTER)
        self._events = self._ctx.socket(zmq.PUB)
        for sock in (self._calls, self._control, self._events):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # never drop an answer
            sock.setsockopt(zmq.RCVHWM, 0)
        self._tasks: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Binds the sockets (frontends may connect before the models are loaded) and starts serving."""
        self._calls.bind(self.addresses.calls)
        self._control.bind(self.addresses.control)
        self._events.bind(self.addresses.events)
        self._loops = [
            asyncio.create_task(self._serve_calls(), name="engine-calls"),
            asyncio.create_task(self._serve_control(), name="engine-control"),
        ]
        self.dataplane.registry.subscribe(on_load=self._changed, on_unload=self._changed)

    async def _changed(self, entry: object, replaced: bool) -> None:
        await self._events.send(wire.MODELS_CHANGED)

    async def stop(self) -> None:
        for task in [*self._loops, *self._tasks.values()]:
            task.cancel()
        for task in [*self._loops, *self._tasks.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._ctx.destroy(linger=0)

    # --- asynchronous calls -----------------------------------------------------------------------------
    async def _serve_calls(self) -> None:
        while True:
            ident, frame = await self._calls.recv_multipart(copy=True)
            try:
                kind, call_id, method, args, kwargs = unpack(frame)
            except Exception:
                log.exception("engine: unreadable message from a frontend")
                continue
            key = (ident, call_id)
            if kind == wire.CANCEL:
                task = self._tasks.pop(key, None)
                if task is not None:
                    task.cancel()
                continue
            if kind == wire.CALL and method in wire.ASYNC_METHODS:
                run = self._call(ident, call_id, method, args, kwargs)
            elif kind == wire.STREAM and method in wire.STREAM_METHODS:
                run = self._stream(ident, call_id, method, args, kwargs)
            else:
                await self._send(ident, [call_id, wire.ERROR, ["", f"engine: no such call {method!r}"], None])
                continue
            self._tasks[key] = asyncio.create_task(run)

    async def _send(self, ident: bytes, message: list[Any]) -> None:
        await self._calls.send_multipart([ident, pack(message)])

    async def _call(self, ident: bytes, call_id: int, method: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        noted = call_scope()
        reply: list[Any]
        try:
            result = await getattr(self.dataplane, method)(*args, **kwargs)
            reply = [call_id, wire.OK, result, noted[0] if noted else None]
        except asyncio.CancelledError:
            return  # the frontend gave up on this call: nobody is waiting for an answer
        except Exception as exc:
            if not isinstance(exc, SeqServeError):
                log.exception("engine: %s failed", method)
            reply = [call_id, wire.ERROR, error_payload(exc), noted[0] if noted else None]
        finally:
            self._tasks.pop((ident, call_id), None)
        await self._send(ident, reply)

    async def _stream(self, ident: bytes, call_id: int, method: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        noted = call_scope()
        reply: list[Any]
        gen = getattr(self.dataplane, method)(*args, **kwargs)
        try:
            async with contextlib.aclosing(gen):
                async for item in gen:
                    await self._send(ident, [call_id, wire.ITEM, item, noted[0] if noted else None])
            reply = [call_id, wire.END, None, noted[0] if noted else None]
        except asyncio.CancelledError:
            return
        except Exception as exc:
            if not isinstance(exc, SeqServeError):
                log.exception("engine: %s failed", method)
            reply = [call_id, wire.ERROR, error_payload(exc), noted[0] if noted else None]
        finally:
            self._tasks.pop((ident, call_id), None)
        await self._send(ident, reply)

    # --- synchronous control calls (model table, statistics) --------------------------------------------
    async def _serve_control(self) -> None:
        while True:
            ident, empty, frame = await self._control.recv_multipart()
            reply: list[Any]
            try:
                method, args, kwargs = unpack(frame)
                if method not in wire.SYNC_METHODS:
                    raise ValueError(f"no such control call {method!r}")
                reply = [wire.OK, getattr(self.dataplane, method)(*args, **kwargs)]
            except Exception as exc:
                if not isinstance(exc, SeqServeError):
                    log.exception("engine: control call failed")
                reply = [wire.ERROR, error_payload(exc)]
            await self._control.send_multipart([ident, empty, pack(reply)])
