"""KServe v2 REST (HTTP/JSON) on a port of its own, as Triton and KServe serve it beside gRPC: ``curl`` and
``tritonclient.http`` work (JSON tensors and Triton's binary tensor extension).

A gateway, as grpc-gateway and Envoy's JSON transcoder are: each HTTP request becomes the one KServe gRPC call
it means, sent to this server's own gRPC port over loopback, and the answer (or the gRPC status) comes back as
JSON. So a REST call gets exactly what a gRPC call gets: the same API-key check, quotas, limits, validation,
sessions and sequences (a sequence may mix REST and gRPC requests), and the same metrics. The caller's
``Authorization`` and ``x-request-id`` headers go along; the answer carries ``X-Request-Id``. A status maps to
HTTP as Google's API guide and grpc-gateway map it (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429 with ``Retry-After`` when the refusal says when, UNAVAILABLE 503, ...), with the body
``{"error": "<the message>"}`` that tritonclient reads.

It runs on the connection-limited HTTP server of ``service.api.http`` (a thread per connection, at most
``http_max_connections``, a request may take at most three idle timeouts from its first byte to its answer).
gRPC stays the fast path: REST costs one more hop per request. ModelStreamInfer has no REST form (Triton's
neither); a char LM's streamed completion has Triton's generate extension instead (``service.api.generate``:
``/generate``, and ``/generate_stream`` as Server-Sent Events), and OpenAI's completions API
(``service.api.completions``: ``/v1/completions``, ``/v1/models``). Web pages of the origins in ``cors_origins`` may
call it from a browser (CORS: preflights answered here, never forwarded).

With TLS (``SEQSERVE_TLS_CERT``) this port speaks TLS only, with the gRPC port's certificate, and the hop goes over
a Unix socket in a folder only the server's user can enter (the gRPC port takes TLS only). With a client CA
(mTLS) every request but a CORS preflight needs a verified client certificate (403 without one, saying so); without
API keys its subject is the caller's principal, spelled as the gRPC port spells it, so a caller is one principal
on both ports (``service.api.principals.subject_of_peercert``); the gateway vouches for it with a token that
exists only inside this process.
"""

from __future__ import annotations

from service.api.rest.common import route_of
from service.api.rest.convert import message_json
from service.api.rest.gateway import RestGateway

__all__ = ["RestGateway", "message_json", "route_of"]
