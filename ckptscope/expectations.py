"""Expectations: claims about a result's metrics, written inline or in a TOML file.

An expectation is ``GROUP[@SPLIT]:METRIC OP VALUE``, e.g. ``all:shape=plateau`` or
``layer3@test:barrier_height<=0.5``; ``*`` as GROUP means every group, and no ``@SPLIT`` means
every split. ``docs/metrics.md`` has the syntax and the file schema; ``ckptscope.check`` holds
them against a result. Expectation files come from CI configurations, so they are read as
untrusted input: bounded in size and count, UTF-8 only, and every parser failure is one line.
"""

from __future__ import annotations

import math
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ckptscope import shape as shapes
from ckptscope.errors import CkptscopeError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the tomli backport is a dependency there
    import tomli as tomllib

OPS = {"=": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}
DERIVED = ("loss_start", "loss_end", "acc_start", "acc_end", "distance")
METRICS = ("shape", *shapes.METRICS, *DERIVED)
TABLE_KEYS = ("group", "split", "metric", "op", "value")
# A CI gate holds tens of claims; these bounds are far above that and keep a hostile or broken
# file from costing more than a moment (each claim is checked per run, group and split).
MAX_FILE_BYTES = 1 << 20
MAX_EXPECTATIONS = 10_000

_INLINE = re.compile(
    r"^(?P<target>.+):\s*(?P<metric>[A-Za-z_]\w*)\s*(?P<op><=|>=|!=|==|=|<|>)\s*"
    r"(?P<value>[^:<>=!\s]+)\s*$"
)
_EXAMPLE = "e.g. 'all:shape=plateau' or 'layer3@test:barrier_height<=0.5'"


