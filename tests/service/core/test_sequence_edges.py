"""KServe sequences at their edges: an evicted sequence says so, a refused step counts as a failure, a sequence
naming its version still checks its weights, an import is counted, sequence parameters are bounded, and
statistics keep every field on the wire. (Each was unchecked until a mutation review.)"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.kserve.convert import index_to_pb, stats_to_pb
from service.api.kserve.params import parse_sequence
from service.core.sequences import top_classes
from service.core.types import Duration, ModelRef, SequenceRef, Tensor
from service.errors import FailedPrecondition, InvalidInput, SessionEvicted, SessionNotFound
from tests.service.core.conftest import recorded
from tests.service.core.test_sessions import text
from tests.service.security.conftest import infer_request

LM = ModelRef("charlm")


# --- sequences.py / params.py / convert.py ----------------------------------------------------------------------
async def test_an_evicted_sequence_says_so(make_dp) -> None:  # type: ignore[no-untyped-def]
    """A sequence evicted for room answers SESSION_EVICTED ("evicted ... send sequence_start=true")."""
    dp = await make_dp(max_sessions=1, session_full_policy="evict_lru")
    await dp.infer(LM, text("ab"), sequence=SequenceRef("a", start=True))
    await dp.infer(LM, text("ab"), sequence=SequenceRef("b", start=True))  # evicts a
    with pytest.raises(SessionEvicted, match="sequence 'a' of model charlm was evicted"):
        await dp.infer(LM, text("c"), sequence=SequenceRef("a"))


async def test_a_refused_step_of_a_running_sequence_counts_as_a_failure(make_dp) -> None:  # type: ignore[no-untyped-def]
    """A continued sequence step refused by the contract counts as a failure in the statistics, not a success."""
    dp = await make_dp()
    await dp.infer(LM, text("ab"), sequence=SequenceRef("s", start=True))
    before = (await dp.statistics(LM))[0]
    with pytest.raises(InvalidInput):
        await dp.infer(LM, [Tensor("NOPE", "BYTES", (1,), items=[b"x"])], sequence=SequenceRef("s"))
    after = (await dp.statistics(LM))[0]
    assert (after.success.count, after.fail.count) == (before.success.count, before.fail.count + 1)


async def test_a_step_of_an_unknown_sequence_counts_as_a_failure_with_or_without_a_version(make_dp) -> None:  # type: ignore[no-untyped-def]
    """Triton counts every failed request in ``fail``: an unknown (or expired) sequence's step was counted only when
    it named its version (without one the version was unknown, and nothing was counted)."""
    dp = await make_dp()
    first = await dp.infer(LM, text("ab"), sequence=SequenceRef("s", start=True))
    for model in (LM, ModelRef("charlm", first.version)):
        before = (await dp.statistics(LM))[0]
        with pytest.raises(SessionNotFound, match="sequence 'never-started' of model charlm is unknown"):
            await dp.infer(model, text("c"), sequence=SequenceRef("never-started"))
        after = (await dp.statistics(LM))[0]
        assert (after.success.count, after.fail.count) == (before.success.count, before.fail.count + 1)


async def test_a_sequence_naming_its_version_still_checks_its_weights(make_dp) -> None:  # type: ignore[no-untyped-def]
    """The explicit-version path (_infer_sequence) refuses a session pinned to replaced weights, as the
    default path does."""
    dp = await make_dp()
    first = await dp.infer(LM, text("ab"), sequence=SequenceRef("s", start=True))
    sid = "kserve:charlm:s"
    async with dp.sessions.use(sid) as s:
        s.model_sha256 = "00" * 32  # as if version's weights were replaced since the sequence started
    with pytest.raises(FailedPrecondition, match="with weights"):
        await dp.infer(ModelRef("charlm", first.version), text("c"), sequence=SequenceRef("s"))


async def test_an_imported_sequence_is_counted_as_imported(make_dp) -> None:  # type: ignore[no-untyped-def]
    """Seqserve_sessions_total{event="imported"} for a KServe import."""
    dp = await make_dp(session_signing_key="s" * 40)
    blob = (await dp.infer(LM, text("ab"), sequence=SequenceRef("s", start=True, export=True))).session_blob
    await dp.infer(LM, text("c"), sequence=SequenceRef("t", start=True, import_blob=blob))
    assert ("charlm", "imported") in recorded(dp).events


def test_sequence_parameter_edges() -> None:
    """A negative int64 id, a 201-char id and sequence_end without an id are refused; a
    200-char id is fine."""

    def params(**kw: Any) -> dict[str, pb.InferParameter]:
        return dict(infer_request("m", **kw).parameters)

    neg = pb.ModelInferRequest()
    neg.parameters["sequence_id"].int64_param = -5
    with pytest.raises(InvalidInput, match=">= 0"):
        parse_sequence(neg.parameters)
    ref = parse_sequence(params(sequence_id="x" * 200))
    assert ref is not None and ref.id == "x" * 200
    with pytest.raises(InvalidInput):
        parse_sequence(params(sequence_id="x" * 201))
    with pytest.raises(InvalidInput, match="need a non-zero"):
        parse_sequence(params(sequence_end=True))


def test_stats_to_pb_fields() -> None:
    from service.core import types as T

    def dur(n: int) -> Duration:
        return Duration(n, n * 1000)

    batch = T.BatchStats(batch_size=4, compute_input=dur(1), compute_infer=dur(2), compute_output=dur(3))
    s = T.ModelStats(name="m", version=1, last_inference_ms=5, inference_count=6, execution_count=7,
                     success=dur(8), fail=dur(9), queue=dur(10), compute_input=dur(11), compute_infer=dur(12),
                     compute_output=dur(13), batches=[batch])  # fmt: skip
    p = stats_to_pb(s)
    st = p.inference_stats
    parts = (st.success, st.fail, st.queue, st.compute_input, st.compute_infer, st.compute_output)
    assert [x.count for x in parts] == [8, 9, 10, 11, 12, 13]
    b = p.batch_stats[0]
    assert [b.compute_input.count, b.compute_infer.count, b.compute_output.count] == [1, 2, 3]
    assert [m.name for m in index_to_pb([], ["gone"], ready_only=True).models] == []
    assert [m.reason for m in index_to_pb([], ["gone"], ready_only=False).models] == ["unloaded"]


async def test_a_restarted_sequence_counts_the_replaced_session_as_deleted(make_dp) -> None:  # type: ignore[no-untyped-def]
    """sequence_start on a running id replaces its session: created 2, deleted 1, so the active count stays 1."""
    dp = await make_dp()
    await dp.infer(LM, text("ab"), sequence=SequenceRef("r", start=True))
    await dp.infer(LM, text("x"), sequence=SequenceRef("r", start=True))
    events = recorded(dp).events
    assert (events.count(("charlm", "created")), events.count(("charlm", "deleted"))) == (2, 1)


# --- the classification extension (sequences.top_classes) -------------------------------------------------------
@pytest.mark.parametrize(
    ("array", "count", "labels", "shape", "items"),
    [
        # one row of floats: highest first, ties by index, labels where the model names its classes
        (np.array([0.25, 0.5, 0.25], np.float32), 3, ("a", "b", "c"), (3,),
         ["0.500000:1:b", "0.250000:0:a", "0.250000:2:c"]),
        # rows of a 2-D output each ranked; fewer labels than classes: the rest without one
        (np.array([[0.1, 0.9], [0.7, 0.3]], np.float32), 1, ("neg",), (2, 1), ["0.900000:1", "0.700000:0:neg"]),
        # unsigned integers (their negation would wrap), and a count above the classes there are
        (np.array([3, 250, 7], np.uint8), 5, (), (3,), ["250:1", "7:2", "3:0"]),
        # 3-D: ranked per row of the first dimension over the rest, flattened
        (np.arange(8, dtype=np.int64).reshape(2, 2, 2), 2, (), (2, 2), ["3:3", "2:2", "7:3", "6:2"]),
        # no rows (a forecaster sequence before its window is full answers FORECAST [0, targets])
        (np.zeros((0, 7), np.float32), 3, (), (0, 3), []),
    ],
)  # fmt: skip
def test_top_classes(
    array: np.ndarray, count: int, labels: tuple[str, ...], shape: tuple[int, ...], items: list[str]
) -> None:
    got = top_classes(Tensor("OUT", "X", array.shape, array=array), count, labels)
    assert (got.name, got.datatype, got.shape) == ("OUT", "BYTES", shape)
    assert got.items == [s.encode() for s in items]
