"""Signed session export/import between two real servers (in-process, each its own store): the imported session
continues exactly where the exported one stood; a changed byte, another key or another model is refused with
the documented codes; KServe sequences export and import through request parameters."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.client import ApiError, Client
from service.core.sessions.export import unseal
from tests.conftest import ServerHandle
from tests.service.sessions.v2 import charlm_request, probs

KEY = "k" * 40
TEXT = "Now is the winter of our discontent"


def suggest(c: Client, sid: str, text: str) -> list[tuple[str, float]]:
    r = c.suggest_once(sid, text, n=3, max_chars=5)
    return [(s.text, round(s.logprob, 5)) for s in r.suggestions]


@pytest.fixture
def pair(start_server: Callable[..., ServerHandle]) -> tuple[Client, Client]:
    a = Client(start_server(session_signing_key=KEY).target)
    b = Client(start_server(session_signing_key=KEY).target)
    return a, b


def test_export_then_import_elsewhere_continues_identically(pair: tuple[Client, Client]) -> None:
    a, b = pair
    with a.session("charlm") as s:
        a.suggest_once(s.id, TEXT[:20])
        blob = a.export_session(s.id)
        moved = b.import_session(blob, ttl_seconds=30)
        assert moved.id != s.id and moved.steps == 20 and moved.ttl_seconds == 30 and moved.model == "charlm"
        assert suggest(b, moved.id, TEXT[20:]) == suggest(a, s.id, TEXT[20:])  # identical next outputs
        assert b.get_session(moved.id).steps == a.get_session(s.id).steps == len(TEXT)
        # The blob is no handle on the session it came from: it carries neither its id nor its owner.
        assert s.id.encode() not in blob
        inside = unseal(blob, KEY.encode()).session
        assert (inside.id, inside.owner, inside.revision) == ("", "", 0) and inside.steps == 20


def test_tampered_foreign_or_unkeyed_blobs_are_refused(
    pair: tuple[Client, Client], start_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    a, b = pair
    with a.session("charlm") as s:
        a.suggest_once(s.id, "abc")
        blob = a.export_session(s.id)
    for i in (0, 10, len(blob) // 2, len(blob) - 1):  # magic, header, state, signature
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(ApiError) as err:
            b.import_session(bytes(bad))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (i, err.value)
    other_key = Client(start_server(session_signing_key="o" * 40).target)
    with pytest.raises(ApiError, match="signature does not verify") as err:
        other_key.import_session(blob)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    no_key = Client(start_server().target)
    with pytest.raises(ApiError, match="SEQSERVE_SESSION_SIGNING_KEY") as err:
        no_key.import_session(blob)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_a_signed_blob_whose_context_does_not_fit_is_a_failed_precondition(pair: tuple[Client, Client]) -> None:
    """A blob signed with the shared key by another build (or anyone holding the key) may carry a context this
    model cannot continue: wrong shapes, NaN, unknown parts, negative steps. Import refuses it, naming the part,
    instead of creating a session whose every later call fails INTERNAL; the good blob still imports."""
    from service.core.sessions.export import seal

    a, b = pair
    key = KEY.encode()
    rows = np.random.default_rng(0).normal(size=(100, 7)).astype(np.float32)
    blobs = {}
    with a.session("charlm") as s:
        a.suggest_once(s.id, "To be")
        blobs["charlm"] = a.export_session(s.id)
    with a.session("forecaster") as s:
        a.observe(s.id, rows)
        blobs["forecaster"] = a.export_session(s.id)

    def edited(model: str, change: Callable[[Any], None]) -> bytes:
        x = unseal(blobs[model], key)
        change(x.session)
        return seal(x.session, key, x.exported_at)

    cases = {
        "logits has shape [1, ": edited("charlm", lambda s: s.context.update(logits=s.context["logits"][None])),
        "logits holds NaN": edited("charlm", lambda s: s.context["logits"].fill(np.nan)),
        "steps is -5": edited("charlm", lambda s: setattr(s, "steps", -5)),
        # 2^63 - 1 was imported, then its next step's count overflowed the API's int64: every later call INTERNAL
        "steps is 9223372036854775807 (0 to 9,007,199,254,740,991)": edited(
            "charlm", lambda s: setattr(s, "steps", 2**63 - 1)
        ),
        # a row far out was imported, then answered inf forecasts as OK (an Observe refuses such a value)
        "a row holds a value 1e+06 standard deviations or more": edited(
            "forecaster", lambda s: s.context["rows"].__setitem__((10, 3), -3e38)
        ),
        "'extra', which this model's sessions never keep": edited(
            "charlm", lambda s: s.context.update(extra=np.zeros(250_000, np.float32))
        ),
        "rows has shape [": edited("forecaster", lambda s: s.context.update(rows=s.context["rows"][:, :3])),
        "forecast_z has shape [2, 2]": edited(
            "forecaster", lambda s: s.context.update(forecast_z=np.zeros((2, 2), np.float32))
        ),
        "rows is not a float32 array": edited(
            "forecaster", lambda s: s.context.update(rows=s.context["rows"].astype(np.float64))
        ),
    }
    for problem, blob in cases.items():
        with pytest.raises(ApiError) as err:
            b.import_session(blob)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, (problem, err.value)
        assert "context does not fit model" in err.value.message and problem in err.value.message, err.value.message
    for blob in blobs.values():  # untouched blobs still import and continue
        b.import_session(blob)
    moved = b.import_session(blobs["forecaster"])
    assert b.observe(moved.id, rows[:4]).rows_seen == 104

    # The recurrent state itself: NaN or inf was imported, then answered NaN probabilities (OK) and failed INTERNAL.
    def filled(value: float) -> Callable[[Any], None]:
        def change(s: Any) -> None:
            for array in s.state.values():
                array.fill(value)

        return change

    for fill in (np.nan, np.inf):
        blob = edited("charlm", filled(fill))
        with pytest.raises(ApiError) as err:
            b.import_session(blob)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds NaN or infinite values: model charlm/" in err.value.message
    # A state of other arrays was refused saying only that it "does not fit": the message names what differs.
    first = sorted(unseal(blobs["charlm"], key).session.state)[0]
    cases = {
        "it holds 'extra', which the model's state has not": edited(
            "charlm", lambda s: s.state.update(extra=np.zeros(3, np.float32))
        ),
        f"it lacks {first}": edited("charlm", lambda s: s.state.pop(first)),
        f"state {first} is float64": edited("charlm", lambda s: s.state.update({first: s.state[first].astype("f8")})),
    }
    for problem, blob in cases.items():
        with pytest.raises(ApiError) as err:
            b.import_session(blob)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "state does not fit model charlm/" in err.value.message and problem in err.value.message, err.value
    # Metadata is the server's own: a signed blob carrying 100 KB of it imported it verbatim (and Get showed it).
    stuffed = edited("charlm", lambda s: s.metadata.update({"x" * 100: "y" * 100_000}))
    assert b.import_session(stuffed).metadata == {"task": "charlm"}


def test_a_blob_from_a_newer_release_says_import_it_on_an_updated_server(pair: tuple[Client, Client]) -> None:
    """A blob whose format, or whose state's must-understand flags, this release does not know: UNAVAILABLE
    (REPLICA_BEHIND), as a record in the shared store is answered mid rolling update; not a broken blob."""
    import hashlib
    import hmac
    import struct

    a, b = pair
    with a.session("charlm") as s:
        a.suggest_once(s.id, "abc")
        blob = a.export_session(s.id)
    body = bytearray(blob[:-32])
    head_len = struct.unpack_from("<I", body, 8)[0]

    def signed(at: int, value: int) -> bytes:
        patched = bytearray(body)
        struct.pack_into("<H", patched, at, value)
        return bytes(patched) + hmac.new(KEY.encode(), bytes(patched), hashlib.sha256).digest()

    for newer, what in ((signed(4, 2), "blob format 2"), (signed(12 + head_len + 6, 4), "flags 0x4")):
        with pytest.raises(ApiError) as err:
            b.import_session(newer)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.reason == "REPLICA_BEHIND", err.value
        assert what in err.value.message and "import it on an updated server" in err.value.message
    assert b.import_session(blob).steps == 3


def test_a_blob_of_other_weights_is_a_failed_precondition(
    tiny_models: Path, tmp_path: Path, start_server: Callable[..., ServerHandle]
) -> None:
    from tests.tiny_models import export_tiny

    other = tmp_path / "other"
    export_tiny("charlm", other, name="charlm", seed=7)  # same name and version, other weights
    a = Client(start_server(session_signing_key=KEY).target)
    b = Client(start_server(session_signing_key=KEY, models=other).target)
    with a.session("charlm") as s:
        blob = a.export_session(s.id)
    with pytest.raises(ApiError, match="which this server does not serve") as err:
        b.import_session(blob)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def _infer(stub: pb_grpc.GRPCInferenceServiceStub, text: str, seq: str, **params: bool | str) -> pb.ModelInferResponse:
    response: pb.ModelInferResponse = stub.ModelInfer(charlm_request(text, seq, **params), timeout=60)
    return response


def test_kserve_sequences_export_and_import_through_parameters(start_server: Callable[..., ServerHandle]) -> None:
    a, b = start_server(session_signing_key=KEY), start_server(session_signing_key=KEY)
    with grpc.insecure_channel(a.target) as ca, grpc.insecure_channel(b.target) as cb:
        sa, sb = pb_grpc.GRPCInferenceServiceStub(ca), pb_grpc.GRPCInferenceServiceStub(cb)
        _infer(sa, "To be, or ", "s1", sequence_start=True)
        parked = _infer(sa, "not to", "s1", sequence_end=True, seqserve_export=True)  # park it client-side
        assert parked.parameters["seqserve_steps"].int64_param == 16
        blob = parked.parameters["seqserve_session"].string_param
        assert base64.b64decode(blob)[:4] == b"SQSX"
        resumed = _infer(sb, " be", "s9", sequence_start=True, seqserve_import=blob)
        assert resumed.parameters["seqserve_steps"].int64_param == 19
        reference = _infer(sa, "To be, or not to be", "ref", sequence_start=True, sequence_end=True)
        np.testing.assert_allclose(probs(resumed), probs(reference), atol=1e-6)
        with pytest.raises(grpc.RpcError) as err:
            _infer(sb, "x", "s10", seqserve_import=blob)  # not a start
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
