"""Named groups of state-dict keys, selected by regex.

A group is given as ``REGEX`` (named by the regex itself) or ``NAME=REGEX``. Each regex is
applied with :func:`re.match` to the dotted key, so it is anchored at the start only:
``layer3.*`` selects ``layer3.0.conv1.weight`` but not ``model.layer3.0.conv1.weight``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ckptscope.errors import CkptscopeError

WHOLE_MODEL = "all"
WHOLE_MODEL_PATTERN = ".*"
_NAME = re.compile(r"^[A-Za-z_][\w.\-:]*$")


@dataclass(frozen=True)
class Group:
    """A named set of keys.

    Attributes:
        name: the label in results (``all`` for the whole model).
        pattern: the regex that selected the keys.
        keys: the selected keys, in state-dict order.
    """

    name: str
    pattern: str
    keys: tuple[str, ...]


def parse_group(spec: str) -> tuple[str, str]:
    """Split ``NAME=REGEX`` into (name, regex); a bare ``REGEX`` names itself.

    The text before the first ``=`` is a name only if it looks like one (letters, digits,
    ``_ . - :``), so a regex holding ``=`` or ``(?P<x>...)`` stays whole.
    """
    name, sep, pattern = spec.partition("=")
    if sep and _NAME.match(name) and pattern:
        return name, pattern
    return spec, spec


def normalise_groups(groups: None | str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Return name -> regex from a list of specs, a mapping, or ``None`` (no groups)."""
    if groups is None:
        return {}
    if isinstance(groups, str):
        groups = [groups]
    pairs = (
        list(groups.items()) if isinstance(groups, Mapping) else [parse_group(g) for g in groups]
    )
    out: dict[str, str] = {}
    for name, pattern in pairs:
        if name in out:
            raise CkptscopeError(f"group name {name!r} is given twice; name each group once.")
        if name == WHOLE_MODEL:
            raise CkptscopeError(
                f"group name {WHOLE_MODEL!r} is reserved for the whole-model path; pick another."
            )
        try:
            re.compile(pattern)
        except re.error as err:
            raise CkptscopeError(
                f"group {name!r}: {pattern!r} is not a valid regex ({err})."
            ) from None
        out[name] = pattern
    return out


def resolve_groups(
    keys: Iterable[str],
    groups: Mapping[str, str],
    *,
    full: bool = True,
    source: str = "the checkpoint",
) -> list[Group]:
    """Select each group's keys.

    Args:
        keys: the state-dict keys, in order.
        groups: name -> regex (see :func:`normalise_groups`).
        full: put the whole-model group ``all`` first.
        source: the checkpoint's path, for the hint in the error message.

    Raises:
        CkptscopeError: a group matched no key; the message shows the first keys.
    """
    keys = list(keys)
    out = [Group(WHOLE_MODEL, WHOLE_MODEL_PATTERN, tuple(keys))] if full else []
    for name, pattern in groups.items():
        regex = re.compile(pattern)
        selected = tuple(k for k in keys if regex.match(k))
        if not selected:
            raise CkptscopeError(
                f"group {name!r} (regex {pattern!r}) matched no tensor; keys start with "
                f"{keys[:5]}. List them with `ckptscope inspect {source}`."
            )
        out.append(Group(name, pattern, selected))
    return out
