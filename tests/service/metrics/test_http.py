"""The /metrics, /healthz, /readyz HTTP endpoint, scraped over a real loopback socket; promtool lints the scrape."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from service.api.http import SAMPLES_TYPE, MetricsHttpServer
from service.metrics import SESSION_EVENTS, Metrics
from tests.deploy.conftest import unavailable


class Ready:
    def __init__(self) -> None:
        self.ready = False

    def __call__(self) -> bool:
        return self.ready


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics(CollectorRegistry())
    # One of everything, so the lint below sees every family with samples.
    m.model_loaded("charlm", 1, "CPUExecutionProvider", 0.3, ready=True)
    m.rpc_started("seqserve.v1.Inference", "Complete")
    m.rpc_finished("seqserve.v1.Inference", "Complete", "charlm", "OK", 0.004)
    m.rpc_finished("seqserve.v1.Inference", "Complete", "nope", "NOT_FOUND", 0.0001)
    m.inference("charlm", 1, 0.0005, 0.0002, 3)
    m.watch_queue("charlm", 0, lambda: 2)
    m.sessions_active("charlm", 1)
    for event in SESSION_EVENTS:
        m.session_event("charlm", event)
    m.session_store_usage(1, 100, 512, 4096)
    m.chars_generated("charlm", 42)
    m.time_to_first_chunk("charlm", 0.001)
    return m


@pytest.fixture
def server(metrics: Metrics) -> Iterator[tuple[str, Ready]]:
    ready = Ready()
    srv = MetricsHttpServer("127.0.0.1", 0, metrics, ready)
    port = srv.start()
    assert port > 0
    assert srv.start() == port  # idempotent
    yield f"http://127.0.0.1:{port}", ready
    srv.stop()
    srv.stop()


def get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_metrics_endpoint_serves_the_registry(server: tuple[str, Ready]) -> None:
    base, _ = server
    status, ctype, body = get(base + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["seqserve_generated_chars"].samples[0].value == 42.0
    assert "seqserve_rpc_duration_seconds" in families
    assert "process_cpu_seconds" in families  # process collector on our registry


def test_gzip_when_the_scraper_accepts_it(server: tuple[str, Ready]) -> None:
    """Prometheus sends Accept-Encoding: gzip; the same families come back compressed, and plain without it."""
    base, _ = server
    req = urllib.request.Request(base + "/metrics", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        packed = resp.read()
    assert int(resp.headers["Content-Length"]) == len(packed)
    plain = get(base + "/metrics")[2]
    text = gzip.decompress(packed).decode()
    assert len(packed) < len(plain) / 3
    assert {f.name for f in text_string_to_metric_families(text)} == {
        f.name for f in text_string_to_metric_families(plain.decode())
    }


def test_openmetrics_when_asked(server: tuple[str, Ready]) -> None:
    base, _ = server
    status, ctype, body = get(base + "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert ctype.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_health_readiness_and_404(server: tuple[str, Ready]) -> None:
    base, ready = server
    assert get(base + "/healthz")[0] == 200
    assert get(base + "/readyz")[0] == 503
    ready.ready = True
    assert get(base + "/readyz")[0] == 200
    status, _, body = get(base + "/nope")
    assert status == 404
    assert b"/metrics" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_another_method_is_405_naming_the_ones_served(server: tuple[str, Ready], method: str) -> None:
    base, _ = server
    request = urllib.request.Request(base + "/metrics", data=b"x" if method in ("POST", "PUT") else None, method=method)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 405 and info.value.headers["Allow"] == "GET, HEAD"
    assert (
        info.value.read()
        == f"{method} is not served here: /metrics, /healthz and /readyz take GET (or HEAD)\n".encode()
    )
    assert get(base + "/healthz")[0] == 200  # (and the port serves on)


def test_readiness_callback_error_means_not_ready(metrics: Metrics) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    srv = MetricsHttpServer("127.0.0.1", 0, metrics, broken)
    port = srv.start()
    try:
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 503
    finally:
        srv.stop()


def test_stop_releases_the_port(metrics: Metrics) -> None:
    srv = MetricsHttpServer("127.0.0.1", 0, metrics, lambda: True)
    port = srv.start()
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = MetricsHttpServer("127.0.0.1", port, metrics, lambda: True)  # the port can be bound again
    assert again.start() == port
    again.stop()


def test_promtool_check_metrics_on_a_live_scrape(server: tuple[str, Ready]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool not installed (make sysdeps installs it)")
    base, _ = server
    _, _, body = get(base + "/metrics")
    proc = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    # promtool prints lint problems (naming, units, help) and exits 1; a clean exposition prints nothing.
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    assert out.strip() == "", out


def test_head_answers_headers_without_a_body(server: tuple[str, Ready]) -> None:
    """HEAD (what load balancers and uptime checkers send) gets the status and Content-Length of the GET, and no
    body: bytes after the headers would be read as the next response on a kept-alive connection."""
    import socket

    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    for path, status in (("/metrics", b"200"), ("/healthz", b"200"), ("/readyz", b"503"), ("/nope", b"404")):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == status, head
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        assert length > 0 and body == b"", (path, body[:80])


def test_a_header_line_that_is_no_header_or_a_bad_request_line_gets_a_400_and_the_connection_closes(
    server: tuple[str, Ready],
) -> None:
    """A header line without a colon stopped the standard library's header parse: the request was answered and the
    bytes after it read as a next request; a malformed request line was answered with no status line at all."""
    import socket

    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    for request in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"HELLO\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400 ") and data.count(b"HTTP/1.1 ") == 1, data[:200]


def test_a_query_string_does_not_change_the_path(server: tuple[str, Ready]) -> None:
    """Prometheus' ``params`` (and many probes) add a query string: /metrics?x=1 is still /metrics."""
    base, ready = server
    ready.ready = True
    status, _, body = get(base + "/metrics?module=seqserve&x=1")
    assert status == 200 and b"seqserve_rpc_requests_total" in body
    assert get(base + "/healthz?probe=liveness")[0] == 200
    assert get(base + "/readyz?verbose")[0] == 200


