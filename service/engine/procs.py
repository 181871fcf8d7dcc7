"""``seqserve serve --workers N`` (N > 1): this process is the engine; it spawns N gRPC frontend processes.

    clients ──gRPC──▶ frontend 1..N (one port, SO_REUSEPORT: the kernel spreads connections)
                        transport, protobuf, the edge, validation of the wire format, response encoding
                              │  msgpack frames over a Unix socket (service/engine/wire.py)
                              ▼
                      engine (this process): CoreDataPlane = registry, tasks, batchers (ORT), SessionManager
                        + HTTP /metrics (its own metrics and the frontends' RPC metrics, summed)

Start-up: the engine binds its sockets and loads the models, then spawns the first frontend (``spawn``: no
gRPC object ever crosses a fork), learns the port it bound (``--port 0`` = a free one) and spawns the others on
that port. The ready file is written when every frontend serves. SIGTERM/SIGINT: each frontend gets SIGTERM,
turns NOT_SERVING and drains its calls (``grace_seconds``) while the engine still answers them; then the engine
stops and the process exits 0. A frontend that dies unexpectedly (OOM killer, a crash) is replaced by a new one on
the same port: only its calls in flight fail, sessions are the engine's and live on. One that keeps dying (more
than ``frontend_restarts`` exits within ``frontend_restart_window_seconds``) stops the whole server (exit 1) so
that the orchestrator restarts it; frontends exit by themselves when the engine process is gone. The engine's
``/readyz`` stays ready while any frontend serves, so a replacement does not take the server out of its load
balancer.

With ``--engines K`` (> 1) this process is engine 1 of K: it spawns engines 2..K first (each loads the models and
serves its share of the sessions on a socket of its own; ``service/engine/shards.py``), hands every frontend all
K sockets, sums the other engines' metrics into its ``/metrics``, stops them after the frontends, and stops the
whole server (exit 1) when one of them is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from service.core.aio import run, server_gc, stop_on_signals
from service.settings import Settings

log = logging.getLogger(__name__)
START_TIMEOUT = 120.0
SUPERVISOR_STALL_SECONDS = 2.0  # a round of the supervisor this late: the engine's own loop stalled (see _hung)


@dataclass
class Frontend:
    index: int
    process: Any  # multiprocessing.process.BaseProcess
    conn: Connection
    port: int = 0
    own_port: int | None = None
    metrics_port: int = 0
    http_port: int | None = None  # the REST port (shared by all), when served
    started: float = 0.0  # when it reported serving (``time.monotonic``, set by ``_spawn``)


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's limit)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def worker_count(settings: Settings) -> int:
    """Frontend processes: ``settings.workers``, or one per available core when 0."""
    return settings.workers or available_cpus()


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Atomically (write + rename), so a reader polling for the file never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    tmp.replace(path)


# --- a spawned process: a frontend, or another engine ---------------------------------------------------------
def _child_settings(values: dict[str, Any]) -> Settings:
    """A spawned process's settings, with its logging and garbage collection set up as the serve process's."""
    from service.logs import configure

    settings = Settings(**values)
    configure(settings)
    server_gc()
    return settings


def _on_sigterm() -> asyncio.Event:
    """An event SIGTERM sets (installed before the process starts serving: a SIGTERM meanwhile is not lost)."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    return stop


