"""Message shapes and addresses shared by the engine and its frontends (one msgpack frame per message).

frontend -> engine (DEALER -> ROUTER):   [kind, call id, method, args, kwargs]     kind: CALL | STREAM | CANCEL
engine -> frontend (ROUTER -> DEALER):   [call id, status, payload, model noted]   status: OK | ITEM | END | ERROR
control (REQ -> ROUTER, synchronous):    [method, args, kwargs] -> [status, payload]
events (PUB -> SUB):                     b"models" after every load, reload or unload
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CALL, STREAM, CANCEL = 0, 1, 2
OK, ITEM, END, ERROR = 0, 1, 2, 3
MODELS_CHANGED = b"models"

# The data plane methods a frontend may call, by how they are called.
ASYNC_METHODS = frozenset(
    {
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
SYNC_METHODS = frozenset({"ready", "capabilities", "models", "unloaded", "model_info", "model_metadata", "statistics"})


@dataclass(frozen=True)
class EngineAddresses:
    """ZeroMQ endpoints of one engine (ipc:// sockets in a private folder)."""

    calls: str
    control: str
    events: str

    @classmethod
    def in_folder(cls, folder: Path) -> EngineAddresses:
        return cls(f"ipc://{folder}/calls", f"ipc://{folder}/control", f"ipc://{folder}/events")
