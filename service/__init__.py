"""seqserve: stateful serving of recurrent sequence models."""

from service import compiled as _compiled

_compiled.install()  # before any compiled module is imported: stale or unwanted compiled modules are not used