async def _until_stopped(stop: asyncio.Event, parent: int, gone: str) -> None:
    """Returns once ``stop`` is set, or once the process that started this one (``parent``) is gone: this one was
    re-parented, and logs that ``gone`` is gone."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if os.getppid() != parent:
            log.error("%s is gone; stopping", gone)
            break


# --- a frontend process --------------------------------------------------------------------------------------
def frontend_main(
    values: dict[str, Any], index: int, sockets: list[str], token: str, share: bool, conn: Connection
) -> None:
    settings = _child_settings(values)
    run(_frontend(settings, index, sockets, token, conn, share), settings.event_loop)


async def _frontend(
    settings: Settings, index: int, sockets: list[str], token: str, conn: Connection, share: bool = False
) -> None:
    """``sockets``: one per engine, the first engine's first (``service/engine/shards.py`` routes among them)."""
    from service.api.server import RemotePlane, Server
    from service.engine.client import RemoteDataPlane
    from service.engine.shards import ShardedDataPlane
    from service.metrics import Metrics

    parent = os.getppid()
    metrics = Metrics(runtime_collectors=False)
    links = [
        RemoteDataPlane(path, max_pending=settings.max_queue_size, shared_memory=settings.shared_memory == "system")
        for path in sockets
    ]
    plane: RemotePlane = links[0] if len(links) == 1 else ShardedDataPlane(links, home=index)
    metrics.engine_calls_waiting.set_function(plane.waiting)  # read at each scrape: nothing per call
    server = Server(
        settings,
        metrics,
        plane=plane,
        own_port=settings.frontend_ports,
        metrics_token=token,
        share_port=index > 0 or share,  # the first frontend's port, by design (a replacement's too)
        private_dir=os.path.dirname(sockets[0]),  # the engine's folder: removed at stop, whatever became of us
    )
    stop = _on_sigterm()
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    conn.send(
        {
            "port": server.port,
            "own_port": server.own_port,
            "metrics_port": server.metrics_port,
            "http_port": server.http_port,
        }
    )
    beats = asyncio.create_task(_beat(links))
    try:
        await _until_stopped(stop, parent, "the engine process")
    finally:
        beats.cancel()
    await server.stop(settings.grace_seconds)


async def _beat(links: Sequence[Any]) -> None:
    """A heartbeat to every engine each ``wire.BEAT_SECONDS``, from this frontend's event loop and from nothing
    else: the watchdog's own calls wait for the engines' answers (up to ENGINE_SILENT_SECONDS, all engines at once),
    so a frontend waiting on a stalled engine 2 said nothing to engine 1, which took it for hung and killed it."""
    from service.engine import wire

    while True:
        for link in links:
            link.beat()
        await asyncio.sleep(wire.BEAT_SECONDS)


# --- another engine's process (SEQSERVE_ENGINES > 1) -----------------------------------------------------------
def engine_main(
    values: dict[str, Any], index: int, engines: int, socket_path: str, token: str, conn: Connection
) -> None:
    settings = _child_settings(values)
    run(_engine(settings, index, engines, socket_path, token, conn), settings.event_loop)


async def _engine(settings: Settings, index: int, engines: int, socket_path: str, token: str, conn: Connection) -> None:
    """Engine ``index`` (> 0) of ``engines``: its own models, batchers and share of the sessions, served to every
    frontend on its socket; its metrics on a private port that answers the first engine only (``token``), which
    sums them. Stops on SIGTERM, or when the first engine is gone."""
    from service.api.http import MetricsHttpServer
    from service.core.dataplane import CoreDataPlane
    from service.engine.server import EngineServer
    from service.metrics import Metrics

    parent = os.getppid()
    stop = _on_sigterm()
    metrics = Metrics(runtime_collectors=False)
    dataplane = CoreDataPlane(settings, metrics, shard=(index, engines))
    engine = EngineServer(dataplane, socket_path)
    http = MetricsHttpServer("127.0.0.1", 0, metrics, lambda: dataplane.is_ready, token=token)
    try:
        await engine.start()
        await dataplane.start()
        conn.send({"metrics_port": http.start()})
        await _until_stopped(stop, parent, "the first engine")
    finally:
        http.stop()
        await engine.stop()
        await dataplane.stop()


@dataclass
class Engine:
    index: int  # 1.. (the first engine is the serve process itself)
    process: Any  # multiprocessing.process.BaseProcess
    metrics_port: int = 0


async def _spawn_engine(settings: Settings, index: int, engines: int, socket_path: str, token: str) -> Engine:
    process, parent = _start(
        engine_main, (settings.model_dump(), index, engines, socket_path, token), f"seqserve-engine-{index + 1}"
    )
    report = await _report(process, parent, f"engine {index + 1}")
    return Engine(index, process, report["metrics_port"])


