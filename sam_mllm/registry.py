"""One registry for every named thing a config can refer to: models, tasks, datasets, metrics.

Configs name things (``model: sam``); code looks them up here. Registration happens at import
time of the module that defines the thing, so :func:`get` imports the built-in modules first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from sam_mllm.errors import UserError

# mmlink_*: the stages of the MmLINK synthesis pipeline (sam_mllm.data.mmlink).
MMLINK_STAGE_KINDS = tuple(f"mmlink_{s}" for s in ("source", "segmenter", "compositor", "writer", "inpainter",
                                                   "describer", "refiner", "qc"))
KINDS = ("model", "task", "dataset", "metric", *MMLINK_STAGE_KINDS)

# Modules whose import registers the built-in entries; imported lazily so that
# ``import sam_mllm.registry`` stays cheap and free of cycles.
_BUILTIN_MODULES = {
    "model": ("sam_mllm.models",),
    "task": ("sam_mllm.tasks",),
    "dataset": ("sam_mllm.data.datasets",),
    "metric": ("sam_mllm.metrics",),
    **{kind: ("sam_mllm.data.mmlink.stages", "sam_mllm.data.mmlink.models") for kind in MMLINK_STAGE_KINDS},
}

_entries: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_loaded: set[str] = set()

T = TypeVar("T")


class RegistryError(UserError, KeyError):
    """An unknown kind, an unknown name or a duplicate registration."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise RegistryError(f"unknown registry kind {kind!r}; kinds are: {', '.join(KINDS)}")


def register(kind: str, name: str) -> Callable[[T], T]:
    """Decorator: ``@register("model", "sam")`` puts the object under that name."""
    _check_kind(kind)

    def deco(obj: T) -> T:
        table = _entries[kind]
        if name in table and table[name] is not obj:
            raise RegistryError(
                f"{kind} {name!r} is already registered (by {_describe(table[name])}); "
                f"registered {kind}s: {', '.join(sorted(table))}"
            )
        table[name] = obj
        return obj

    return deco


def _describe(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _load_builtins(kind: str) -> None:
    if kind in _loaded:
        return
    _loaded.add(kind)
    for module in _BUILTIN_MODULES[kind]:
        importlib.import_module(module)


def get(kind: str, name: str) -> Any:
    """Return the object registered as ``name``; an unknown name lists what exists."""
    _check_kind(kind)
    _load_builtins(kind)
    table = _entries[kind]
    if name not in table:
        raise RegistryError(
            f"unknown {kind} {name!r}; registered {kind}s: {', '.join(sorted(table)) or '(none)'}"
        )
    return table[name]


def names(kind: str) -> list[str]:
    """Sorted names registered under ``kind``."""
    _check_kind(kind)
    _load_builtins(kind)
    return sorted(_entries[kind])