def test_name_parameters_choose_the_families(server: tuple[str, Ready]) -> None:
    """``?name[]=...`` (prometheus_client's own handler's filter; a debugging scrape, a federation-like pull):
    only those families, by their sample names; an unknown name gives an empty page, not an error."""
    base, _ = server
    query = "name[]=seqserve_rpc_requests_total&name[]=process_cpu_seconds_total&name[]=nope"
    status, _, body = get(f"{base}/metrics?{query}")
    families = {f.name for f in text_string_to_metric_families(body.decode())}
    assert status == 200 and families == {"seqserve_rpc_requests", "process_cpu_seconds"}
    assert get(f"{base}/metrics?name[]=nope")[:1] == (200,) and get(f"{base}/metrics?name[]=nope")[2] == b""


def test_a_broken_collector_answers_500_and_the_endpoint_lives_on(metrics: Metrics) -> None:
    """A collector that raises (a plugin's, a /proc read) makes that scrape a 500 saying so (Prometheus marks the
    target down for it), never a dropped connection; health and the next scrapes still answer."""

    class Broken:
        def __init__(self) -> None:
            self.fail = True

        def collect(self) -> list[object]:
            if self.fail:
                raise RuntimeError("collector bug")
            return []

    broken = Broken()
    metrics.registry.register(broken)  # type: ignore[arg-type]
    srv = MetricsHttpServer("127.0.0.1", 0, metrics, lambda: True)
    base = f"http://127.0.0.1:{srv.start()}"
    try:
        status, _, body = get(base + "/metrics")
        assert status == 500 and b"collecting metrics failed" in body
        assert get(base + "/healthz")[0] == 200
        broken.fail = False
        assert get(base + "/metrics")[0] == 200
    finally:
        srv.stop()


def test_a_failed_bind_says_whether_to_change_the_host_or_the_port(metrics: Metrics) -> None:
    """192.0.2.1 (RFC 5737) is no address of this machine: the hint was "another process listens there?"."""
    with pytest.raises(RuntimeError) as err:
        MetricsHttpServer("192.0.2.1", 0, metrics, Ready()).start()
    assert str(err.value).endswith(
        "('192.0.2.1' is not an address of this machine: set --host (SEQSERVE_HOST) to one it has)"
    )
    taken = MetricsHttpServer("127.0.0.1", 0, metrics, Ready())
    try:
        with pytest.raises(RuntimeError) as err:
            MetricsHttpServer("127.0.0.1", taken.start(), metrics, Ready()).start()
        assert "another process listens there? choose another port: --metrics-port or SEQSERVE_METRICS_PORT" in str(
            err.value
        )
    finally:
        taken.stop()