# --- the engine process ----------------------------------------------------------------------------------------
async def serve(settings: Settings, ready_file: Path | None) -> int:
    """Runs the engine and its frontends until SIGTERM/SIGINT; returns the exit code."""
    stop = asyncio.Event()  # first: a signal from here on stops the server once it has started, never mid-start
    stop_on_signals(stop, settings.grace_seconds)
    loop = asyncio.get_running_loop()
    from service.api import tls
    from service.api.http import MetricsHttpServer
    from service.api.principals import load_keys
    from service.api.server import PORT_SETTINGS, check_free
    from service.core.dataplane import CoreDataPlane
    from service.engine.metrics import serve_engine_metrics, serve_frontend_rpc_metrics
    from service.engine.server import EngineServer
    from service.logs import summary
    from service.metrics import Metrics

    load_keys(settings)  # the frontends read the keys; a bad entry stops start-up here, in one line, not in each
    n, k = worker_count(settings), settings.engines
    if k > n:
        log.warning("%d engines for %d frontends: engines %d..%d serve sessions and sequences only (a frontend sends "
                    "stateless calls to its own engine, frontend i to engine i)", k, n, n + 1, k)  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="seqserve-engine-"))
    sockets = [str(folder / "engine.sock"), *(str(folder / f"engine-{i + 1}.sock") for i in range(1, k))]
    metrics = Metrics()
    dataplane = CoreDataPlane(settings, metrics, shard=(0, k))  # (its store holds its share: sessions/manager.py)
    engine = EngineServer(dataplane, sockets[0])
    frontends: list[Frontend] = []
    engines: list[Engine] = []
    token = secrets.token_urlsafe(32)  # the frontends' and other engines' private /metrics answer this one only
    http: MetricsHttpServer | None = None
    code = 0
    try:
        await engine.start()
        others = asyncio.gather(
            *(_spawn_engine(settings, i, k, sockets[i], token) for i in range(1, k))
        )  # (they load their models while this one loads its own)
        try:
            await dataplane.start()
        finally:
            engines += await others
        # The metrics port first: one that is taken stops start-up before any frontend listens.

        def ready() -> bool:
            # Once every frontend has started: ready while any of them serves (the port is shared: a dead one's
            # connections are refused and new ones go to the others), so a frontend being replaced does not take
            # the whole server out of its load balancer for that second.
            up = len(frontends) == n and any(f.process.is_alive() for f in frontends)
            return up and not stop.is_set() and dataplane.is_ready and all(e.process.is_alive() for e in engines)

        tls_files = tls.files(settings, metrics.tls_loaded)  # the engine's own, for its metrics port
        http = MetricsHttpServer(
            settings.host,
            settings.metrics_port,
            metrics,
            ready,
            tls=tls_files,
            idle_timeout=settings.metrics_idle_timeout_seconds,
            max_connections=settings.metrics_max_connections,
        )
        metrics_port = http.start()
        if settings.port:  # (the first frontend would only say so in its log)
            check_free(settings.host, settings.port, PORT_SETTINGS["port"])
        if settings.http_port:
            check_free(settings.host, settings.http_port, PORT_SETTINGS["http_port"])
        first = await _spawn(settings, 0, settings.port, sockets, token)
        frontends.append(first)
        if first.http_port is not None:  # KServe REST: every frontend serves it, on the port the first one bound
            settings = settings.model_copy(update={"http_port": first.http_port})
        frontends += await asyncio.gather(*(_spawn(settings, i, first.port, sockets, token) for i in range(1, n)))
        collector = serve_frontend_rpc_metrics(metrics, lambda: [f.metrics_port for f in frontends], token)
        if engines:
            per_engine = settings.sessions_in_process  # a store per engine: its gauges add up too
            serve_engine_metrics(metrics, lambda: [e.metrics_port for e in engines], token, per_engine)
        metrics.processes.processes = lambda: [
            ("engine", os.getpid()),
            *((f"engine-{e.index + 1}", int(e.process.pid or 0)) for e in engines),
            *((f"frontend-{i}", int(f.process.pid or 0)) for i, f in enumerate(frontends, 1)),
        ]

        log.info("%s", summary(settings, n))
        log.info("serving gRPC on %s:%d with %d frontends and %s, metrics on %d", settings.host, first.port, n,
                 "the engine" if k == 1 else f"{k} engines", metrics_port)  # fmt: skip
        info: dict[str, Any] = {
            "grpc_port": first.port,
            "metrics_port": metrics_port,
            "workers": n,
            "engines": k,
            "engine_pid": os.getpid(),
            "engine_pids": [os.getpid(), *(e.process.pid for e in engines)],
        }
        if first.http_port is not None:
            info["http_port"] = first.http_port

        def write_ready() -> None:
            if ready_file is not None:
                info["frontend_pids"] = [f.process.pid for f in frontends]
                info["frontend_ports"] = [f.own_port for f in frontends]
                info["frontend_metrics_ports"] = [f.metrics_port for f in frontends]  # private: the engine's token
                write_ready_file(ready_file, info)

        write_ready()
        respawns, window = settings.frontend_restarts, settings.frontend_restart_window_seconds
        deaths: list[float] = []  # when frontends died, within the last `window` seconds
        last_round = time.monotonic()
        while not stop.is_set() and not code:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            lost = next((e for e in engines if not e.process.is_alive()), None)
            if lost is not None and not stop.is_set():
                # Its sessions and sequences are gone and no other engine may serve their ids: stop, for the
                # orchestrator to restart the whole server (as a lost single process would be).
                log.error("engine %d exited (code %s); stopping the server", lost.index + 1, lost.process.exitcode)
                code = 1
                break
            now = time.monotonic()
            if settings.frontend_silent_seconds and now - last_round < SUPERVISOR_STALL_SECONDS:
                heard = engine.heard()
                for hung in _hung(frontends, heard, now, settings.frontend_silent_seconds):
                    log.error(
                        "frontend %d (pid %s) has sent nothing for %.0f s (stopped or wedged; FRONTEND_SILENT_SECONDS "
                        "%g): killing it", hung.index + 1, hung.process.pid, now - _last_word(hung, heard),
                        settings.frontend_silent_seconds,
                    )  # fmt: skip
                    hung.process.kill()  # (SIGKILL ends a stopped process too) replaced below once it is gone
                    await asyncio.to_thread(hung.process.join, 5)
            last_round = now
            for i, gone in enumerate(frontends):
                if gone.process.is_alive() or stop.is_set():
                    continue
                now = loop.time()
                deaths = [t for t in deaths if now - t < window] + [now]
                which = f"frontend {gone.index + 1} exited (code {gone.process.exitcode})"
                if len(deaths) > respawns:
                    log.error(
                        "%s (%d frontend exits within %gs, FRONTEND_RESTARTS %d); stopping the server", which,
                        len(deaths), window, respawns,
                    )  # fmt: skip
                    code = 1
                    break
                log.error("%s; starting a new one (its calls in flight failed; sessions live on)", which)
                metrics.frontend_restarts.inc()
                collector.retire(gone.metrics_port)  # its counts so far stay in the sums
                try:
                    frontends[i] = await _spawn(settings, gone.index, first.port, sockets, token, share=True)
                except RuntimeError as exc:
                    log.error("%s; stopping the server", exc)
                    code = 1
                    break
                write_ready()
        log.info("draining %d frontends (grace %.1fs)", len(frontends), settings.grace_seconds)
    except BaseException:
        code = 1  # a start that failed (the error follows, from the command): the log must not read "exit code 0"
        raise
    finally:
        await _stop_all(frontends, settings.grace_seconds + 10)  # (the engines still answer their drain)
        await _stop_all(engines, 30)
        if http is not None:
            http.stop()
        await engine.stop()
        await dataplane.stop()
        shutil.rmtree(folder, ignore_errors=True)  # (with what frontends that died left in it)
        log.info("seqserve stopped (exit code %d)", code)
    return code


