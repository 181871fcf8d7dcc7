"""Credentials and refusals at their edges: the Bearer scheme, the status code of every domain error, the log
budget's count, a refused bidi stream in the RPC metrics, key configuration, and the rate limiter's burst and
bounded tracking. (Each was unchecked until a mutation review.)"""

from __future__ import annotations

import logging

import grpc
import pytest

from service import errors
from service.api import principals
from service.api.gen.inference import grpc_service_pb2_grpc as pb_grpc
from service.api.interceptors import Edge, LogBudget, status_code_for
from service.api.principals import KeyTable, RateLimiter, load_keys, parse_keys
from service.errors import QuotaExceeded
from service.metrics import Metrics
from service.settings import Settings
from tests.service.security.conftest import eventually, infer_request, rpc_count, text_input

K1, K2 = "k" * 16 + "-one", "k" * 16 + "-two"


# --- interceptors.py --------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self, *md: tuple[str, str]) -> None:
        self.md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.md


def test_the_bearer_scheme_is_case_insensitive_and_required() -> None:
    """RFC 7235 auth schemes are case-insensitive; another scheme is refused."""
    edge = Edge(Metrics(runtime_collectors=False), Settings(), KeyTable({"alice": K1}), mtls=False)
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert edge._by_key(_Ctx(("authorization", f"{scheme} {K1}"))) == "alice"
    for bad in (f"Basic {K1}", f"Token {K1}"):
        with pytest.raises(errors.Unauthenticated):
            edge._by_key(_Ctx(("authorization", bad)))


def test_every_domain_error_has_its_documented_status_code() -> None:
    """A change of STATUS_CODES changes what clients retry."""
    C = grpc.StatusCode
    expected = {errors.SessionConflict: C.ABORTED, errors.StoreUnavailable: C.UNAVAILABLE,
                errors.QuotaExceeded: C.RESOURCE_EXHAUSTED, errors.SessionEvicted: C.NOT_FOUND,
                errors.TooLarge: C.RESOURCE_EXHAUSTED, errors.PermissionDenied: C.PERMISSION_DENIED}  # fmt: skip
    for cls, code in expected.items():
        assert status_code_for(cls("x")) == code, cls


def test_the_log_budget_warning_counts_from_the_first_dropped_line(caplog: pytest.LogCaptureFixture) -> None:
    """The count in "... not logged in the last N s" spans the whole run of dropped lines, and the next run
    counts from zero."""
    now = [0.0]
    budget = LogBudget(1.0, clock=lambda: now[0])
    assert sum(budget.allow() for _ in range(5)) == 5
    # (a line after dropped ones takes two tokens, its WARNING's and its own: at 1 line/s, 2 s after the burst)
    runs = (((0.1, 0.5, 0.9), 2.0, "3 refused-request lines were not logged in the last 1.9 s"),
            ((2.2, 2.5), 4.0, "2 refused-request lines were not logged in the last 1.8 s"))  # fmt: skip
    for dropped, allowed, warning in runs:
        for t in dropped:
            now[0] = t
            assert not budget.allow()
        now[0] = allowed
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.api.interceptors"):
            assert budget.allow()
        assert warning in caplog.text


def test_a_log_budget_under_one_line_in_two_seconds_still_logs_after_dropping() -> None:
    """Below 0.4 lines a second its bucket held less than the two tokens a line after dropped ones costs (its
    own and the WARNING's): after the first drop nothing was ever logged again, the WARNING included."""
    now = [0.0]
    budget = LogBudget(0.2, clock=lambda: now[0])
    allowed = []
    for second in range(600):  # one refusal a second for ten minutes
        now[0] = float(second)
        allowed.append(budget.allow())
    # the burst (2 tokens), then a line and its WARNING every 10 s (2 tokens at 0.2 a second)
    assert 55 <= sum(allowed) <= 62, sum(allowed)
    assert allowed[-20:].count(True) == 2


