"""``seqserve check``: what ``seqserve serve`` would find wrong with its settings, found without serving.

A server whose model fails to load still starts (its health says NOT_SERVING for what it lacks), and one whose
session store is down starts too; that is right for a server, and wrong for a deployment pipeline, which wants
to hear about a bad model folder before the rollout, not from a readiness probe after it. This runs the same
code ``serve`` runs at start, with the same settings (flags and ``SEQSERVE_*``), and reports each part:

- **settings**: every ``SEQSERVE_*`` variable that is not a setting (a typo ``serve`` only warns about);
- **host**: the address to listen on is this machine's (a name that resolves to one of its addresses);
- **ports**: each port is free now (a warning when not: ``serve`` would fail to start, unless what holds it, maybe
  the server being checked, stops first);
- **auth**: the API keys load (``api_keys`` file or pairs, ``api_key``), as principals;
- **tls**: the certificate, key and client CA load as a server context, and how long the certificate has left;
- **plugins**: each ``--plugin`` module imports;
- **device**: ONNX Runtime offers the device's providers (``device=cuda`` needs a CUDA build of it); the models are
  not loaded when it does not;
- **model**: each version in the repository (or in ``load_models``) loads as the registry loads it: manifest,
  sha256, ONNX Runtime session on the chosen device, the task's own checks and start;
- **sessions**: the session store answers (Redis: a PING through the configured client); a warning for each
  model version none of whose sessions fits in ``max_session_bytes`` (every create refused) or, with Redis, in
  ``session_cache_bytes`` (each read from Redis again at every step after an idle moment).

Nothing listens on a port, so it runs beside the server it checks for (an init container, a CI job over a new
model version, a shell before a restart). Each part is ``ok``, ``warn`` (serves, but look: a misspelt variable, a
certificate with fewer than 14 days left, a store too small for one session) or ``FAIL``; the exit status is 1
when any part fails, else 0.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from service.errors import SeqServeError
from service.settings import Settings, misspelt

EXPIRY_WARNING_DAYS = 14  # as the SeqServeCertificateExpiresSoon alert


OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Finding:
    part: str  # settings, host, ports, auth, tls, plugins, device, model, sessions
    name: str  # what was checked: a model's name/version, a variable, a file
    status: str  # OK, WARN or FAIL
    detail: str

    @property
    def ok(self) -> bool:
        """Serving would work (a warning included)."""
        return self.status != FAIL

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def check(settings: Settings) -> list[Finding]:
    """Every part ``serve`` sets up at start, checked in the order it does."""
    found = [Finding("settings", name, WARN, f"not a setting, ignored; did you mean {meant}?") for name, meant in
             misspelt(os.environ)]  # fmt: skip
    found.append(_host(settings))
    if all(f.ok for f in found if f.part == "host"):
        found += _ports(settings)
    found.append(_auth(settings))
    found.append(_tls(settings))
    found += _plugins(settings)
    found.append(_device(settings))
    if all(f.ok for f in found if f.part in ("plugins", "device")):  # (a plugin may register a model's task)
        found += await _models(settings)
    found.append(await _sessions(settings))
    return found


def refuse_unservable(settings: Settings) -> None:
    """What ``serve`` checks before any process starts, as ``check`` reports it: the host and the device.
    RuntimeError with the first part that fails (its finding's text)."""
    for finding in (_host(settings), _device(settings)):
        if not finding.ok:
            raise RuntimeError(finding.detail)


def _host(settings: Settings) -> Finding:
    """The address serve listens on is this machine's (its ports are not tried: serve may be running)."""
    from service.api.server import check_host

    try:
        check_host(settings.host)
    except RuntimeError as exc:
        return Finding("host", settings.host, FAIL, str(exc))
    return Finding("host", settings.host, OK, "an address of this machine")


def _auth(settings: Settings) -> Finding:
    from service.api.principals import load_keys

    try:
        keys = load_keys(settings)
    except (ValueError, OSError) as exc:
        return Finding("auth", "api keys", FAIL, str(exc))
    if not keys:
        if settings.admin_principals and settings.tls_client_ca is None:
            return Finding(
                "auth", "admin principals", WARN, f"admin_principals ({', '.join(settings.admin_principals)}) has no "
                "effect: without API keys (SEQSERVE_API_KEYS) or client certificates (SEQSERVE_TLS_CLIENT_CA) every "
                "caller is the one anonymous principal, which may do what any caller may",
            )  # fmt: skip
        return Finding("auth", "api keys", OK, "none: every caller is one principal")
    return Finding("auth", "api keys", OK, f"{len(keys)} principals: {', '.join(sorted(keys))}")


def _ports(settings: Settings) -> list[Finding]:
    """Each port serve would listen on, free now or not (a warning: serve may be running, and stop first)."""
    from service.api.server import PORT_SETTINGS, check_free

    found = []
    for name, setting in PORT_SETTINGS.items():
        port = getattr(settings, name)
        if not port:
            continue  # (0: a free port at start; None: no REST port)
        try:
            check_free(settings.host, port, setting)
        except RuntimeError as exc:
            found.append(Finding("ports", f"{name} {port}", WARN, f"in use now: serve would fail to start ({exc})"))
        else:
            found.append(Finding("ports", f"{name} {port}", OK, "free"))
    return found


def _tls(settings: Settings) -> Finding:
    from service.api import tls

    try:
        loaded = tls.files(settings)
    except RuntimeError as exc:
        return Finding("tls", str(settings.tls_cert), FAIL, str(exc))
    if loaded is None:
        return Finding("tls", "-", OK, "off (plaintext)")
    clients = "client certificates required" if loaded.client_certificates else "no client certificates"
    if loaded.expires_at is None:
        return Finding("tls", str(loaded.cert), WARN, f"loads ({clients}); its expiry could not be read")
    days = (loaded.expires_at - time.time()) / 86400
    status, detail = OK, f"expires in {days:.1f} days ({clients})"
    if days <= 0:
        status, detail = FAIL, f"expired {-days:.1f} days ago; renew it"
    elif days < EXPIRY_WARNING_DAYS:
        status, detail = WARN, detail + "; renew it"
    return Finding("tls", str(loaded.cert), status, f"{loaded.subject or '(subject not readable)'}: {detail}")


def _plugins(settings: Settings) -> list[Finding]:
    from service.core.tasks import load_plugins

    found = []
    for module in settings.plugins:
        try:
            load_plugins([module])
        except ValueError as exc:  # it does not import (load_plugins says why)
            found.append(Finding("plugins", module, FAIL, str(exc)))
        except Exception as exc:  # anything the module raises while it registers
            found.append(Finding("plugins", module, FAIL, f"{type(exc).__name__}: {exc}"))
        else:
            found.append(Finding("plugins", module, OK, "imported"))
    return found


def _device(settings: Settings) -> Finding:
    """The execution device: ONNX Runtime's providers for it (``device=cuda`` without a CUDA build fails)."""
    from service.core.runtime import select_providers

    try:
        providers = select_providers(settings.device)
    except SeqServeError as exc:
        return Finding("device", settings.device, FAIL, exc.message)
    return Finding("device", settings.device, OK, f"ONNX Runtime providers {', '.join(providers)}")


async def _models(settings: Settings) -> list[Finding]:
    from service.core.manifest import VERSION_RULE
    from service.core.registry import ModelRegistry, not_a_folder
    from service.core.sessions.manager import unfit_sessions
    from service.metrics import Metrics

    registry = ModelRegistry(settings, Metrics(runtime_collectors=False))
    found: list[Finding] = []
    try:
        await registry.start()
    except (RuntimeError, ValueError) as exc:  # load_models names a model the repository lacks, a bad device
        found.append(Finding("model", "-", FAIL, str(exc)))
    try:
        for entry in sorted(registry.versions(), key=lambda e: (e.name, -e.version)):
            info = entry.info()
            if info.ready:
                detail = f"{info.task} on {info.provider}, loaded in {info.load_seconds:.2f}s"
                if entry.warmed:
                    detail += f", ran on samples of {' and '.join(map(str, entry.warmed))} row(s)"
                if entry.serving:  # its model's serving.json
                    detail += ", serving.json: " + ", ".join(f"{k}={v}" for k, v in entry.serving.items())
                found.append(Finding("model", entry.label, OK, detail))
                if entry.task.stateful:  # the engine with the smallest share of the store's limits
                    shard = (settings.engines - 1, settings.engines)
                    for unfit in unfit_sessions(settings, shard, entry.label, entry.task.session_nbytes()):
                        found.append(Finding("sessions", entry.label, WARN, unfit))
            else:
                found.append(Finding("model", entry.label, FAIL, info.error or "not ready"))
        for name, (policy, versions) in sorted(registry.outside().items()):
            for v in sorted(versions, reverse=True):
                if registry.get(name, v) is None:  # (one kept serving while no chosen version is ready is above)
                    found.append(
                        Finding("model", f"{name}/{v}", OK, f"not served: outside its version_policy {policy}")
                    )
        if not found:
            problem = not_a_folder(settings.models)
            why = (
                f"no model versions in {settings.models}: nothing to serve"
                if problem is None
                else f"the model repository {settings.models} {problem}: point --models (SEQSERVE_MODELS) at the "
                "folder of model folders"
            )
            found.append(Finding("model", "-", FAIL, why))
        for stray in registry.strays():  # (serve warns of each: so does the check)
            name = f"{stray.parent.name}/{stray.name}"
            found.append(Finding("model", name, WARN, f"ignored: a version folder's name must be {VERSION_RULE}"))
    finally:
        await registry.stop()
    return found


async def _sessions(settings: Settings) -> Finding:
    from service.core.sessions import open_store, redact

    name = redact(settings.session_store)
    try:
        store = open_store(settings.session_store, settings)
    except ValueError as exc:
        return Finding("sessions", name, FAIL, str(exc))
    advice = getattr(store, "advice", None)  # (an optional method of a store: the Redis store's)
    try:
        problem = await store.check()
        warning = await advice() if problem is None and advice is not None else None
    finally:
        await store.close()
    if warning:
        return Finding("sessions", name, WARN, f"answers, but {warning}")
    return Finding("sessions", name, OK if problem is None else FAIL, "answers" if problem is None else problem)


def report(found: list[Finding]) -> str:
    """One line per finding, aligned, then the verdict."""
    width = max(len(f.name) for f in found)
    lines = [f"{f.status.upper() if f.status == FAIL else f.status:<4}  {f.part:<8}  {f.name:<{width}}  {f.detail}"
             for f in found]  # fmt: skip
    bad, warned = sum(f.status == FAIL for f in found), sum(f.status == WARN for f in found)
    verdict = f"{bad} failed" if bad else "ready to serve"
    lines.append(f"{verdict} ({len(found)} checks, {warned} warning{'' if warned == 1 else 's'})")
    return "\n".join(lines)
