"""A hostile campaign against a real ``seqserve serve`` process: >= 10,000 malformed, oversized, forged and
racing requests over every RPC of both APIs, from several threads and two principals, while a watcher measures
``ServerLive`` latency. Prints the count of every status code; exits 1 on any UNKNOWN or INTERNAL (client-seen
or in the server's own RPC metrics), a hang, or a control session that changed.

    python -m bench.hostile [--models models] [--requests 12000] [--threads 8] [--seed 0]
                            [--env SEQSERVE_NAME=VALUE ...]

``--env`` sets the server's settings over the campaign's own (e.g. ``SEQSERVE_ENGINES=2`` with a Redis
``SEQSERVE_SESSION_STORE``: the campaign's session quota needs a shared store with several engines).

What it sends (each kind many times, shuffled): raw corrupt bytes and invalid UTF-8 to every method; model
versions like "²" and "١"; NaN, infinite and extreme sampling values; v2 shapes of 2**62 and 70 dimensions,
wrong datatypes, lying raw sizes; 7,000-character and 15 MiB ids; 480,000-row forecasts; control characters in
names; cross-principal session and sequence access; forks, deletes and cancels racing on shared sessions;
cancelled Complete, Suggest and ModelStreamInfer streams; trace settings and load configs that must be refused,
from an admin and from a non-admin; and valid traffic in between.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from bench import cli
from bench.launch import LiveWatcher, metric_families, rss_mib, serve
from service.api.gen.inference import grpc_service_pb2 as pb
from service.api.gen.seqserve.v1 import (
    autocomplete_pb2,
    common_pb2,
    forecast_pb2,
    sentiment_pb2,
    sessions_pb2,
)
from service.client import Client

KEYS = {"alice": "alice-hostile-key-000000", "bob": "bob-hostile-key-0000000000"}
KS = "/inference.GRPCInferenceService/"
Input = pb.ModelInferRequest.InferInputTensor
Call = Callable[["Campaign"], str]  # one request; returns the status code name


def _text(text: str | bytes, name: str = "TEXT", shape: list[int] | None = None) -> Input:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return Input(name=name, datatype="BYTES", shape=shape or [1], contents=pb.InferTensorContents(bytes_contents=[raw]))


def _infer(model: str, *inputs: Input, version: str = "", **params: Any) -> bytes:
    r = pb.ModelInferRequest(model_name=model, model_version=version, inputs=list(inputs))
    for k, v in params.items():
        p = r.parameters[k]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int):
            p.int64_param = v
        else:
            p.string_param = v
    return r.SerializeToString()


class Campaign:
    def __init__(self, target: str, seed: int) -> None:
        self.target = target
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.insecure_channel(target, options=opts)
        self.rng = random.Random(seed)
        self.alice = Client(target, api_key=KEYS["alice"], timeout=30)
        self.bob = Client(target, api_key=KEYS["bob"], timeout=30)
        self.shared = [self.alice.create_session("charlm").id for _ in range(8)]  # what the races fight over
        self.control = self.alice.create_session("charlm").id
        self.alice.suggest_once(self.control, "To be, or not", n=1, max_chars=1)
        self.expected = self.look()

    def look(self) -> tuple[int, list[tuple[str, float]]]:
        fork = self.alice.fork_session(self.control).id
        s = self.alice.suggest_once(fork, "", n=3, max_chars=3)
        self.alice.delete_session(fork)
        return self.alice.get_session(self.control).steps, [(x.text, round(x.logprob, 4)) for x in s.suggestions]

    def md(self, who: str = "alice") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {KEYS[who]}"),)

    # --- transports -------------------------------------------------------------------------------------
    def unary(self, method: str, payload: bytes, who: str = "alice", timeout: float = 30) -> str:
        try:
            self.channel.unary_unary(method)(payload, timeout=timeout, metadata=self.md(who))
        except grpc.RpcError as err:
            return str(err.code().name)
        return "OK"

    def stream(self, method: str, payloads: list[bytes], cancel_after: int | None = None, who: str = "alice") -> str:
        """A client stream (or, with one payload and a unary_stream method, a server stream); ``cancel_after``
        responses, then the client cancels."""
        kw: dict[str, Any] = {"timeout": 60, "metadata": self.md(who)}
        if method.endswith(("Complete",)):
            call = self.channel.unary_stream(method)(payloads[0], **kw)
        else:
            call = self.channel.stream_stream(method)(iter(payloads), **kw)
        try:
            for n, _ in enumerate(call, start=1):
                if cancel_after is not None and n >= cancel_after:
                    call.cancel()
                    return "CANCELLED(client)"
        except grpc.RpcError as err:
            code = str(err.code().name)
            return "CANCELLED(client)" if code == "CANCELLED" and cancel_after is not None else code
        return "OK"


# --- the kinds of request ---------------------------------------------------------------------------------------
METHODS = [
    "/seqserve.v1.Sentiment/Classify",
    "/seqserve.v1.Forecast/Predict",
    "/seqserve.v1.Forecast/Observe",
    "/seqserve.v1.Sessions/Create",
    "/seqserve.v1.Sessions/Get",
    "/seqserve.v1.Sessions/Fork",
    "/seqserve.v1.Sessions/Delete",
    *[KS + m for m in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                       "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelUnload")],
    "/grpc.health.v1.Health/Check",
]  # fmt: skip
CORRUPT = [b"\n\x01\xff", b"\xff" * 9, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05ab", b"\x08" + b"\xff" * 10]
WEIRD = ["²", "١", "-1", "0", "1.5", " 1", "9" * 40, "x\n2020-01-01 00:00:00,000 ERROR FORGED", "\x1b[2J"]


def corrupt(c: Campaign) -> str:
    method = c.rng.choice(METHODS)
    payload = c.rng.choice([*CORRUPT, bytes(c.rng.randrange(256) for _ in range(c.rng.randrange(1, 40)))])
    return c.unary(method, payload)


def bad_utf8(c: Campaign) -> str:
    msg = sessions_pb2.GetSessionRequest(session_id="X").SerializeToString().replace(b"X", b"\xc3\x28")
    return c.unary("/seqserve.v1.Sessions/Get", msg)


def weird_version(c: Campaign) -> str:
    v = c.rng.choice(WEIRD)
    kind = c.rng.randrange(4)
    if kind == 0:
        return c.unary(KS + "ModelInfer", _infer("charlm", _text("ab"), version=v))
    if kind == 1:
        return c.unary(KS + "ModelMetadata", pb.ModelMetadataRequest(name="charlm", version=v).SerializeToString())
    if kind == 2:
        return c.unary(KS + "ModelReady", pb.ModelReadyRequest(name="charlm", version=v).SerializeToString())
    return c.unary(KS + "ModelStatistics", pb.ModelStatisticsRequest(name="charlm", version=v).SerializeToString())


def sampling(c: Campaign) -> str:
    pick = c.rng.choice
    r = autocomplete_pb2.CompleteRequest(prompt=pick(["", "a", "ROMEO:", "\x00\x01", "é"]))
    r.max_chars = pick([-1, 0, 3, 2001])
    extreme = pick([-1, 2**31 - 1, 0])
    field = pick(["seed", "top_k", "temperature"])
    if field == "temperature":
        r.temperature = pick([float("nan"), float("inf"), -1.0, 1e30])
    else:
        setattr(r, field, extreme)
    return c.stream("/seqserve.v1.Autocomplete/Complete", [r.SerializeToString()])


def shapes(c: Campaign) -> str:
    pick = c.rng.choice
    shape = pick([[2**62, 0], [1] * 70, [-1], [0], [2**31], [3, 3]])
    t = Input(name=pick(["TEXT", "HISTORY", "X" * 500]), datatype=pick(["BYTES", "FP32", "FP16", "Q"]), shape=shape)
    r = pb.ModelInferRequest(model_name=pick(["charlm", "sentiment", "forecaster"]), inputs=[t])
    if c.rng.random() < 0.5:
        r.raw_input_contents.append(bytes(c.rng.randrange(64)))
    return c.unary(KS + "ModelInfer", r.SerializeToString())


def long_ids(c: Campaign) -> str:
    n = c.rng.choice([257, 7000, 60_000])
    return c.unary("/seqserve.v1.Sessions/Get", _get("s" * n))


def huge(c: Campaign) -> str:
    kind = c.rng.randrange(3)
    if kind == 0:
        rows = [common_pb2.Row(values=[1.0] * 7)] * 480_000
        return c.unary("/seqserve.v1.Forecast/Predict", forecast_pb2.PredictRequest(history=rows).SerializeToString())
    if kind == 1:
        payload = sessions_pb2.GetSessionRequest(session_id="s" * (15 << 20)).SerializeToString()
        return c.unary("/seqserve.v1.Sessions/Get", payload)
    texts = sentiment_pb2.ClassifyRequest(texts=[""] * 3_000_000).SerializeToString()
    return c.unary("/seqserve.v1.Sentiment/Classify", texts)


def forged_names(c: Campaign) -> str:
    name = c.rng.choice(WEIRD) * c.rng.choice([1, 50])
    return c.unary(KS + "ModelInfer", _infer("charlm", _text("a", name=name)))


def _get(sid: str) -> bytes:
    return sessions_pb2.GetSessionRequest(session_id=sid).SerializeToString()


def cross_principal(c: Campaign) -> str:
    sid = c.rng.choice(c.shared)
    kind = c.rng.randrange(3)
    if kind == 0:
        return c.unary("/seqserve.v1.Sessions/Get", _get(sid), "bob")
    if kind == 1:
        delete = sessions_pb2.DeleteSessionRequest(session_id=sid).SerializeToString()
        return c.unary("/seqserve.v1.Sessions/Delete", delete, "bob")
    start = _infer("charlm", _text("z"), sequence_id=c.rng.randrange(1, 5), sequence_start=True)
    return c.unary(KS + "ModelInfer", start, "bob")


def sequences(c: Campaign) -> str:
    pick = c.rng.choice
    params: list[dict[str, Any]] = [
        {"sequence_id": 3},
        {"sequence_id": 3, "sequence_end": True},
        {"sequence_id": -5},
        {"sequence_id": "q" * 300, "sequence_start": True},
        {"sequence_start": True},
        {"sequence_id": pick(c.shared), "sequence_start": True},
        {"sequence_id": 4, "sequence_start": 1},
    ]
    return c.unary(KS + "ModelInfer", _infer(pick(["charlm", "forecaster", "sentiment"]), _text("ab"), **pick(params)))


def races(c: Campaign) -> str:
    sid, kind = c.rng.choice(c.shared), c.rng.randrange(5)
    if kind == 0:
        fork = sessions_pb2.ForkSessionRequest(session_id=sid).SerializeToString()
        return c.unary("/seqserve.v1.Sessions/Fork", fork)
    if kind == 1:
        ev = autocomplete_pb2.SuggestRequest(session_id=sid, appended="ab", n=2, max_chars=2).SerializeToString()
        return c.stream("/seqserve.v1.Autocomplete/Suggest", [ev, ev])
    if kind == 2:
        rows = forecast_pb2.ObserveRequest(session_id=sid, rows=[common_pb2.Row(values=[1.0] * 7)])
        return c.unary("/seqserve.v1.Forecast/Observe", rows.SerializeToString())
    if kind == 3:
        more = autocomplete_pb2.CompleteRequest(prompt="a", session_id=sid, max_chars=5, seed=1)
        return c.stream("/seqserve.v1.Autocomplete/Complete", [more.SerializeToString()])
    return c.unary("/seqserve.v1.Sessions/Get", _get(sid))


def cancels(c: Campaign) -> str:
    kind = c.rng.randrange(3)
    if kind == 0:
        sid = c.rng.choice(c.shared)
        r = autocomplete_pb2.CompleteRequest(prompt="a", session_id=sid, max_chars=400, seed=2).SerializeToString()
        return c.stream("/seqserve.v1.Autocomplete/Complete", [r], cancel_after=c.rng.randrange(1, 6))
    if kind == 1:
        ev = autocomplete_pb2.SuggestRequest(session_id=c.rng.choice(c.shared), appended="x", n=3, max_chars=30)
        return c.stream("/seqserve.v1.Autocomplete/Suggest", [ev.SerializeToString()] * 4, cancel_after=1)
    num = Input(name="NUM_CHARS", datatype="INT32", shape=[1], contents=pb.InferTensorContents(int_contents=[300]))
    return c.stream(KS + "ModelStreamInfer", [_infer("charlm", _text("ab"), num)] * 3, cancel_after=1)


def corrupt_streams(c: Campaign) -> str:
    good = autocomplete_pb2.SuggestRequest(session_id=c.rng.choice(c.shared), appended="a", n=1, max_chars=1)
    method = c.rng.choice(["/seqserve.v1.Autocomplete/Suggest", KS + "ModelStreamInfer"])
    first = good.SerializeToString() if method.endswith("Suggest") else _infer("charlm", _text("a"))
    return c.stream(method, [first, c.rng.choice(CORRUPT)])


def no_key(c: Campaign) -> str:
    try:
        c.channel.unary_unary("/seqserve.v1.Sessions/Get")(b"\n\x01x", timeout=10)
    except grpc.RpcError as err:
        return str(err.code().name)
    return "OK"


TRACE_VALUES = [None, ["OFF"], ["TIMESTAMPS", "OFF"], ["LOUD"], ["-5"], ["1", "2"], ["../../etc/passwd"],
                ["/tmp/seqserve-hostile.json"], ["\x00"], ["9" * 40], ["TENSORS"], ["x" * 5000]]  # fmt: skip
LOAD_CONFIGS = ["{", "[" * 3000, '{"max_batch_size": 8}', '{"instance_group": [{"count": 65}]}', "null",
                '{"dynamic_batching": {"max_queue_delay_microseconds": -1}}', '{"name": "other"}']  # fmt: skip


def bad_settings(c: Campaign) -> str:
    """Trace settings and load configs no server should take (a level on without a file, paths, bad numbers,
    configs that change what a load cannot), from an admin and from a principal that is none: each answered with a
    status; nothing a caller sends here turns tracing on or reloads a model."""
    pick = c.rng.choice
    who = pick(["alice", "bob"])  # (alice is an admin)
    if c.rng.random() < 0.5:
        r = pb.TraceSettingRequest(model_name=pick(["", "charlm", "no-such", "\x1b[2J"]))
        for _ in range(c.rng.randrange(1, 4)):
            value = pick(TRACE_VALUES)
            slot = r.settings[pick(["trace_level", "trace_file", "trace_rate", "trace_count", "log_frequency", "x"])]
            slot.value.extend(value or [])
        return c.unary(KS + "TraceSetting", r.SerializeToString(), who=who)
    load = pb.RepositoryModelLoadRequest(model_name=pick(["charlm", "sentiment", "no-such"]))
    load.parameters["config"].string_param = pick(LOAD_CONFIGS)
    return c.unary(KS + "RepositoryModelLoad", load.SerializeToString(), who=who)


def valid(c: Campaign) -> str:
    kind = c.rng.randrange(3)
    if kind == 0:
        return c.unary(
            "/seqserve.v1.Sentiment/Classify", sentiment_pb2.ClassifyRequest(texts=["a fine film"]).SerializeToString()
        )
    if kind == 1:
        return c.unary(KS + "ModelInfer", _infer("charlm", _text("To be")))
    return c.unary(KS + "ServerLive", pb.ServerLiveRequest().SerializeToString())


KINDS: dict[str, tuple[Call, int]] = {  # kind -> (request, share of the campaign in %)
    "corrupt bytes": (corrupt, 14),
    "invalid UTF-8": (bad_utf8, 4),
    "weird versions": (weird_version, 10),
    "sampling extremes": (sampling, 7),
    "absurd shapes": (shapes, 10),
    "long ids": (long_ids, 5),
    "forged names": (forged_names, 5),
    "cross-principal": (cross_principal, 8),
    "sequence abuse": (sequences, 8),
    "session races": (races, 10),
    "client cancels": (cancels, 5),
    "corrupt stream messages": (corrupt_streams, 4),
    "no credentials": (no_key, 2),
    "bad trace settings and load configs": (bad_settings, 4),
    "valid": (valid, 8),
}
HUGE_REQUESTS = 24  # 15 MiB ids, 480,000-row forecasts, 3,000,000-text batches


def plan(total: int, rng: random.Random) -> list[tuple[str, Call]]:
    weights = sum(share for _, share in KINDS.values())
    out = [(kind, call) for kind, (call, share) in KINDS.items() for _ in range(total * share // weights)]
    out += [("huge requests", huge)] * HUGE_REQUESTS
    while len(out) < total:
        out.append(("valid", valid))
    rng.shuffle(out)
    return out


def server_codes(metrics_port: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    for family in metric_families(metrics_port):
        if family.name == "seqserve_rpc_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["code"]] += int(sample.value)
    return counts


def run(target: str, metrics_port: int, pid: int, requests: int, threads: int, seed: int) -> dict[str, Any]:
    """Runs the campaign against a server; the summary as a dict."""
    campaign = Campaign(target, seed)
    work = plan(requests, campaign.rng)
    by_code: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    watcher = LiveWatcher(target, 0.02, (("authorization", f"Bearer {KEYS['bob']}"),))
    started = time.perf_counter()

    def one(item: tuple[str, Call]) -> None:
        kind, call = item
        code = call(campaign)
        with lock:
            by_code[code] += 1
            by_kind[kind][code] += 1

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, work))
    finally:
        watcher.stop()
    seconds = time.perf_counter() - started
    seen, live_refused = watcher.results()
    live = [took for _, took in seen]
    pc = cli.percentiles(live)
    time.sleep(0.5)  # streams' last metrics
    return {
        "requests": sum(by_code.values()),
        "seconds": round(seconds, 1),
        "codes": dict(by_code.most_common()),
        "kinds": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())},
        "server_codes": dict(server_codes(metrics_port).most_common()),
        "server_live_ms": {
            "p50": round(pc["p50_ms"], 2) if live else None,
            "p99": round(pc["p99_ms"], 1) if live else None,
            "max": round(pc["max_ms"], 1) if live else None,
            "n": len(live),
        },
        "server_live_refused": live_refused,
        "control_unchanged": campaign.look() == campaign.expected,
        "server_rss_mib": round(rss_mib(pid)),
    }


def failed(r: dict[str, Any]) -> list[str]:
    bad = []
    for side in ("codes", "server_codes"):
        for code in ("UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED"):
            if r[side].get(code):
                bad.append(f"{r[side][code]} {code} ({side})")
    if r["server_live_refused"]:
        bad.append("ServerLive refused: " + ", ".join(f"{n} {code}" for code, n in r["server_live_refused"].items()))
    if not r["control_unchanged"]:
        bad.append("the control session changed")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, "hostile.json")
    ap.add_argument("--requests", type=int, default=12_000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    cli.add_settings(ap, "--env", "the server (over the campaign's own)")
    args = ap.parse_args(argv)
    env = {"SEQSERVE_API_KEYS": ",".join(f"{k}:{v}" for k, v in KEYS.items()), "SEQSERVE_LOG_LEVEL": "WARNING",
           "SEQSERVE_MAX_SESSIONS": "5000", "SEQSERVE_QUOTA_SESSIONS": "2000",
           "SEQSERVE_ADMIN_PRINCIPALS": "alice"}  # fmt: skip
    with serve(args.models, env | dict(args.env)) as server:
        result = run(server.target, server.metrics_port, server.pid, args.requests, args.threads, args.seed)
    cli.write_json(args.out, result)
    print(f"hostile campaign: {result['requests']} requests in {result['seconds']}s, {args.threads} threads")
    print("status codes (client side):")
    for code, n in result["codes"].items():
        print(f"  {code:<22}{n:>7}")
    print("server RPC metrics by code:", ", ".join(f"{k}={v}" for k, v in result["server_codes"].items()))
    lv = result["server_live_ms"]
    refused = sum(result["server_live_refused"].values())
    print(f"ServerLive during the campaign (from a process of its own): p50 {lv['p50']} ms, p99 {lv['p99']} ms, "
          f"max {lv['max']} ms ({lv['n']} probes answered, {refused} refused)")  # fmt: skip
    print(f"control session unchanged: {result['control_unchanged']}; server RSS {result['server_rss_mib']} MiB")
    bad = failed(result)
    print("FAILED: " + "; ".join(bad) if bad else "OK: no UNKNOWN, no INTERNAL, no hang")
    return 1 if bad else 0


if __name__ == "__main__":
    cli.run(main)
