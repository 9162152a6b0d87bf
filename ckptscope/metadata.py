"""Checkpoint metadata as inert data: bounded strings, read as typed values, never as code.

A checkpoint's ``ckptscope.*`` header fields are written by whoever wrote the file, so they are
input like any other, and this module is the one place that reads them (``docs/security.md``,
"What checkpoint metadata may do"):

- a file holds at most :data:`MAX_FIELDS` of them, each a string of at most
  :data:`MAX_FIELD_BYTES` bytes (:func:`read_metadata`; :func:`check_fields` on writing too);
- a field read as JSON (:func:`parse_json`) parses to JSON data only: objects, arrays, strings,
  finite numbers, booleans and null, nested at most :data:`MAX_DEPTH` deep, integers within 64
  bits; numbers are read with bounds (:func:`stored_int`, :func:`stored_float`);
- an adapter or dataset a file names is used only when it is a registry entry
  (:func:`stored_adapter`, :func:`stored_data`). A ``pkg.module:attr`` reference is honoured
  only when the user passes it, so nothing is imported because a file says so;
- every other field stays an inert string, shown escaped (:func:`describe_metadata`).

Options for an adapter (``adapter_options``) are parsed here (:func:`stored_options`) and then
checked against the checkpoint's own shapes on the meta device before a module is built
(:meth:`ckptscope.adapters.Adapter.make`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping

from ckptscope.errors import CkptscopeError
from ckptscope.registry import is_import_spec

PREFIX = "ckptscope."
# ckptscope's own trainer writes about 20 fields, the longest (the resolved recipe, `config`)
# under 1 KiB for every bundled recipe; the bounds leave room for large recipes and no more.
MAX_FIELDS = 64
MAX_FIELD_BYTES = 16 * 1024
MAX_KEY_CHARS = 128
MAX_DEPTH = 8
INT64 = (-(2**63), 2**63 - 1)
_SHOWN = 120  # characters of a value quoted in an error message
# The NAME of a FAMILY:NAME adapter (timm:resnet18): a name, never a path or code.
FAMILY_ARG = re.compile(r"[A-Za-z0-9_.]{1,128}")


class _NotData(ValueError):
    """A JSON text that parses, but not to bounded JSON data."""


def _shown(value: object) -> str:
    """``repr`` of a value, cut to a line's worth: a file's bytes quoted in an error."""
    text = repr(value)
    if len(text) <= _SHOWN:
        return text
    return text[: _SHOWN - 4] + "...'" if isinstance(value, str) else text[: _SHOWN - 3] + "..."


def _field(key: str) -> str:
    return _shown(PREFIX + key)


def check_fields(fields: Mapping[str, object], *, source: str) -> None:
    """Raise unless ``fields`` (prefix removed) are few, short strings with short names.

    Args:
        fields: field name (without ``ckptscope.``) -> value.
        source: the file, for the message.

    Raises:
        CkptscopeError: too many fields, a name too long, a value not a string or too long.
    """
    if len(fields) > MAX_FIELDS:
        raise CkptscopeError(
            f"checkpoint {source!r} holds {len(fields)} ckptscope metadata fields, more than the "
            f"{MAX_FIELDS} ckptscope reads; save the weights again with fewer."
        )
    for key, value in fields.items():
        if len(key) > MAX_KEY_CHARS:
            raise CkptscopeError(
                f"checkpoint {source!r} has a metadata field name of {len(key):,} characters "
                f"({_field(key)}), more than {MAX_KEY_CHARS}; save the weights again without it."
            )
        if not isinstance(value, str):
            raise CkptscopeError(
                f"checkpoint {source!r}: metadata field {_field(key)} is a "
                f"{type(value).__name__}, not a string; save the weights again."
            )
        # Characters first: a long string is refused without encoding it.
        size = (len(value) if len(value) > MAX_FIELD_BYTES
                else len(value.encode("utf-8", "surrogatepass")))
        if size > MAX_FIELD_BYTES:
            raise CkptscopeError(
                f"checkpoint {source!r}: metadata field {_field(key)} holds {size:,} bytes, more "
                f"than the {MAX_FIELD_BYTES:,} ckptscope reads; save the weights again without "
                f"it (pass what it says yourself: --adapter, --adapter-opt, --data)."
            )


def read_metadata(header: Mapping[str, object], *, source: str) -> dict[str, str]:
    """Return the ``ckptscope.*`` fields of a safetensors header, prefix removed, bounded.

    Other tools' fields (``format``, ...) are left out: ckptscope never reads them.

    Raises:
        CkptscopeError: as :func:`check_fields`.
    """
    fields = {k[len(PREFIX) :]: v for k, v in header.items() if k.startswith(PREFIX)}
    check_fields(fields, source=source)
    return fields  # type: ignore[return-value]  # check_fields proved every value a str


def _depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets in strings skipped).

    Counted before parsing, so a deeply nested text never reaches the recursive parser.
    """
    deepest = depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _int(text: str) -> int:
    # Read the digits only when they fit 64 bits (Python would read 4,300 of them).
    if len(text.lstrip("-")) > 19 or not INT64[0] <= int(text) <= INT64[1]:
        raise _NotData(f"the integer {text[:24]}{'...' * (len(text) > 24)} exceeds 64 bits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NotData(f"the number {text[:24]} overflows a float")
    return value


def _constant(text: str) -> float:
    raise _NotData(f"{text} is not JSON data")


def parse_json(text: str, *, source: str, field: str) -> object:
    """Parse a metadata field as JSON data (see the module docstring for the bounds).

    Args:
        text: the field's value.
        source, field: the file and the field name, for the message.

    Raises:
        CkptscopeError: the text is not JSON, nests deeper than :data:`MAX_DEPTH`, or holds
            NaN, an infinity or an integer beyond 64 bits.
    """
    check_fields({field: text}, source=source)
    depth = _depth(text)
    reason = f"it nests {depth} deep, more than {MAX_DEPTH}" if depth > MAX_DEPTH else ""
    if not reason:
        try:
            return json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
        except _NotData as err:
            reason = str(err)
        except (ValueError, RecursionError) as err:
            reason = f"not JSON: {str(err).splitlines()[0][:80]}" if str(err) else "not JSON"
    raise CkptscopeError(
        f"checkpoint {source!r}: metadata field {_field(field)} is not JSON data ({reason}); "
        f"save the file again, or pass the value yourself (--adapter-opt, --seed) so that the "
        f"field is not read."
    )


def stored_int(
    metadata: Mapping[str, str], field: str, *, source: str, low: int = 0, high: int = INT64[1]
) -> int | None:
    """Return the integer in ``metadata[field]`` within [low, high], or ``None`` if absent.

    Raises:
        CkptscopeError: the field holds anything else.
    """
    if field not in metadata:
        return None
    value = parse_json(metadata[field], source=source, field=field)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CkptscopeError(
            f"checkpoint {source!r}: metadata field {_field(field)} = {_shown(metadata[field])} "
            f"is not an integer in [{low}, {high}]; pass the value yourself (e.g. --seed)."
        )
    return value


def stored_float(metadata: Mapping[str, str], field: str, *, source: str) -> float | None:
    """Return the finite number in ``metadata[field]``; ``None`` if absent or JSON ``null``.

    Raises:
        CkptscopeError: the field holds anything else.
    """
    if field not in metadata:
        return None
    value = parse_json(metadata[field], source=source, field=field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CkptscopeError(
            f"checkpoint {source!r}: metadata field {_field(field)} = {_shown(metadata[field])} "
            f"is not a number; save the file again."
        )
    return float(value)


def stored_options(metadata: Mapping[str, str], *, source: str) -> dict | None:
    """Return the JSON object in ``metadata["adapter_options"]``, or ``None`` if absent.

    The values are JSON data; whether the adapter takes them, and whether the module they build
    fits the checkpoint, :meth:`ckptscope.adapters.Adapter.make` checks before building.

    Raises:
        CkptscopeError: the field is not a JSON object.
    """
    if "adapter_options" not in metadata:
        return None
    value = parse_json(metadata["adapter_options"], source=source, field="adapter_options")
    if not isinstance(value, dict):
        raise CkptscopeError(
            f"checkpoint {source!r}: metadata field {_field('adapter_options')} is a JSON "
            f"{type(value).__name__}, not an object of options; pass the options yourself: "
            f"--adapter-opt KEY=VALUE (Python: adapter_options={{...}})."
        )
    return value


def _refuse(value: str, *, what: str, source: str, known: Collection[str], flag: str,
            keyword: str) -> CkptscopeError:
    shown = _shown(value)
    if is_import_spec(value):
        # is_import_spec admits letters, digits, '_', '.' and one ':' only: safe to print as a
        # shell word and a Python string.
        return CkptscopeError(
            f"checkpoint {source!r} names {what} {shown} in its metadata; ckptscope never "
            f"imports code named by a file. If you trust it, pass it yourself: {flag} {value} "
            f"(Python: {keyword}={value!r})."
        )
    return CkptscopeError(
        f"checkpoint {source!r} names {what} {shown} in its metadata, which is not a built-in "
        f"{what} ({', '.join(sorted(known))}); pass {flag} NAME or {flag} pkg.module:attr "
        f"yourself (Python: {keyword}=...)."
    )


def stored_adapter(metadata: Mapping[str, str], *, source: str,
                   known: Collection[str], families: Collection[str] = ()) -> str | None:
    """Return the adapter the metadata names if it is a registry entry; ``None`` if none.

    Args:
        metadata: a checkpoint's fields.
        source: the file, for the message.
        known: the registered adapter names (``ckptscope.ADAPTERS``).
        families: the registered adapter families (``ckptscope.adapters.FAMILIES``): a
            ``FAMILY:NAME`` entry with NAME of ``[A-Za-z0-9_.]+`` is a registry entry too (it
            picks an architecture of a library; it names no code to import).

    Raises:
        CkptscopeError: the name is an import spec or unknown; nothing is imported.
    """
    value = metadata.get("adapter") or None
    if value is None or value in known:
        return value
    family, sep, arg = value.partition(":")
    if sep and family in families and FAMILY_ARG.fullmatch(arg):
        return value
    raise _refuse(value, what="adapter", source=source, known=known, flag="--adapter",
                  keyword="model")


def stored_data(metadata: Mapping[str, str], *, source: str,
                known: Collection[str]) -> str | None:
    """Return the dataset spec the metadata names if it is ``NAME`` or ``NAME:ARG`` for a
    registered ``NAME`` (``ARG``, a directory or sizes, is data); ``None`` if none.

    Raises:
        CkptscopeError: the spec is an import spec or names no registered dataset; nothing is
            imported.
    """
    value = metadata.get("data") or None
    if value is None or value.partition(":")[0] in known:
        return value
    raise _refuse(value, what="dataset", source=source, known=known, flag="--data",
                  keyword="data")


def _printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x1b``, ``\\u202e``):
    a file's strings never move the cursor or rewrite the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def describe_metadata(metadata: Mapping[str, str]) -> str:
    """Return ``key=value, ...`` for a listing, sorted, every character printable."""
    return ", ".join(f"{_printable(k)}={_printable(v)}" for k, v in sorted(metadata.items()))
