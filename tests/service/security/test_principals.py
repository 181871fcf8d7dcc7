"""Defects 9 and 10: principals (named API keys), isolation between them (sessions and v2 sequences), and
per-principal quotas (sessions, session bytes, request rate) with eviction that stays with its principal.
Runs on both session stores (the ``start_server`` fixture), as a network store must behave the same."""

from __future__ import annotations

import functools
import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.gen.seqserve.v1 import common_pb2
from service.api.principals import KeyTable, RateLimiter, load_keys, parse_keys
from service.client import ApiError, Client
from service.errors import QuotaExceeded, session_ref
from service.settings import Settings
from tests.conftest import ServerHandle
from tests.service.security.conftest import infer_request, text_input

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789abc"
KEYS = f"alice:{ALICE},bob:{BOB}"
Code = grpc.StatusCode


def failure(call: Callable[[], object]) -> ApiError:
    with pytest.raises(ApiError) as info:
        result = call()
        if hasattr(result, "__next__"):
            list(result)  # type: ignore[call-overload]
    return info.value


# --- keys -----------------------------------------------------------------------------------------------------
def test_keys_from_a_list_a_file_and_the_single_key(tmp_path: Path) -> None:
    assert parse_keys(f" alice:{ALICE} , bob:{BOB} ") == {"alice": ALICE, "bob": BOB}
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# team keys\nalice:{ALICE}\n\nbob:{BOB}  # rotated 2026-11\n")
    assert load_keys(Settings(api_keys=str(keyfile))) == {"alice": ALICE, "bob": BOB}
    assert load_keys(Settings(api_key="single-key-0123456789")) == {"default": "single-key-0123456789"}
    assert load_keys(Settings(api_keys=KEYS, api_key="single-key-0123456789"))["default"] == "single-key-0123456789"
    assert load_keys(Settings()) == {}
    table = KeyTable(parse_keys(KEYS))
    assert table.principal(ALICE) == "alice" and table.principal(BOB) == "bob" and table.principal("x") is None


