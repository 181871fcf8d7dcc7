"""The composition root: settings -> metrics -> data plane -> grpc.aio server (+ health, reflection, HTTP metrics).

server = Server(settings)
await server.start()          # binds (port 0 = a free port), loads models, health -> SERVING
... server.port, server.metrics_port, server.dataplane ...
await server.stop()           # health -> NOT_SERVING, in-flight calls get settings.grace_seconds

A frontend of a multi-process server (``service.engine.procs``) is the same Server given a ``plane``: the
engine's ``RemoteDataPlane`` instead of a ``CoreDataPlane`` built here. Its port is shared with the other
frontends (SO_REUSEPORT); ``own_port`` also binds a free port of its own (tests reach one frontend by it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from service.api import tls
from service.api.interceptors import EdgedServer, build_edge
from service.api.servicers import REGISTRARS, SERVICE_CAPABILITIES
from service.core.types import DataPlane
from service.metrics import Metrics
from service.settings import Settings

if TYPE_CHECKING:
    from service.core.dataplane import CoreDataPlane

log = logging.getLogger(__name__)


class RemotePlane(DataPlane, Protocol):
    """A data plane in another process (``service.engine.client.RemoteDataPlane``)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def on_models_changed(self, hook: Callable[[], Awaitable[None]]) -> None: ...

    def waiting(self) -> int: ...

    async def answers(self, within: float) -> bool: ...


ENGINE_PING_SECONDS = 1.0  # how often a frontend asks its engine whether it answers (``Server._watch_engine``)
LIVENESS_SILENT_FACTOR = 6  # an engine silent this many times ENGINE_SILENT_SECONDS fails the liveness service too
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Health(health_aio.HealthServicer):  # type: ignore[misc]  # (grpcio ships no types)
    """grpcio's health servicer, whose Watch streams end (OK) once the server drains, after telling NOT_SERVING:
    an open Watch (Envoy's, a client-side balancer's) was a call in flight that held every shutdown for its whole
    grace. The loop is grpcio's own (1.x ``grpc_health.v1._async``), with that one exit."""

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while True:
                    # The drain as it stood before this turn's write: one that began during the write is heard at
                    # the next turn. (Read after it, the watcher ended without NOT_SERVING: enter_graceful_shutdown
                    # sets it under this condition's lock, which a watcher holds except in wait().)
                    draining = self._gracefully_shutting_down
                    status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if draining and request.service in self._server_status:
                        status = NOT_SERVING  # (what enter_graceful_shutdown sets, perhaps still waiting for the lock)
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    if draining:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        for condition in list(self._server_watchers.values()):  # (a watcher of a service with no status too)
            async with condition:
                condition.notify_all()


