"""Core (transport-free) model descriptions and statistics -> v2 protobuf messages."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.generate import json_kind
from service.core.types import Duration, ModelInfo, ModelMetadata, ModelStats, SharedRegion
from service.errors import InvalidInput, echo
from service.settings import Settings

_CONFIG_TYPES = {
    "BOOL": pb.TYPE_BOOL,
    "INT32": pb.TYPE_INT32,
    "INT64": pb.TYPE_INT64,
    "FP32": pb.TYPE_FP32,
    "FP64": pb.TYPE_FP64,
    "BYTES": pb.TYPE_STRING,
}


def metadata_to_pb(m: ModelMetadata) -> pb.ModelMetadataResponse:
    T = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=m.name,
        versions=[str(v) for v in m.versions],
        platform=m.platform,
        inputs=[T(name=d.name, datatype=d.datatype, shape=d.shape) for d in m.contract.inputs],
        outputs=[T(name=d.name, datatype=d.datatype, shape=d.shape) for d in m.contract.outputs],
    )


KINDS = {"cpu": pb.ModelInstanceGroup.KIND_CPU, "gpu": pb.ModelInstanceGroup.KIND_GPU}


def config_to_pb(m: ModelMetadata, settings: Settings) -> pb.ModelConfig:
    """Triton's model configuration of ``m`` as served here (batching delay and instances are the model's own, its
    serving.json's or the server's; sequence idle time and priority levels the server's)."""
    c = m.contract
    config = pb.ModelConfig(
        name=m.name,
        platform=m.platform,
        backend="onnxruntime",
        max_batch_size=0,  # dims below are per request; the server batches requests internally
        input=[
            pb.ModelInput(name=d.name, data_type=_CONFIG_TYPES[d.datatype], dims=d.shape, optional=d.optional)
            for d in c.inputs
        ],
        output=[pb.ModelOutput(name=d.name, data_type=_CONFIG_TYPES[d.datatype], dims=d.shape) for d in c.outputs],
        parameters={k: pb.ModelParameter(string_value=v) for k, v in m.parameters.items()},
        # One ONNX Runtime session per version, on the device its provider runs on, taking MODEL_INSTANCES batches
        # at once (Triton always fills this in).
        instance_group=[pb.ModelInstanceGroup(name=m.name, kind=KINDS[m.device], count=m.instances)],
        version_policy=policy_to_pb(m.version_policy),
    )
    if m.response_cache:
        config.response_cache.enable = True
    if c.sequences:
        idle_us = int(settings.sequence_idle_seconds * 1e6)
        config.sequence_batching.CopyFrom(pb.ModelSequenceBatching(max_sequence_idle_microseconds=idle_us))
    else:  # the server batches requests itself: as Triton's dynamic batcher, up to MAX_BATCH_DELAY_MS
        batching = pb.ModelDynamicBatching(max_queue_delay_microseconds=int(m.batch_delay_ms * 1000))
        if settings.priority_levels:  # (sequence steps are ordered by level too; Triton's config has no field)
            batching.priority_levels = settings.priority_levels
            batching.default_priority_level = settings.default_level
        config.dynamic_batching.CopyFrom(batching)
    return config


def policy_to_pb(policy: str) -> pb.ModelVersionPolicy:
    """A canonical ``version_policy`` (``all``, ``latest:N``, ``specific:V,...``) as Triton's message."""
    kind, _, arg = policy.partition(":")
    if kind == "latest":
        return pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=int(arg)))
    if kind == "specific":
        return pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=[int(v) for v in arg.split(",")]))
    return pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())


# What a load's config may change (RepositoryModelLoad's "config" parameter, Triton's model configuration in JSON):
# the rest of a configuration must be what ModelConfig answers, or left out.
LOADABLE = "dynamic_batching.max_queue_delay_microseconds, instance_group counts and version_policy"