def _short(value, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


@dataclass(frozen=True)
class Expectation:
    """One claim about a metric: ``GROUP[@SPLIT]:METRIC OP VALUE``.

    Attributes:
        group: a group label, or ``*`` for every group.
        metric: one of ``METRICS``.
        op: one of ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` (``==`` is read as ``=``).
        value: a shape name for ``shape``, else a number (``true``/``false`` read as 1/0).
        split: a split label, or ``None`` for every split.
    """

    group: str
    metric: str
    op: str
    value: float | str
    split: str | None = None

    def __post_init__(self):
        if not isinstance(self.group, str) or not self.group.strip():
            raise CkptscopeError(f"expectation group must be a non-empty string (or '*'), got "
                                 f"{_short(self.group)}; {_EXAMPLE}.")
        if self.split is not None and (not isinstance(self.split, str) or not self.split.strip()):
            raise CkptscopeError(f"expectation split must be a non-empty string, got "
                                 f"{_short(self.split)}; leave it out to check every split.")
        if self.metric not in METRICS:
            raise CkptscopeError(f"unknown metric {_short(self.metric)}; known metrics: "
                                 f"{', '.join(METRICS)}.")
        op = "=" if self.op == "==" else self.op
        if op not in OPS:
            raise CkptscopeError(f"unknown comparison {_short(self.op)} in {self.metric} "
                                 f"expectation; use one of {' '.join(OPS)}.")
        object.__setattr__(self, "op", op)
        if self.metric == "shape":
            if not isinstance(self.value, str) or self.value not in shapes.SHAPES:
                raise CkptscopeError(f"shape value {_short(self.value)} is not a shape; use one "
                                     f"of {', '.join(shapes.SHAPES)}.")
            if op not in ("=", "!="):
                raise CkptscopeError(f"shape compares with = or !=, not {op!r}; e.g. "
                                     f"'all:shape!=barrier'.")
            return
        object.__setattr__(self, "value", _number(self.value, self.metric))

    def __str__(self) -> str:
        target = self.group if self.split is None else f"{self.group}@{self.split}"
        value = self.value if isinstance(self.value, str) else format(self.value, ".15g")
        return f"{target}:{self.metric}{self.op}{value}"


def _number(value, metric: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return float(value.strip().lower() == "true")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise CkptscopeError(f"{metric} takes a number, got {_short(value)}; e.g. "
                             f"'layer3:{metric}<=0.5'.") from None
    if math.isnan(number):
        raise CkptscopeError(f"{metric} cannot be compared with NaN; give a number.")
    return number


def parse_expectation(text: str) -> Expectation:
    """Parse ``GROUP[@SPLIT]:METRIC OP VALUE``.

    The last ``:`` followed by a metric name splits the target from the claim, so group regexes
    may hold ``:``; the last ``@`` in the target names the split.

    Example:
        >>> parse_expectation("layer3@test:barrier_height<=0.5")
        Expectation(group='layer3', metric='barrier_height', op='<=', value=0.5, split='test')

    Raises:
        CkptscopeError: the text does not have that form, or names an unknown metric, operator
            or shape.
    """
    if not isinstance(text, str):
        raise CkptscopeError(f"an expectation is a string, got {type(text).__name__}; "
                             f"{_EXAMPLE}.")
    match = _INLINE.match(text.strip())
    if match is None:
        raise CkptscopeError(f"expectation {_short(text)} is not GROUP[@SPLIT]:METRIC OP VALUE; "
                             f"{_EXAMPLE}.")
    group, at, split = match["target"].strip().rpartition("@")
    if not at:
        group, split = split, None
    elif not split.strip():
        raise CkptscopeError(f"expectation {_short(text)} has '@' but no split after it; write "
                             f"GROUP@SPLIT, or drop '@' to check every split.")
    return Expectation(group=group.strip(), split=split.strip() if split else None,
                       metric=match["metric"], op=match["op"], value=match["value"])


def load_expectations(path: str | os.PathLike) -> list[Expectation]:
    """Read expectations from a TOML file.

    The file holds one key, ``expect``: an array whose items are inline strings or tables with
    keys ``group``, ``metric``, ``value`` and optionally ``split`` and ``op`` (default ``=``)::

        expect = ["all:shape=plateau", "layer3:barrier_height<=0.5"]

    or::

        [[expect]]
        group = "all"
        split = "test"
        metric = "shape"
        value = "plateau"

    At most ``MAX_FILE_BYTES`` (1 MiB) of UTF-8 and ``MAX_EXPECTATIONS`` items.

    Raises:
        CkptscopeError: the file is missing, too large, not UTF-8, not TOML (however the parser
            fails, deep nesting included), or an item is malformed (named by its position).
    """
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise CkptscopeError(f"expectations file {name} does not exist or is not a file.")
    with open(path, "rb") as f:
        raw = f.read(MAX_FILE_BYTES + 1)  # never more than the limit, whatever the file's size
    if len(raw) > MAX_FILE_BYTES:
        raise CkptscopeError(f"expectations file {name} is larger than {MAX_FILE_BYTES} bytes "
                             f"(1 MiB); an expectations file holds a list of short claims, see "
                             f"docs/metrics.md.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CkptscopeError(f"expectations file {name} is not UTF-8 text (byte "
                             f"{raw[err.start]:#04x} at offset {err.start}); save it as UTF-8."
                             ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise CkptscopeError(f"{name} is not valid TOML ({err}); see docs/metrics.md for the "
                             f"expectations schema.") from None
    except RecursionError:
        raise CkptscopeError(f"{name} nests arrays or tables too deeply to read; an "
                             f"expectations file is a flat list, see docs/metrics.md.") from None
    except Exception as err:  # the parser's own failures on hostile input: still the file's fault
        raise CkptscopeError(f"{name} could not be read as TOML ({type(err).__name__}: "
                             f"{_short(str(err))}); see docs/metrics.md.") from None
    unknown = sorted(set(data) - {"expect"})
    if unknown:
        raise CkptscopeError(f"{name} has unknown key(s) {_short(unknown)}; the only top-level "
                             f"key is 'expect' (a list of strings or [[expect]] tables).")
    items = data.get("expect")
    if not isinstance(items, list) or not items:
        raise CkptscopeError(f"{name} holds no expectations; add "
                             f"expect = [\"all:shape=plateau\"] or [[expect]] tables.")
    if len(items) > MAX_EXPECTATIONS:
        raise CkptscopeError(f"{name} holds {len(items)} expectations, more than "
                             f"{MAX_EXPECTATIONS}; use '*' for every group and leave out @SPLIT "
                             f"for every split instead of listing them.")
    out = []
    for i, item in enumerate(items, start=1):
        try:
            if isinstance(item, str):
                out.append(parse_expectation(item))
            elif isinstance(item, dict):
                out.append(_from_table(item))
            else:
                raise CkptscopeError(f"got {type(item).__name__} {_short(item)}; use a string "
                                     f"or a table")
        except CkptscopeError as err:
            raise CkptscopeError(f"{name}, expectation {i}: {err}") from None
    return out


def _from_table(table: dict) -> Expectation:
    unknown = sorted(set(table) - set(TABLE_KEYS))
    if unknown:
        raise CkptscopeError(f"unknown key(s) {_short(unknown)}; an [[expect]] table has "
                             f"{', '.join(TABLE_KEYS)}")
    missing = [k for k in ("group", "metric", "value") if k not in table]
    if missing:
        raise CkptscopeError(f"missing key(s) {missing}; an [[expect]] table needs group, "
                             f"metric and value")
    for key in ("group", "split", "metric", "op"):
        if key in table and not isinstance(table[key], str):
            raise CkptscopeError(f"{key} must be a string, got {_short(table[key])}")
    return Expectation(group=table["group"], split=table.get("split"), metric=table["metric"],
                       op=table.get("op", "="), value=table["value"])


def as_expectations(expectations) -> list[Expectation]:
    """Return a list of ``Expectation`` from one or many expectations or their texts."""
    if isinstance(expectations, str | Expectation):
        expectations = [expectations]
    return [e if isinstance(e, Expectation) else parse_expectation(e) for e in expectations]