@contextlib.contextmanager
def _slot_holder(port: int) -> Iterator[socket.socket]:
    """A connection that holds a port's one slot (METRICS_MAX_CONNECTIONS=1) with a half-sent request. The slot of
    a scrape just answered may not be free yet: a connection refused for it (closed at once) is tried again (a
    later connection took the slot freed meanwhile, and waited for a request instead of being refused)."""
    deadline = time.monotonic() + 10
    while True:
        holder = socket.create_connection(("127.0.0.1", port))
        holder.sendall(b"GET /metrics HTTP/1.1\r\n")  # half-sent
        holder.settimeout(0.3)
        try:
            closed = holder.recv(1) == b""  # refused: closed at once
        except TimeoutError:
            closed = False  # held: the server waits for the rest of the request
        if not closed:
            break
        holder.close()
        assert time.monotonic() < deadline, "the port's slot never came free"
    try:
        yield holder
    finally:
        holder.close()


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("rest", [False, True])
def test_closed_connection_series_exist_at_zero_for_the_ports_served(
    tiny_models: Path, tmp_path: Path, workers: str, rest: bool
) -> None:
    """``seqserve_http_connections_closed_total`` has its port x reason series at 0 from the start, for the ports the
    server serves only (``rest`` with an HTTP port): a series born at its first close loses that burst to
    ``rate()`` and ``increase()`` (SeqServeHttpConnectionsRefused, the dashboard's panel). With ``--workers 2`` the
    engine's /metrics sums the frontends' (REST) with its own (the metrics port). A real server, scraped; then a
    connection refused for want of a slot counts 1 on the series that was there."""
    from tests.service.kserve.procs import scrape, start_server, stop_server

    env = {"SEQSERVE_WORKERS": workers, "SEQSERVE_METRICS_MAX_CONNECTIONS": "1"}
    if rest:
        env["SEQSERVE_HTTP_PORT"] = "0"
    proc, info = start_server(tiny_models, tmp_path, **env)
    try:
        assert ("http_port" in info) is rest
        ports = ["metrics", "rest"] if rest else ["metrics"]
        want = {(("port", p), ("reason", r)): 0.0 for p in ports for r in ("busy", "timeout")}
        assert scrape(info["metrics_port"])["seqserve_http_connections_closed_total"] == want
        port = int(info["metrics_port"])
        with _slot_holder(port), socket.create_connection(("127.0.0.1", port)) as refused:
            refused.settimeout(10)
            assert refused.recv(1) == b""  # closed at once, no slot
        deadline = time.monotonic() + 10
        while True:  # (a scrape may find the slot still held a moment, be refused too and count: busy >= 1)
            try:
                got = scrape(info["metrics_port"])["seqserve_http_connections_closed_total"]
                break
            except (OSError, http.client.HTTPException):
                assert time.monotonic() < deadline
                time.sleep(0.2)
        busy = (("port", "metrics"), ("reason", "busy"))
        assert got[busy] >= 1 and {k: v for k, v in got.items() if k != busy} == {k: 0.0 for k in want if k != busy}
    finally:
        stop_server(proc)


def _samples(port: int, accept: str) -> tuple[str, bytes]:
    headers = {"Accept": accept, "Authorization": "Bearer t"}
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)) as r:
        return r.headers.get_content_type(), r.read()


def test_a_private_port_answers_its_engine_the_samples_as_json(metrics: Metrics) -> None:
    """A private port (one with a token: a frontend's) answers its engine, which asks for them, the samples as JSON:
    the same samples as its text (``_created`` left out), read without parsing text. A public port answers text,
    whatever a scraper asks."""
    private = MetricsHttpServer("127.0.0.1", 0, metrics, Ready(), token="t")
    public = MetricsHttpServer("127.0.0.1", 0, metrics, Ready())
    try:
        kind, body = _samples(private.start(), f"{SAMPLES_TYPE}, application/openmetrics-text")
        assert kind == SAMPLES_TYPE
        sent = {
            (name, tuple(sorted(labels.items()))): value
            for _, samples in json.loads(body)
            for name, labels, value, _ in samples
            if name.startswith("seqserve_rpc_")  # (not the process's CPU and memory: they move between two reads)
        }
        kind, text = _samples(public.start(), SAMPLES_TYPE)
        assert kind == "text/plain"
        written = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples
            if s.name.startswith("seqserve_rpc_") and not s.name.endswith("_created")
        }
        assert sent == written and len(sent) > 40
        labels = {"service": "seqserve.v1.Inference", "method": "Complete", "model": "charlm", "code": "OK"}
        assert sent["seqserve_rpc_requests_total", tuple(sorted(labels.items()))] == 1.0
    finally:
        private.stop()
        public.stop()


def test_one_client_address_cannot_hold_every_slot_of_the_metrics_port() -> None:
    """One client that opened connection after connection and dripped a byte into each held all 64 slots, and
    /healthz probes from anywhere failed (a liveness probe there restarts the pod). One address now holds a quarter of
    the slots at most; another address (Prometheus, the kubelet) still gets in."""
    metrics = Metrics(runtime_collectors=False)
    srv = MetricsHttpServer("127.0.0.1", 0, metrics, lambda: True, max_connections=8)
    port = srv.start()
    held: list[socket.socket] = []
    try:
        for _ in range(2):  # 8 // 4: this address's most
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # half a request: the connection is held
            held.append(s)
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as third:
            third.settimeout(10)
            assert third.recv(1) == b""  # closed at once
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as other:
            other.settimeout(10)
            other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := other.recv(4096):
                answer += chunk
            assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == b"200", answer[:80]
        busy = metrics.registry.get_sample_value(
            "seqserve_http_connections_closed_total", {"port": "metrics", "reason": "busy"}
        )
        assert busy == 1
    finally:
        for s in held:
            s.close()
        srv.stop()