def test_the_log_budget_warning_is_no_requests_line() -> None:
    """It was written in the context of the request whose line came next, so a JSON log gave it that request's id
    and method."""
    from service.logs import CALL

    seen: list[tuple[str, str, str]] = []

    class Probe(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(CALL.get())  # what the log's call filter would stamp on the record

    now = [0.0]
    budget = LogBudget(1.0, clock=lambda: now[0])
    while budget.allow():
        pass
    logger = logging.getLogger("service.api.interceptors")
    probe, level = Probe(), logger.level
    logger.addHandler(probe)
    logger.setLevel(logging.WARNING)
    token = CALL.set(("req-next", "/seqserve.v1.Sentiment/Classify", ""))
    try:
        now[0] = 2.0
        assert budget.allow()
    finally:
        CALL.reset(token)
        logger.removeHandler(probe)
        logger.setLevel(level)
    assert seen == [("-", "", "")]


def test_a_refused_bidi_stream_is_counted_with_its_code(start_server) -> None:  # type: ignore[no-untyped-def]
    """ModelStreamInfer (stream-stream) refused for credentials is UNAUTHENTICATED in the RPC metrics."""
    handle = start_server(api_keys=f"alice:{K1}")
    with grpc.insecure_channel(handle.target) as channel:
        stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([infer_request("charlm", text_input("x"))]), timeout=30
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert eventually(
        lambda: rpc_count(handle, "inference.GRPCInferenceService", "ModelStreamInfer", "UNAUTHENTICATED") == 1
    )


# --- principals.py ----------------------------------------------------------------------------------------------
def test_key_config_edges() -> None:
    """A 16-char key is enough; api_key may not collide with an api_keys entry's name or key."""
    assert parse_keys("a:" + "k" * 16) == {"a": "k" * 16}
    with pytest.raises(ValueError, match="both name principal 'default'"):
        load_keys(Settings(api_key=K1, api_keys=f"default:{K2}"))
    with pytest.raises(ValueError, match="also given to a named principal"):
        load_keys(Settings(api_key=K1, api_keys=f"alice:{K1}"))
    # keys no client can send, and a list separated by ';', started a server none of whose callers could be them
    with pytest.raises(ValueError, match="api key 'alice': a key is printable ASCII"):
        parse_keys("alice:SECRETSECRETSECRET1\u00e9")
    with pytest.raises(ValueError, match="api_key: a key is printable ASCII"):
        load_keys(Settings(api_key="SECRETSECRETSECRET1\u00e9"))
    with pytest.raises(ValueError, match="api key 'alice' holds ';' and what reads as another entry"):
        parse_keys(f"alice:{K1};bob:{K2}")
    assert parse_keys(f"alice:{K1};x") == {"alice": f"{K1};x"}  # a ';' alone is a key's own


def test_rate_limiter_burst_cap_default_burst_and_bounded_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    """An idle principal saves up at most `burst`; burst 0 means one second's worth; when
    too many principals are tracked the least recently seen is dropped, never the caller's own bucket."""
    now = [0.0]
    limiter = RateLimiter(rate=1.0, burst=2, clock=lambda: now[0])
    limiter.take("a")  # known since t=0, idle for 1000 s: still at most 2 saved up
    now[0] = 1000.0
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(QuotaExceeded):
        limiter.take("a")
    assert RateLimiter(rate=5.0, burst=0).burst == 5.0
    monkeypatch.setattr(principals, "MAX_TRACKED", 2)
    small = RateLimiter(rate=1.0, burst=1, clock=lambda: now[0])
    small.take("x")
    small.take("y")
    small.take("z")  # tracking three: "x" (least recently seen) is dropped, not "z"
    with pytest.raises(QuotaExceeded):
        small.take("z")


def test_no_domain_error_reaches_clients_as_internal() -> None:
    """Every error class of service.errors has its status: one left out of STATUS_CODES would reach clients as
    INTERNAL, which they do not retry (ReplicaBehind, raised mid rolling update, must stay UNAVAILABLE)."""
    import inspect

    domain = [c for _, c in inspect.getmembers(errors, inspect.isclass)
              if issubclass(c, errors.SeqServeError) and c is not errors.SeqServeError]  # fmt: skip
    assert errors.ReplicaBehind in domain
    for cls in domain:
        assert status_code_for(cls("x")) != grpc.StatusCode.INTERNAL, cls
    assert status_code_for(errors.ReplicaBehind("x")) == grpc.StatusCode.UNAVAILABLE