def serving_from_config(text: str, current: pb.ModelConfig | None, name: str) -> dict[str, object]:
    """The per-model settings a load's ``config`` asks for (Triton's model configuration as JSON, e.g. ModelConfig's
    answer with its batching delay or instance count changed), checked against model ``name``'s configuration now
    (``current``; None when it is not loaded: then only those two and its name may be given)."""
    from google.protobuf import json_format

    given = pb.ModelConfig()
    try:
        written = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"load parameter config is not a model configuration in JSON ({exc})") from None
    except RecursionError:
        raise InvalidInput("load parameter config is not JSON we read: its arrays or objects nest too deeply") from None
    if not isinstance(written, dict):  # (the parser below would read a list as no fields, a string as names)
        raise InvalidInput(
            f"load parameter config is {json_kind(written)}, not a model configuration: send a JSON object"
        )
    try:
        json_format.Parse(text, given)
    except json_format.ParseError as exc:
        unknown = re.search(r'has no field named "([^"]+)" at "([^"]+)"', str(exc))
        if unknown is not None:  # (a field of Triton's configuration this server has not: it is a configuration)
            field, where = unknown[1], unknown[2].removeprefix("ModelConfig").lstrip(".")
            raise InvalidInput(
                f"load parameter config has {(where + '.' if where else '') + field}, a field of Triton's model "
                f"configuration this server does not have; leave it out (a load may change {LOADABLE}; the rest "
                "must be what ModelConfig answers, or left out)"
            ) from None
        raise InvalidInput(f"load parameter config is not a model configuration in JSON ({exc})") from None
    out: dict[str, object] = {}
    if given.HasField("dynamic_batching") and current is not None and current.HasField("sequence_batching"):
        raise InvalidInput(
            f"load parameter config sets dynamic_batching, but model {name} is configured with sequence_batching "
            "(as its ModelConfig answers), which a load cannot change; leave dynamic_batching out (a load may "
            "change its instance_group counts and version_policy) and set its batching delay as max_batch_delay_ms "
            "in the model's serving.json or the server's MAX_BATCH_DELAY_MS"
        )
    if given.HasField("dynamic_batching"):
        out["max_batch_delay_ms"] = given.dynamic_batching.max_queue_delay_microseconds / 1000
        given.dynamic_batching.ClearField("max_queue_delay_microseconds")
    now = "what ModelConfig answers" if current is not None else "nothing else (the model is not loaded)"
    if current is None:  # nothing to compare with: its name, and a dynamic batching with nothing more in it
        current = pb.ModelConfig(name=name, dynamic_batching=pb.ModelDynamicBatching())
    other: list[str] = []
    if given.instance_group:
        out["model_instances"] = sum(g.count or 1 for g in given.instance_group)  # (Triton's count 0 means 1)
        group = current.instance_group[0] if current.instance_group else pb.ModelInstanceGroup()
        for g in given.instance_group:  # only the count may change (a KIND_GPU group must not load on the CPU)
            g.ClearField("count")
            other += [f for f in _differs(g, group, "instance_group.") if f not in other]
        given.ClearField("instance_group")
    if given.HasField("version_policy"):  # as written (a parsed message would read a count of 0 as unset)
        out["version_policy"] = written.get("version_policy", written.get("versionPolicy"))  # checked with the rest
        given.ClearField("version_policy")
    other += _differs(given, current)
    if other:
        raise InvalidInput(
            f"load parameter config changes {', '.join(other)}, which a load cannot change: it may change {LOADABLE}; "
            f"give {now} for the rest, or leave it out"
        )
    return out


def _differs(given: Any, current: Any, prefix: str = "") -> list[str]:
    """The fields set in ``given`` whose values ``current`` does not have (messages field by field)."""
    out = []
    for f, value in given.ListFields():
        mine = getattr(current, f.name)
        if f.message_type is not None and not f.is_repeated:
            if not current.HasField(f.name):
                out.append(prefix + f.name)
            else:
                out += _differs(value, mine, f"{prefix}{f.name}.")
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            if dict(value) != dict(mine):
                out.append(prefix + f.name)
        elif value != mine:
            out.append(prefix + f.name)
    return out


def _d(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def stats_to_pb(s: ModelStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=s.name,
        version=str(s.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_d(s.success),
            fail=_d(s.fail),
            queue=_d(s.queue),
            compute_input=_d(s.compute_input),
            compute_infer=_d(s.compute_infer),
            compute_output=_d(s.compute_output),
            cache_hit=_d(s.cache_hit),
            cache_miss=_d(s.cache_miss),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b.batch_size,
                compute_input=_d(b.compute_input),
                compute_infer=_d(b.compute_infer),
                compute_output=_d(b.compute_output),
            )
            for b in s.batches
        ],
    )


def regions_to_pb(regions: list[SharedRegion]) -> pb.SystemSharedMemoryStatusResponse:
    out = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        out.regions[r.name].CopyFrom(
            pb.SystemSharedMemoryStatusResponse.RegionStatus(
                name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
            )
        )
    return out


def index_to_pb(models: list[ModelInfo], unloaded: list[str], ready_only: bool) -> pb.RepositoryIndexResponse:
    M = pb.RepositoryIndexResponse.ModelIndex
    out = [
        M(name=m.name, version=str(m.version), state="READY" if m.ready else "UNAVAILABLE", reason=m.error or "")
        for m in models
        if m.ready or not ready_only
    ]
    if not ready_only:
        out += [M(name=name, version="", state="UNAVAILABLE", reason="unloaded") for name in unloaded]
    return pb.RepositoryIndexResponse(models=out)


def log_settings_from_pb(request: pb.LogSettingsRequest) -> dict[str, Any]:
    """The changes a LogSettings request asks for, each as the Python value its oneof holds (checked later)."""
    out: dict[str, Any] = {}
    for key, value in request.settings.items():
        choice = value.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(
                f"log setting {echo(key)} has no value: set its bool_param, uint32_param or string_param"
            )
        out[key] = getattr(value, choice)
    return out


def log_settings_to_pb(settings: dict[str, bool | int | str]) -> pb.LogSettingsResponse:
    response = pb.LogSettingsResponse()
    fill_log_settings(response.settings, settings)
    return response


def trace_settings_from_pb(request: pb.TraceSettingRequest) -> dict[str, list[str] | None]:
    """The changes a TraceSetting request asks for: each setting's values (none: clear it)."""
    return {key: list(value.value) or None for key, value in request.settings.items()}


def trace_settings_to_pb(settings: Mapping[str, list[str]]) -> pb.TraceSettingResponse:
    response = pb.TraceSettingResponse()
    for key, values in settings.items():
        response.settings[key].value.extend(values)
    return response


def fill_log_settings(slots: Any, settings: Mapping[str, bool | int | str]) -> None:
    """Each value into its key's ``SettingValue`` oneof (a request's or a response's: the same fields)."""
    for key, value in settings.items():
        slot = slots[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.uint32_param = value
        else:
            slot.string_param = value