def _last_word(frontend: Frontend, heard: Mapping[int, float]) -> float:
    """When ``frontend`` last sent its engine anything (``time.monotonic``): the time it started serving if never,
    or if its connection is gone (a frontend without one fails every call)."""
    return max(heard.get(int(frontend.process.pid or 0), frontend.started), frontend.started)


def _hung(frontends: Sequence[Frontend], heard: Mapping[int, float], now: float, limit: float) -> list[Frontend]:
    """The live frontends that have sent nothing for ``limit`` seconds. Each one's event loop sends a heartbeat
    every second (``_beat``, whatever its calls wait for), so only a frontend whose event loop does not run
    (SIGSTOP, a wedge, a call that never returns control) is silent that long. The caller skips a round that comes
    late (its own loop stalled: its frontends' words then wait unread, and every one would look silent)."""
    return [f for f in frontends if now - _last_word(f, heard) >= limit and f.process.is_alive()]


def _start(target: Any, args: tuple[Any, ...], name: str) -> tuple[BaseProcess, Connection]:
    """A spawned process running ``target(*args, conn)``; returns it and the end of the pipe it reports on."""
    ctx = mp.get_context("spawn")  # a fresh interpreter: no gRPC state crosses a fork
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=target, args=(*args, child), name=name, daemon=False)
    start_without_sigint(process)
    child.close()
    return process, parent