class Server:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        plane: RemotePlane | None = None,
        own_port: bool = False,
        metrics_token: str | None = None,
        share_port: bool = False,
        private_dir: str | None = None,
    ) -> None:
        """``share_port``: bind a port another frontend of this server listens on (otherwise a port in use stops
        start-up: gRPC binds with SO_REUSEPORT, so a second server would silently take half the connections).
        ``private_dir``: where a frontend makes its private folders (its engine's, which the engine removes at
        stop, also after a frontend that died without cleaning up); default the system's temporary folder."""
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self._clock = clock  # the sessions' wall clock; tests inject one that moves when they say
        self.port = 0  # bound gRPC port, set by start()
        self.metrics_port: int | None = None  # bound HTTP port, None when the HTTP server is not available
        self.http_port: int | None = None  # bound KServe REST port (settings.http_port), None without one
        self._rest: Any = None
        self.services: list[str] = []  # full names of the registered services (ours + plug-ins)
        self._dataplane: CoreDataPlane | None = None
        self._remote = plane
        self._metrics_token = metrics_token  # a frontend's private /metrics answers its engine only
        self._share_port = share_port
        self._private_dir = private_dir
        self._own_port = own_port
        self.own_port: int | None = None  # this process's private port, when own_port
        self._grpc: grpc.aio.Server | None = None
        self._health = _Health()
        self._http: Any = None
        self._tls: tls.TlsFiles | None = None
        self._gateway_dir: str | None = None  # with TLS and REST: the private folder of the gateway's socket
        self.gateway_target: str | None = None  # ... and the socket (``unix:...``)
        self._serving = False
        self._stopping = False
        self._silent_since: float | None = None  # the engine stopped answering the watchdog then (monotonic)
        self._unlive = False  # ... and for so long that liveness says NOT_SERVING too
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def dataplane(self) -> CoreDataPlane:
        if self._dataplane is None:
            raise RuntimeError("Server.start() has not run (or this is a frontend: its data plane is remote)")
        return self._dataplane

    @property
    def plane(self) -> DataPlane:
        """The data plane the servicers call: this process's core, or the engine's."""
        if self._remote is not None:
            return self._remote
        return self.dataplane

    @property
    def serving(self) -> bool:
        """True between a successful start and the beginning of shutdown (the HTTP /readyz answer)."""
        return self._serving

    async def start(self) -> None:
        from service.core.dataplane import CoreDataPlane  # the core is built here, in the composition root

        s = self.settings
        if self._remote is None:
            self._dataplane = CoreDataPlane(s, self.metrics, clock=self._clock)
        options = grpc_options(s)
        # With TLS the gRPC port refuses the REST gateway's plaintext hop: the gateway reaches this server over a
        # Unix socket in a folder only this user can enter instead, and vouches there for its mTLS callers with a
        # token that never leaves this process (``service.api.rest``).
        token = secrets.token_hex(16) if s.tls_cert is not None and s.http_port is not None else None
        server = grpc.aio.server(options=options)
        edged = EdgedServer(server, build_edge(self.metrics, s, token))  # every service registers through the edge
        self.services = [name for register in REGISTRARS for name in register(edged, self.plane, s, self.metrics)]
        health_pb2_grpc.add_HealthServicer_to_server(self._health, edged)
        names = [*self.services, HEALTH_SERVICE, reflection.SERVICE_NAME]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), edged)
        edged.close()
        address = f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
        self._tls = tls.files(s, self.metrics.tls_loaded)  # read and checked now: bad files stop the start
        credentials = None if self._tls is None else self._tls.grpc_credentials()  # None: plaintext
        if s.port and not self._share_port:
            check_free(s.host, s.port, PORT_SETTINGS["port"])
        if s.metrics_port and self._remote is None:  # (before the gRPC port listens: fail before serving anything)
            check_free(s.host, s.metrics_port, PORT_SETTINGS["metrics_port"])
        if s.http_port and self._remote is None:
            check_free(s.host, s.http_port, PORT_SETTINGS["http_port"])
        try:
            if credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind gRPC to {address}: {exc} (port in use? set SEQSERVE_PORT)") from exc
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC to {address} (port in use? set SEQSERVE_PORT)")
        if self._own_port:
            own = f"[{s.host}]:0" if ":" in s.host else f"{s.host}:0"
            bound = server.add_insecure_port(own) if credentials is None else server.add_secure_port(own, credentials)
            self.own_port = bound
        target = None
        if token is not None:
            self._gateway_dir = tempfile.mkdtemp(prefix="seqserve-rest-", dir=self._private_dir)  # (mode 0700)
            target = self.gateway_target = f"unix:{self._gateway_dir}/grpc.sock"
            if not server.add_insecure_port(target):
                raise RuntimeError(f"cannot bind the REST gateway's socket {target}")
        await self._set_all(NOT_SERVING)  # reachable now, but not ready until the models are loaded
        await server.start()
        self._grpc = server
        self._start_http()
        if s.http_port is not None:  # (with --workers N every frontend runs one, all on one port)
            self._rest = start_rest(s, self.port, self.metrics, self._remote is not None, target, token, self._tls)
            self.http_port = self._rest.bound_port
        log.info("gRPC listening on %s:%d (%d services%s)", s.host, self.port, len(self.services),
                 ", TLS" + (" + client certificates" if s.tls_client_ca else "") if credentials else "")  # fmt: skip
        if self._remote is not None:
            await self._remote.start()
            self._remote.on_models_changed(self._engine_changed)  # models or the session store (from the engine)
            self._watchdog = asyncio.create_task(self._watch_engine(self._remote))
        else:
            await self.dataplane.start()
            # Health follows every later load, reload and unload (RepositoryModelLoad/Unload, --watch-models).
            self.dataplane.registry.subscribe(on_load=self._model_changed, on_unload=self._model_changed)
            self.dataplane.on_store_change(self._store_changed)
        await self.refresh_health()

    async def _engine_changed(self) -> None:
        if not self._stopping:
            await self.refresh_health()

    async def _store_changed(self, ok: bool) -> None:
        if not self._stopping:
            await self.refresh_health()

    async def _model_changed(self, entry: object, replaced: bool) -> None:
        if not self._stopping:
            await self.refresh_health()

    async def _watch_engine(self, remote: RemotePlane) -> None:
        """Asks the engine every ``ENGINE_PING_SECONDS`` whether it answers. A stopped or wedged engine keeps its
        connection open and sends no event, so health, which follows its events, stayed SERVING while every call
        hung. Silent ``engine_silent_seconds``: NOT_SERVING (the whole server and every service); silent
        ``LIVENESS_SILENT_FACTOR`` times as long: the liveness service too. Health follows the engine again once it
        answers."""
        limit = self.settings.engine_silent_seconds
        while not self._stopping:
            started = time.monotonic()
            if await remote.answers(limit):
                if self._silent_since is not None and not self._stopping:
                    log.warning("the engine answers again after %.1f s; health follows it again",
                                time.monotonic() - self._silent_since)  # fmt: skip
                    self._silent_since, self._unlive = None, False
                    await self.refresh_health()
            elif not self._stopping:
                now = time.monotonic()
                if self._silent_since is None:
                    self._silent_since = started  # (the call it did not answer was sent then)
                    log.error("the engine has not answered for %.1f s (stopped or wedged): health NOT_SERVING until "
                              "it does", now - started)  # fmt: skip
                    self._serving = False
                    await self._set_all(NOT_SERVING)
                if now - self._silent_since >= limit * LIVENESS_SILENT_FACTOR and not self._unlive:
                    self._unlive = True
                    log.error(
                        "the engine has not answered for %.0f s: liveness (%s) NOT_SERVING, for the "
                        "orchestrator to restart the server",
                        now - self._silent_since,
                        HEALTH_SERVICE,
                    )
                    await self._health.set(HEALTH_SERVICE, NOT_SERVING)
            await asyncio.sleep(max(0.0, ENGINE_PING_SECONDS - (time.monotonic() - started)))

    async def refresh_health(self) -> None:
        """SERVING for the whole server when the data plane is ready; per service when some ready model offers
        the capability the service needs."""
        plane = self._remote if self._remote is not None else self.dataplane
        if self._silent_since is not None:  # (the watchdog says the engine is silent: it sets health itself)
            return
        ready = await plane.ready()
        # "sessions": the session store answers (the Sessions service; stateless calls never need it)
        capabilities = await plane.capabilities() | ({"sessions"} if await plane.store_up() else set())
        models = await plane.models()
        self.metrics.know_models(m.name for m in models)  # a frontend's metrics label the engine's models
        for name in self.services:
            need = SERVICE_CAPABILITIES.get(name)
            ok = ready and (need is None or need in capabilities)
            await self._health.set(name, SERVING if ok else NOT_SERVING)
        await self._health.set("", SERVING if ready else NOT_SERVING)
        await self._health.set(HEALTH_SERVICE, SERVING)
        self._serving = ready
        for m in models:
            if not m.ready:
                log.warning("model %s/%d is not ready: %s", m.name, m.version, m.error)
        log.info("health: %s (serving: %s)", "SERVING" if ready else "NOT_SERVING", sorted(capabilities) or "nothing")

    async def _set_all(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        for name in ["", *self.services]:
            await self._health.set(name, status)

    def _start_http(self) -> None:
        try:
            from service.api.http import MetricsHttpServer
        except ImportError:  # the HTTP endpoint is optional for the gRPC server to work
            log.warning("service.api.http is not available: no /metrics endpoint")
            return
        s = self.settings
        if self._remote is not None:  # a frontend's: private (loopback, plaintext, a token), read by the engine
            self._http = MetricsHttpServer(
                "127.0.0.1", 0, self.metrics, lambda: self._serving, token=self._metrics_token
            )
            self.metrics_port = int(self._http.start())
            return
        self._http = MetricsHttpServer(
            s.host,
            s.metrics_port,
            self.metrics,
            lambda: self._serving,
            tls=self._tls,
            idle_timeout=s.metrics_idle_timeout_seconds,
            max_connections=s.metrics_max_connections,
        )
        self.metrics_port = int(self._http.start())

    async def stop(self, grace: float | None = None) -> None:
        """Health -> NOT_SERVING (watchers are told at once), new calls are refused, in-flight calls get
        ``grace`` seconds (default settings.grace_seconds) to finish, then the data plane and HTTP stop."""
        grace = self.settings.grace_seconds if grace is None else grace
        self._serving, self._stopping = False, True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            log.info("shutting down: in-flight calls get %.1fs", grace)
            await self._grpc.stop(grace)
            await _cut_calls_ended()
        if self._remote is not None:
            await self._remote.stop()
        elif self._dataplane is not None:
            await self._dataplane.stop()
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._rest is not None:  # (after gRPC's grace: REST calls in flight drain with the rest)
            self._rest.stop()
            self._rest = None
        if self._gateway_dir is not None:
            shutil.rmtree(self._gateway_dir, ignore_errors=True)
            self._gateway_dir = None
        self._stopped.set()
        log.info("stopped")

    async def wait(self) -> None:
        """Returns once ``stop()`` has finished."""
        await self._stopped.wait()


# The names grpc.aio gives its own tasks for a call: the handler's and the one that watches the call's end.
_CALL_TASKS = ("HandleExceptions[", "rpc_task")


async def _cut_calls_ended(timeout: float = 1.0) -> None:
    """Waits, at most ``timeout`` seconds, for grpc's own tasks of the calls its ``stop`` cut at the end of the
    grace (a stream a client kept open): they end a turn or two of the event loop later. A process whose loop
    closed first (a frontend of ``--workers N``, which has nothing left to do) had asyncio cancel them, and grpc
    logged each as an ERROR with a CancelledError traceback ("Exception not handled by _handle_exceptions")."""
    me = asyncio.current_task()
    calls = [t for t in asyncio.all_tasks() if t is not me and t.get_name().startswith(_CALL_TASKS)]
    if calls:
        await asyncio.wait(calls, timeout=timeout)


def start_rest(
    settings: Settings,
    grpc_port: int,
    metrics: Metrics | None = None,
    share_port: bool = False,
    target: str | None = None,
    token: str | None = None,
    tls_files: tls.TlsFiles | None = None,
) -> Any:
    """The KServe REST gateway on ``settings.http_port``, forwarding to the gRPC port ``grpc_port`` of this
    server over loopback (or to ``target``, the Unix socket of a TLS server, vouching for mTLS callers with
    ``token``), counting its answers in ``metrics``; started (``RestGateway``). ``share_port``: the port
    another frontend of this server listens on (SO_REUSEPORT, as the gRPC port). With ``tls_files`` the REST port
    speaks TLS only, with the gRPC port's certificate (and client CA)."""
    from service.api.rest import RestGateway

    host = settings.host
    if target is None:
        loopback = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        target = f"[{loopback}]:{grpc_port}" if ":" in loopback else f"{loopback}:{grpc_port}"
    gateway = RestGateway(
        host,
        settings.http_port or 0,
        target,
        max_body_bytes=settings.max_message_bytes,
        idle_timeout=settings.http_idle_timeout_seconds,
        max_connections=settings.http_max_connections,
        cors_origins=settings.cors_origins,
        keyed=bool(settings.api_key or settings.api_keys),
        metrics=metrics,
        share_port=share_port,
        tls=tls_files,
        token=token,
    )
    gateway.start()
    return gateway


def grpc_options(s: Settings) -> list[tuple[str, Any]]:
    """The gRPC server's channel arguments: message limits, the shared port, keepalive, the ping policy and
    connection ages (gRPC core's names, milliseconds; an age of 0 is left to gRPC: no limit)."""

    def ms(seconds: float) -> int:
        return max(1, round(seconds * 1000))

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.so_reuseport", 1),  # frontends of one server share the port (the default on Linux)
        ("grpc.keepalive_time_ms", ms(s.grpc_keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", ms(s.grpc_keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", int(s.grpc_keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", round(s.grpc_min_ping_interval_seconds * 1000)),
        ("grpc.http2.max_ping_strikes", s.grpc_max_ping_strikes),
    ]
    for name, seconds in (
        ("grpc.max_connection_age_ms", s.grpc_max_connection_age_seconds),
        ("grpc.max_connection_age_grace_ms", s.grpc_max_connection_age_grace_seconds),
        ("grpc.max_connection_idle_ms", s.grpc_max_connection_idle_seconds),
    ):
        if seconds:
            options.append((name, ms(seconds)))
    if s.grpc_max_concurrent_streams:
        options.append(("grpc.max_concurrent_streams", s.grpc_max_concurrent_streams))
    return options


def check_host(host: str) -> None:
    """RuntimeError, saying what to set, when ``host`` is nothing this machine can listen on: a name that does not
    resolve, or another machine's address (gRPC's own bind says only "Failed to bind to address", and the hints
    after it are about the port)."""
    if host in ("", "0.0.0.0", "::", "localhost"):
        return
    fix = "set --host (SEQSERVE_HOST) to an address of this machine (127.0.0.1 for this machine only, 0.0.0.0 for all)"
    try:
        found = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RuntimeError(f"host {host!r} does not resolve ({exc.strerror}): {fix}") from None
    for family, _, _, _, address in found:
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
            return
    raise RuntimeError(f"host {host!r} is not an address of this machine: {fix}")


# The listening ports' settings, as a refusal names them (flag and variable).
PORT_SETTINGS = {
    "port": "--port or SEQSERVE_PORT",
    "metrics_port": "--metrics-port or SEQSERVE_METRICS_PORT",
    "http_port": "--http-port or SEQSERVE_HTTP_PORT",
}


def check_free(host: str, port: int, setting: str) -> None:
    """RuntimeError naming ``setting`` when another socket holds (host, port) (``_holder`` says which kind). A
    plain bind (no SO_REUSEPORT) is refused by a listener even where gRPC's own bind would have shared the port with
    it. Every address gRPC binds for ``host`` is probed: ``localhost`` is 127.0.0.1 and ::1, a name all it resolves
    to."""
    for family, address in _bind_addresses(host, port):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine: nothing can listen there
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a previous run's TIME_WAIT does not count
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise RuntimeError(
                        f"cannot bind {host}:{port}: {_holder(family, address)} ({setting})"
                    ) from None  # (other errors, an address that is not this machine's: the real bind reports them)


def _holder(family: socket.AddressFamily, address: tuple[Any, ...]) -> str:
    """Who holds an address that a plain bind was refused, and what to do: a listener (it accepts a connection),
    or else a socket that does not listen, most often a connection's local port, which the kernel draws from its
    ephemeral range (gRPC's customary 50051 lies inside Linux's default one)."""
    wildcard = address[0] in ("", "0.0.0.0", "::")
    probed = ("::1" if family == socket.AF_INET6 else "127.0.0.1", *address[1:]) if wildcard else address
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex(probed) == 0:
            return f"another process listens there (on {address[0]}; another seqserve?); stop it or choose another port"
    return (
        f"a socket on this machine holds the port on {address[0]} but does not accept connections on {probed[0]}: "
        f"most likely a connection's local port, which the kernel draws from its ephemeral range "
        f"({_ephemeral_range()}); choose a port outside that range, or wait for that connection to close"
    )


def _ephemeral_range() -> str:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    except (OSError, ValueError):
        return "net.ipv4.ip_local_port_range"
    return f"ports {low}-{high}, net.ipv4.ip_local_port_range"


def _bind_addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    if host == "localhost":  # gRPC binds both loopbacks for it, whatever /etc/hosts says
        return [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port, 0, 0))]
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return []  # a name that does not resolve: the real bind reports it
    out: list[tuple[socket.AddressFamily, tuple[Any, ...]]] = []
    for family, _, _, _, address in found:
        if (family, address) not in out and family in (socket.AF_INET, socket.AF_INET6):
            out.append((family, tuple(address)))
    return out
