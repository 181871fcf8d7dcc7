"""The multi-process server: one engine process (models, sessions, batchers) and N gRPC frontends.

``procs`` starts and stops the processes, ``server`` serves the engine's ``CoreDataPlane`` over a Unix socket
(``wire``: the framing and message shapes),
``client`` is the frontends' ``RemoteDataPlane``, ``codec`` the msgpack wire format, ``metrics`` the one
``/metrics`` that sums the frontends' RPC metrics into the engine's.
"""