async def _report(process: BaseProcess, parent: Connection, what: str) -> dict[str, Any]:
    """What a started process reports once it serves; RuntimeError when it does not start."""
    ok = await asyncio.to_thread(parent.poll, START_TIMEOUT)
    if not ok:
        process.kill()
        raise RuntimeError(f"{what} did not start within {START_TIMEOUT:g}s (exit code {process.exitcode})")
    try:
        report: dict[str, Any] = parent.recv()
    except EOFError:
        process.join(5)
        raise RuntimeError(f"{what} failed to start (exit code {process.exitcode}); see its log") from None
    return report


async def _spawn(
    settings: Settings, index: int, port: int, sockets: list[str], token: str, share: bool = False
) -> Frontend:
    """Frontend ``index`` on ``port``; ``share``: a port the other frontends listen on (a replacement's)."""
    values = settings.model_dump() | {"port": port}
    process, parent = _start(
        frontend_main,
        (values, index, sockets, token, share),
        f"seqserve-frontend-{index + 1}",  # frontend-1..N, as in the metrics and the logs
    )
    frontend = Frontend(index, process, parent)
    report = await _report(process, parent, f"frontend {index + 1}")
    frontend.port, frontend.own_port, frontend.metrics_port = report["port"], report["own_port"], report["metrics_port"]
    frontend.http_port = report["http_port"]
    frontend.started = time.monotonic()  # (its silence counts from here: starting took what it took)
    return frontend


def start_without_sigint(process: BaseProcess) -> None:
    """Starts ``process`` with SIGINT blocked in it for good. A terminal's Ctrl-C goes to the whole process group:
    a frontend must not die of it half-started (a traceback while it imports, "frontend N failed to start"); the
    engine stops every frontend itself (SIGTERM). A signal mask is inherited through fork and exec. Here SIGINT is
    only blocked in this thread while the child starts, never ignored: a Ctrl-C that comes meanwhile still stops
    the engine (it was ignored, and lost, when it came in that window)."""
    # multiprocessing starts its resource tracker with the first process, and unblocks SIGINT after doing so:
    # started before the block, it cannot undo it.
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


async def _stop_all(processes: Sequence[Frontend | Engine], timeout: float) -> None:
    for f in processes:
        if f.process.is_alive():
            f.process.terminate()  # SIGTERM: a frontend turns NOT_SERVING, drains, exits; an engine stops
    for f in processes:
        await asyncio.to_thread(f.process.join, timeout)
        if f.process.is_alive():
            what = "engine" if isinstance(f, Engine) else "frontend"
            log.warning("%s %d did not stop in %.0fs; killing it", what, f.index + 1, timeout)
            f.process.kill()
            await asyncio.to_thread(f.process.join, 5)
