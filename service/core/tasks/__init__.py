"""Tasks as plugins: one module per task, each registering one ``Task`` subclass under its name.

The registry picks a model's task from ``manifest.task`` through ``TASKS``; nothing else branches on task
names. A plugin module outside this package registers its task the same way and is imported at start-up
(``SEQSERVE_PLUGINS=package.module``).
"""

from __future__ import annotations

import importlib

from service.core.tasks import charlm, forecast, sentiment
from service.core.tasks.base import TASKS, Task, register_task, task_class


def load_plugins(modules: list[str]) -> None:
    """Imports each module (which registers its tasks or stores); ValueError naming a module that fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            hint = ""
            missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
            if missing is not None and f"{name}.".startswith(f"{missing}."):
                hint = (  # the plugin itself is not found (not a module it imports): where Python looks for it
                    "; a plugin is imported by its module name: install its package into this Python, or put the "
                    "folder holding it on PYTHONPATH (the current folder is not searched)"
                )
            raise ValueError(f"plugin module {name!r} could not be imported: {exc}{hint}") from exc
        except Exception as exc:  # (a SyntaxError printed a traceback; an error raised at import named no module)
            where = f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
            raise ValueError(
                f"plugin module {name!r} failed while it was imported: {type(exc).__name__}: {exc}{where}"
            ) from exc


BUILTIN = (charlm.CharLMTask, forecast.ForecastTask, sentiment.SentimentTask)
__all__ = ["BUILTIN", "TASKS", "Task", "load_plugins", "register_task", "task_class"]
