"""The frontend <-> engine transport: msgpack frames over one Unix domain socket per frontend.

A frame is a 4-byte little-endian length and a msgpack list of messages: everything one side produced during
one event-loop iteration travels in one write (a batch's answers leave together).

    frontend -> engine:  [kind, call id, method, args, kwargs, context]  kind: CALL|STREAM|CANCEL|CONTROL|HELLO|ACK
    engine -> frontend:  [call id, status, payload, model noted, admitted]  status: OK|ITEM|END|ERROR|EVENT

``context`` carries what the edge learned about the call into the engine's task: the principal (sessions are
owned, sequences namespaced per principal), whether the call was already admitted (a stream's later steps are
never refused), the request id and method (log lines), and the priority level (the engine's batcher queues by it;
None = the default level). ``admitted`` comes back, so a stream that was admitted
on its first request stays admitted on the frontend.

CONTROL calls (model table, metadata, health, statistics) travel on the same connection as a CALL but are never
refused for a full queue: a frontend's health and metadata answers must not depend on its inference load. Like every
call they are awaited, never blocking the frontend's event loop, and fail UNAVAILABLE after a timeout when the
engine does not answer. A frontend's connection starts with HELLO (args: its process id), and it sends BEAT
(nothing else, no answer) every ``BEAT_SECONDS`` from its event loop: the first engine tells a hung frontend by
its silence (``procs._hung``). EVENT (call id 0, payload
["models", event id]) tells every frontend that a model was loaded, reloaded or unloaded; each answers ACK (call
id = event id) once its health follows, and the load/unload call returns only then (at most 5 s), so that what
one frontend changed, every frontend reports. ["logs", event id, settings] does the same for a change of the log
settings (LogSettings); the engine also sends it, with event id 0 (no ACK), to each frontend that says HELLO,
so that a frontend that started after a change writes what the others write. ["regions", event id, table] does
the same for the system shared-memory regions (the engine's whole table, a list of ``SharedRegion``): each frontend
opens what the table holds and closes the rest, so that a region registered through one frontend is usable, when
the call answers, through every other.

Why not ZeroMQ: measured on the 2-core box, a ping-pong between two asyncio processes costs 113-180 µs p50 and
67-73 µs of client CPU per round trip with pyzmq's asyncio sockets (every message passes through libzmq's I/O
thread on both sides), and 54 µs p50, 29 µs of CPU with a plain asyncio Unix socket.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

CALL, STREAM, CANCEL, CONTROL, HELLO, ACK, BEAT = 0, 1, 2, 3, 4, 5, 6
BEAT_SECONDS = 1.0  # a frontend's heartbeat to each engine: its event loop runs (``procs._hung``)
OK, ITEM, END, ERROR, EVENT = 0, 1, 2, 3, 4
MODELS_CHANGED = "models"
LOGS_CHANGED = "logs"
REGIONS_CHANGED = "regions"
EVENT_ACK_SECONDS = 5.0
_LEN = struct.Struct("<I")
MAX_FRAME = 1 << 30

# The data plane methods a frontend may call, by how they are called.
ASYNC_METHODS = frozenset(
    {
        "export_session",
        "import_session",
        "load_model",
        "unload_model",
        "infer",
        "classify",
        "suggest",
        "char_step",
        "forecast",
        "observe",
        "create_session",
        "get_session",
        "fork_session",
        "delete_session",
    }
)
STREAM_METHODS = frozenset({"complete"})
CONTROL_METHODS = frozenset(  # model table, health, statistics, settings, shared memory: never refused for a full queue
    {
        "ready",
        "capabilities",
        "models",
        "unloaded",
        "model_info",
        "model_metadata",
        "statistics",
        "store_up",
        "log_settings",
        "trace_settings",
        "register_region",
        "unregister_region",
    }
)

CALLABLE = {CALL: ASYNC_METHODS, CONTROL: CONTROL_METHODS}  # answered as one task each


def frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


class Framer:
    """Splits a byte stream into frames (``feed`` returns the complete ones)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if n > MAX_FRAME:
                raise ValueError(f"frame of {n} bytes is larger than {MAX_FRAME}")
            if len(buf) - pos - 4 < n:
                break
            yield bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
        del buf[:pos]