def test_a_hash_inside_a_key_is_part_of_the_key() -> None:
    """A generated key with symbols was cut at its '#' (a comment, everywhere), so its 16-character prefix
    alone was accepted. A comment starts an entry, or follows a space."""
    key = "0123456789abcdef#Zq8-secret-tail"
    assert parse_keys(f"carol:{key},bob:{BOB}  # rotated") == {"carol": key, "bob": BOB}
    assert parse_keys(f"#carol:{key}\n  # old keys\nbob:{BOB}") == {"bob": BOB}


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (f"alice:{ALICE},bob", "entry 2: expected 'name:key'"),
        ("al ice:" + ALICE, "expected 'name:key'"),
        ("alice:short", "at least 16"),
        (f"alice:{ALICE} {BOB}", "a key has no spaces"),
        (f"alice:{ALICE},alice:{BOB}", "appears twice"),
        (f"alice:{ALICE},bob:{ALICE}", "same key"),
        ("/no/such/file", "no such file"),
    ],
)
def test_bad_key_specs_fail_at_start_naming_the_entry(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        load_keys(Settings(api_keys=spec))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"api_key": "short"}, "api_key: at least 16"),
        ({"api_key": "abc def ghi jkl mnop"}, "api_key: a key has no spaces"),
        ({"api_key": ""}, "api_key is set but empty"),  # a secret that rendered empty never turns auth off
        ({"api_keys": "  "}, "api_keys is set but empty"),
    ],
)
def test_a_short_or_empty_single_key_fails_at_start(settings: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        load_keys(Settings(**settings))


def test_rate_limiter_refills_and_names_the_quota() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(QuotaExceeded, match="quota_requests_per_second"):
        limiter.take("a")
    limiter.take("b")  # another principal has its own bucket
    now[0] += 0.5
    limiter.take("a")  # one token back after 1/rate seconds
    assert limiter.wait_time("a") == pytest.approx(0.5)


# --- isolation ------------------------------------------------------------------------------------------------
def test_another_principals_session_does_not_exist(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS)
    with Client(handle.target, api_key=ALICE) as alice, Client(handle.target, api_key=BOB) as bob:
        s = alice.create_session("charlm")
        alice.suggest_once(s.id, "abc", n=1, max_chars=1)
        nobody = "x" * len(s.id)
        for call in (
            lambda sid: bob.get_session(sid),
            lambda sid: bob.fork_session(sid),
            lambda sid: bob.delete_session(sid),
            lambda sid: bob.suggest_once(sid, "zz"),
            lambda sid: bob.complete("a", session_id=sid, max_chars=2),
            lambda sid: bob.observe(sid, np.ones((2, 7))),
        ):
            theirs, missing = failure(lambda c=call: c(s.id)), failure(lambda c=call: c(nobody))  # type: ignore[misc]
            assert theirs.code == missing.code == Code.NOT_FOUND
            assert theirs.message.replace(session_ref(s.id), session_ref(nobody)) == missing.message  # word for word
            assert theirs.reason == missing.reason
        info = alice.get_session(s.id)
        assert info.steps == 3, "nothing bob tried changed alice's session"
        with pytest.raises(ApiError) as unauth:
            Client(handle.target, api_key="not-a-key-0123456789").get_session(s.id)
        assert unauth.value.code == Code.UNAUTHENTICATED


def test_two_authorization_headers_are_refused(start_server: Callable[..., ServerHandle]) -> None:
    """The first of two keys used to decide the principal (a proxy that appends its own key, say)."""
    from service.api.gen.seqserve.v1 import sessions_pb2, sessions_pb2_grpc

    handle = start_server(api_keys=KEYS)
    request = sessions_pb2.CreateSessionRequest(model=common_pb2.ModelSelector(name="charlm"))
    with grpc.insecure_channel(handle.target) as channel:
        stub = sessions_pb2_grpc.SessionsStub(channel)
        for keys in ((BOB, ALICE), (ALICE, ALICE), ("wrong-key-0123456789", ALICE)):
            metadata = tuple(("authorization", f"Bearer {k}") for k in keys)
            with pytest.raises(grpc.RpcError) as info:
                stub.Create(request, metadata=metadata, timeout=30)
            assert info.value.code() == Code.UNAUTHENTICATED
            assert "'authorization' appears 2 times: send one API key" in str(info.value.details())
        assert stub.Create(request, metadata=(("authorization", f"Bearer {ALICE}"),), timeout=30).session_id


def _v2(target: str, key: str, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with grpc.insecure_channel(target) as channel:
        metadata = (("authorization", f"Bearer {key}"),)
        result: pb.ModelInferResponse = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, metadata=metadata, timeout=30
        )
        return result


def test_sequence_ids_are_namespaced_per_principal(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS)
    steps: Callable[[pb.ModelInferResponse], int] = lambda r: r.parameters["seqserve_steps"].int64_param  # noqa: E731
    a = _v2(handle.target, ALICE, infer_request("charlm", text_input("abcd"), sequence_id=1, sequence_start=True))
    b = _v2(handle.target, BOB, infer_request("charlm", text_input("x"), sequence_id=1, sequence_start=True))
    assert (steps(a), steps(b)) == (4, 1), "bob's sequence_start on id 1 did not replace alice's"
    a = _v2(handle.target, ALICE, infer_request("charlm", text_input("e"), sequence_id=1))
    assert steps(a) == 5
    with Client(handle.target, api_key=BOB) as bob:
        for key in ("kserve:charlm:1", f"kserve:{'0' * 24}:charlm:1"):
            assert failure(functools.partial(bob.get_session, key)).code == Code.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        _v2(handle.target, BOB, infer_request("charlm", text_input("e"), sequence_id=2))
    assert info.value.code() == Code.NOT_FOUND


def test_without_auth_every_caller_is_the_anonymous_principal(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server()
    with Client(handle.target) as one, Client(handle.target) as two:
        s = one.create_session("charlm")
        assert two.get_session(s.id).id == s.id  # as before principals: one shared namespace


# --- quotas ---------------------------------------------------------------------------------------------------
def test_an_exported_blob_is_a_bearer_token_the_importer_owns_its_copy(
    start_server: Callable[..., ServerHandle],
) -> None:
    """docs/sessions.md: the blob names no owner. Bob imports Alice's blob into a session of his own (same state and
    steps); Alice's session stays hers, and Alice cannot see Bob's copy."""
    handle = start_server(api_keys=KEYS, session_signing_key="s" * 40)
    with Client(handle.target, api_key=ALICE) as alice, Client(handle.target, api_key=BOB) as bob:
        s = alice.create_session("charlm")
        alice.suggest_once(s.id, "abc", n=1, max_chars=1)
        copy = bob.import_session(alice.export_session(s.id))
        assert copy.id != s.id and copy.steps == 3
        assert bob.get_session(copy.id).steps == 3
        assert failure(lambda: bob.get_session(s.id)).code == Code.NOT_FOUND
        assert failure(lambda: alice.get_session(copy.id)).code == Code.NOT_FOUND
        assert alice.get_session(s.id).steps == 3


def test_session_quota_per_principal(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS, quota_sessions=2)
    with Client(handle.target, api_key=ALICE) as alice, Client(handle.target, api_key=BOB) as bob:
        first = alice.create_session("charlm")
        alice.create_session("charlm")
        err = failure(lambda: alice.create_session("charlm"))
        assert err.code == Code.RESOURCE_EXHAUSTED and err.reason == "QUOTA_EXCEEDED"
        assert "quota_sessions" in err.message and "'alice'" in err.message
        assert failure(lambda: alice.fork_session(first.id)).reason == "QUOTA_EXCEEDED"
        bob.create_session("charlm")  # bob's own quota is untouched
        alice.delete_session(first.id)
        alice.create_session("charlm")  # room again once one is deleted


def test_session_bytes_quota_per_principal(start_server: Callable[..., ServerHandle]) -> None:
    probe = start_server()
    with Client(probe.target) as c:
        c.create_session("charlm")
    one = probe.run(probe.server.dataplane.sessions.usage()).bytes
    handle = start_server(api_keys=KEYS, quota_session_bytes=one * 2)
    with Client(handle.target, api_key=ALICE) as alice:
        alice.create_session("charlm")
        alice.create_session("charlm")
        err = failure(lambda: alice.create_session("charlm"))
        assert err.code == Code.RESOURCE_EXHAUSTED and "quota_session_bytes" in err.message


def test_eviction_takes_the_callers_own_sessions_first(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS, max_sessions=3, session_full_policy="evict_lru")
    with Client(handle.target, api_key=ALICE) as alice, Client(handle.target, api_key=BOB) as bob:
        kept = alice.create_session("charlm")  # the least recently used session of the store
        b1 = bob.create_session("charlm")
        b2 = bob.create_session("charlm")
        bob.create_session("charlm")  # store full: bob's own oldest goes, not alice's older one
        assert alice.get_session(kept.id).id == kept.id
        err = failure(lambda: bob.get_session(b1.id))
        assert err.code == Code.NOT_FOUND and err.reason == "SESSION_EVICTED"
        assert "evicted" in err.message and "max_sessions" in err.message
        assert session_ref(b1.id) in err.message and b1.id not in err.message
        # A caller with nothing to give, in a full store: the least recently used session of all goes (bob's
        # b2), and only its owner hears that it was evicted.
        alice.delete_session(kept.id)
        bob.create_session("charlm")
        alice.create_session("charlm")
        assert failure(lambda: bob.get_session(b2.id)).reason == "SESSION_EVICTED"
        told_alice = failure(lambda: alice.get_session(b2.id))
        assert told_alice.reason == "SESSION_NOT_FOUND" and "evicted" not in told_alice.message


def test_request_rate_quota(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS, quota_requests_per_second=0.1, quota_request_burst=2)
    with Client(handle.target, api_key=ALICE) as alice, Client(handle.target, api_key=BOB) as bob:
        alice.classify(["one"])
        alice.classify(["two"])
        err = failure(lambda: alice.classify(["three"]))
        assert err.code == Code.RESOURCE_EXHAUSTED and err.reason == "QUOTA_EXCEEDED"
        assert "quota_requests_per_second" in err.message and "'alice'" in err.message
        err = failure(lambda: list(alice.complete("To be", max_chars=2)))  # a streamed answer takes a token too
        assert err.code == Code.RESOURCE_EXHAUSTED and err.reason == "QUOTA_EXCEEDED"
        bob.classify(["bob has his own bucket"])
    from tests.service.api.test_lifecycle import SERVING, health

    assert [health(handle.target) for _ in range(5)] == [SERVING] * 5, "health is never rate-limited"


def test_stream_messages_are_paced_not_refused(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS, quota_requests_per_second=20, quota_request_burst=2)
    with Client(handle.target, api_key=ALICE) as alice:
        time.sleep(0.2)  # a full bucket
        s = alice.create_session("charlm")
        started = time.monotonic()
        results = list(alice.suggest(s.id, ["a", "b", "c", "d", "e", "f"]))
        assert [r.steps for r in results] == [1, 2, 3, 4, 5, 6]
        assert time.monotonic() - started >= 4 / 20 * 0.9  # 6 messages, 1 token left: 5 waits of 1/20 s


def test_admin_principals_from_the_environment_keep_mtls_subjects_whole() -> None:
    assert Settings(admin_principals=cast(Any, "alice, bob")).admin_principals == ["alice", "bob"]
    subjects = Settings(admin_principals=cast(Any, "O=seqserve-tests,CN=alice; san=spiffe://example.org/ops"))
    assert subjects.admin_principals == ["O=seqserve-tests,CN=alice", "san=spiffe://example.org/ops"]
    shm = Settings(shared_memory_principals=cast(Any, "O=acme,CN=sidecar;carol"))  # separated as admins are
    assert shm.shared_memory_principals == ["O=acme,CN=sidecar", "carol"]


def test_only_admin_principals_load_and_unload_models(start_server: Callable[..., ServerHandle]) -> None:
    handle = start_server(api_keys=KEYS, admin_principals=["alice"])
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def unload(key: str) -> None:
            stub.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="sentiment"),
                metadata=(("authorization", f"Bearer {key}"),),
                timeout=60,
            )

        with pytest.raises(grpc.RpcError) as info:
            unload(BOB)
        assert info.value.code() == Code.PERMISSION_DENIED
        assert "principal 'bob' may not unload models; list it in admin_principals" in str(info.value.details())
        ready = pb.ModelReadyRequest(name="sentiment")
        alice = (("authorization", f"Bearer {ALICE}"),)
        assert stub.ModelReady(ready, metadata=alice, timeout=30).ready  # bob changed nothing
        unload(ALICE)
        assert not stub.ModelReady(ready, metadata=alice, timeout=30).ready
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="sentiment"), metadata=alice, timeout=60)
        assert stub.ModelReady(ready, metadata=alice, timeout=30).ready
        # A load with a config is refused for its caller before the config is read: bob learns nothing from how
        # his config would have been checked; alice, an admin, is told what is wrong with it.
        bad = pb.RepositoryModelLoadRequest(model_name="sentiment")
        bad.parameters["config"].string_param = "{not json"
        for key, code, said in (
            (BOB, Code.PERMISSION_DENIED, "may not load models"),
            (ALICE, Code.INVALID_ARGUMENT, "config is not a model configuration in JSON"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.RepositoryModelLoad(bad, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
            assert refused.value.code() == code and said in str(refused.value.details()), refused.value.details()


def test_only_admin_principals_change_the_log_settings(
    start_server: Callable[..., ServerHandle], log_state: Callable[[str], io.StringIO]
) -> None:
    """What the server logs is the operators' business: any caller may read the settings, only an admin principal
    may change them, and a refused change leaves them as they were."""
    log_state("INFO")
    handle = start_server(api_keys=KEYS, admin_principals=["alice"])
    change = pb.LogSettingsRequest()
    change.settings["log_verbose_level"].uint32_param = 1
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        alice, bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
        with pytest.raises(grpc.RpcError) as info:
            stub.LogSettings(change, metadata=bob, timeout=30)
        assert info.value.code() == Code.PERMISSION_DENIED
        assert "principal 'bob' may not change the log settings; list it in admin_principals" in str(
            info.value.details()
        )
        read = stub.LogSettings(pb.LogSettingsRequest(), metadata=bob, timeout=30).settings
        assert read["log_verbose_level"].uint32_param == 0  # bob changed nothing, and may read
        with pytest.raises(grpc.RpcError) as info:
            stub.LogSettings(pb.LogSettingsRequest(), timeout=30)  # no key: nothing, not even a read
        assert info.value.code() == Code.UNAUTHENTICATED
        assert stub.LogSettings(change, metadata=alice, timeout=30).settings["log_verbose_level"].uint32_param == 1


def test_only_admin_principals_change_the_trace_settings(
    start_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """A trace file is written where the settings say: any caller may read them (a model's too), only an admin
    principal may change them, and a refused change leaves them as they were."""
    handle = start_server(api_keys=KEYS, admin_principals=["alice"], trace_dir=str(tmp_path))
    change = pb.TraceSettingRequest(model_name="sentiment")
    change.settings["trace_file"].value.append("mine.json")
    with grpc.insecure_channel(handle.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        alice, bob = (("authorization", f"Bearer {ALICE}"),), (("authorization", f"Bearer {BOB}"),)
        with pytest.raises(grpc.RpcError) as info:
            stub.TraceSetting(change, metadata=bob, timeout=30)
        assert info.value.code() == Code.PERMISSION_DENIED
        assert "principal 'bob' may not change the trace settings; list it in admin_principals" in str(
            info.value.details()
        )
        read = stub.TraceSetting(pb.TraceSettingRequest(model_name="sentiment"), metadata=bob, timeout=30).settings
        assert list(read["trace_file"].value) == [""]  # bob changed nothing, and may read
        with pytest.raises(grpc.RpcError) as info:
            stub.TraceSetting(pb.TraceSettingRequest(), timeout=30)  # no key: nothing, not even a read
        assert info.value.code() == Code.UNAUTHENTICATED
        mine = stub.TraceSetting(change, metadata=alice, timeout=30).settings["trace_file"].value
        assert list(mine) == [str(tmp_path / "mine.json")]


def test_a_refusal_that_may_be_retried_says_when_and_the_client_can_wait_for_it(
    start_server: Callable[..., ServerHandle],
) -> None:
    """A rate-limited call was refused before anything ran: its status carries google.rpc.RetryInfo with the
    bucket's own wait (any gRPC client can read it), and Client(retries=N) sends it again after that wait. A
    refusal that waiting cannot fix (a bad request) carries none and is not retried."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from service.api.gen.seqserve.v1 import sentiment_pb2, sentiment_pb2_grpc

    handle = start_server(api_keys=KEYS, quota_requests_per_second=4, quota_request_burst=1)
    auth = (("authorization", f"Bearer {ALICE}"),)
    with grpc.insecure_channel(handle.target) as channel:
        stub = sentiment_pb2_grpc.SentimentStub(channel)
        request = sentiment_pb2.ClassifyRequest(texts=["a fine film"])
        time.sleep(0.3)  # a full bucket (one token)
        stub.Classify(request, metadata=auth, timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Classify(request, metadata=auth, timeout=30)
        status = rpc_status.from_call(refused.value)
        assert status is not None
        delays = []
        for detail in status.details:
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                delays.append(retry.retry_delay.ToTimedelta().total_seconds())
        assert len(delays) == 1 and 0.0 < delays[0] <= 0.25  # one token per 1/4 s
    time.sleep(0.3)
    with Client(handle.target, api_key=ALICE) as once, Client(handle.target, api_key=ALICE, retries=3) as patient:
        once.classify(["one"])
        err = failure(lambda: once.classify(["two"]))
        assert err.reason == "QUOTA_EXCEEDED" and err.retry_after is not None and 0 < err.retry_after <= 0.25
        started = time.monotonic()
        for text in ("three", "four", "five"):  # each waits for its token instead of failing
            assert patient.classify([text])[0].label in ("negative", "positive")
        assert time.monotonic() - started >= 2 * 0.25 * 0.8
        bad = failure(lambda: patient.classify([""]))
        assert bad.code == Code.INVALID_ARGUMENT and bad.retry_after is None
    time.sleep(0.3)
    with Client(handle.target, api_key=ALICE, retries=5, timeout=0.1) as hurried:
        hurried.classify(["one"])
        started = time.monotonic()
        late = failure(lambda: hurried.classify(["two"]))  # its token comes after its deadline: no wait, no retry
        assert late.reason == "QUOTA_EXCEEDED" and time.monotonic() - started < 0.1
    with pytest.raises(ValueError, match="retries must be >= 0"):
        Client(handle.target, retries=-1)
    from service.cli import main

    time.sleep(0.3)
    classify = ["classify", "--target", handle.target, "--api-key", ALICE, "a fine film"]
    assert main(classify) == 0
    assert main(classify) == 1  # refused: the bucket is empty
    assert main([*classify, "--retries", "3"]) == 0  # waits for its token
