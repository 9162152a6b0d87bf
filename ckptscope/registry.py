"""Explicit name -> entry registries, and ``pkg.module:attr`` references to user code."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ckptscope.errors import CkptscopeError

T = TypeVar("T")


def import_object(spec: str, *, what: str) -> object:
    """Import ``attr`` from ``pkg.module`` for a ``pkg.module:attr`` spec.

    Raises:
        CkptscopeError: the module cannot be imported or has no such attribute.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CkptscopeError(f"{what} {spec!r} is not of the form pkg.module:attr.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CkptscopeError(
            f"{what} {spec!r}: cannot import {module_name!r} ({err}); is it installed or on "
            f"PYTHONPATH?"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CkptscopeError(f"{what} {spec!r}: module {module_name!r} has no {attr!r}.")
        obj = getattr(obj, part)
    return obj


def is_import_spec(spec: str) -> bool:
    """True for ``pkg.module:attr`` (a dotted or plain module name, a colon, an attribute)."""
    head, sep, tail = spec.partition(":")
    return bool(
        sep
        and tail
        and head.replace(".", "").replace("_", "").isalnum()
        and tail.replace(".", "").replace("_", "").isalnum()
        and not tail[0].isdigit()
        and ("." in head or "/" not in tail)
    )


class Registry(Generic[T]):
    """Name -> entry, filled by :meth:`register`; registering a name twice raises.

    Args:
        kind: what the entries are, for messages ("adapter", "dataset").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated entry under ``name``."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice.")
            self._entries[name] = entry
            return entry

        return add

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def get(self, name: str) -> T:
        """Return the entry for ``name``, or raise listing the known names."""
        try:
            return self._entries[name]
        except KeyError:
            raise CkptscopeError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._entries))}, or "
                f"pkg.module:attr for your own."
            ) from None
