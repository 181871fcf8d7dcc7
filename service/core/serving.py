"""A model's own serving settings: ``<models>/<name>/serving.json``, optional, for every version of that model (as
Triton's per-model ``config.pbtxt`` sets a model's dynamic batching and instance count).

It is a JSON object of some of the server's settings, by their names (``SEQSERVE_<NAME>`` in lower case without the
prefix), with the same limits: those it names hold for this model instead of the server's, the rest stay the
server's. For example ``{"max_batch_delay_ms": 5, "model_instances": 2}``. What a model may set (``PER_MODEL``) is
what is per model anyway: its batcher's (size, delay, queue, instances, inline runs, padding groups), its ONNX
Runtime session's threads, its warm-up, and which of its versions are served (``version_policy``, also as Triton's
JSON object). A file that is not valid makes every version of the model UNAVAILABLE
with the reason (as a bad manifest does); a change reloads the model's versions (``--watch-models``,
``RepositoryModelLoad``), keeping the old ones serving when the new settings fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

from service.settings import Settings

SERVING_FILE = "serving.json"
PER_MODEL = (
    "max_batch_size",
    "max_batch_delay_ms",
    "max_queue_size",
    "model_instances",
    "inline_batch_tokens",
    "inline_batch_ms",
    "alone_inline_ms",
    "pad_split_tokens",
    "intra_op_threads",
    "inter_op_threads",
    "warmup",
    "version_policy",
)
# The same fields as Settings has (types, limits, defaults, validators: version_policy's reads Triton's JSON too),
# and nothing else.
_Serving = create_model(  # type: ignore[call-overload]
    "Serving",
    __config__=ConfigDict(extra="forbid", strict=True),
    **{name: (Settings.model_fields[name].annotation, Settings.model_fields[name]) for name in PER_MODEL},
)


def checked(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` as the per-model settings they name (ValueError saying what to fix, ``where`` first)."""
    unknown = sorted(set(values) - set(PER_MODEL))
    if unknown:
        allowed = ", ".join(PER_MODEL)
        raise ValueError(f"{where}: {', '.join(unknown)} cannot be set per model; a model may set {allowed}")
    try:
        own: dict[str, Any] = _Serving.model_validate(values).model_dump(exclude_unset=True)
    except ValidationError as exc:
        problems = "; ".join(_problem(e) for e in exc.errors())
        raise ValueError(f"{where}: {problems}") from None
    return own


def _problem(error: Any) -> str:
    """One validation error as what to fix. A field's own validator (``version_policy``'s) already names the setting
    and what it got; pydantic's checks of types and limits get both added."""
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg'].lower()}, got {json.dumps(error['input'])}"


def model_settings(
    settings: Settings, folder: Path, loaded: dict[str, Any] | None = None
) -> tuple[Settings, dict[str, Any]]:
    """The settings model ``folder`` is served with, and what they change from the server's: its ``serving.json``
    (none without one) with ``loaded`` (a RepositoryModelLoad's config, checked) over it; ValueError saying what to
    fix for a file that is not valid."""
    own = _file(folder / SERVING_FILE) | (loaded or {})
    return (settings.model_copy(update=own) if own else settings), own


def _file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f'{path} must be a JSON object of settings, e.g. {{"max_batch_delay_ms": 5}}')
    return checked(raw, str(path))
