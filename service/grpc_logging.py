"""gRPC's C core writes its own log lines straight to stderr, past ``SEQSERVE_LOG_LEVEL`` and ``LOG_FORMAT=json``:
at its default verbosity one INFO line per failed TLS handshake, so any peer could fill the log before
authenticating. The server's entry point imports this before gRPC, so only the core's errors are written, unless
``GRPC_VERBOSITY`` is set already (``GRPC_VERBOSITY=INFO`` brings the rest back, for debugging)."""

import os

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
