"""Read and write checkpoints (weights only) and validate a pair of them.

Safetensors files and zip-format torch files are memory-mapped (the tensors are the file's
pages, in the stored dtype, not copies); torch files are read with ``weights_only=True`` so a
checkpoint can never run code. Wrappers (``{"state_dict": ...}``, ``{"model": ...}``, a
Lightning checkpoint) are unwrapped, and the prefixes every key has from DataParallel / DDP
(``module.``), ``torch.compile`` (``_orig_mod.``) and Lightning (``model.``) are stripped
(:mod:`ckptscope.wrappers`); :mod:`ckptscope.keys` then matches a pair's keys to each other
and to the model (prefixes, tied weights, BatchNorm counters). Folders and shard sets
(``save_pretrained``'s) are read through :mod:`ckptscope.shards`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ckptscope import shards
from ckptscope.errors import CkptscopeError
from ckptscope.files import replacing, write_error
from ckptscope.metadata import PREFIX, check_fields, read_metadata
from ckptscope.wrappers import is_lightning, strip_prefix, trainer_note, wrapper_prefixes

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
META_PREFIX = PREFIX
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Floating dtypes kept as stored; others (float8) are upcast to float32 when read.
_KEPT = (*_LOW_PRECISION, torch.float32, torch.float64)


@dataclass(frozen=True)
class Checkpoint:
    """A state dict read from disk, with where it came from.

    Attributes:
        state: key -> tensor, on the CPU, as stored: read from safetensors, memory-mapped
            (no copy); float16 / bfloat16 / float32 / float64 kept in their dtype (the engine
            upcasts per tensor as it computes each point), other floating dtypes upcast to
            float32.
        path: the file it was read from ("" for an in-memory state).
        sha256: hex digest of the file's bytes ("" for an in-memory state).
        metadata: the ckptscope metadata it carries (adapter, data, ...), prefix removed: inert,
            bounded strings, read only through :mod:`ckptscope.metadata`.
        notes: one-line remarks made while reading (half-precision tensors kept, upcasts,
            unwrapped prefixes), and while matching its keys to a pair's (:mod:`ckptscope.keys`).
        stripped: the prefixes stripped from every key, outermost first (``("module.",)``);
            :mod:`ckptscope.keys` puts one back when the model's own keys have it.
    """

    state: dict[str, torch.Tensor]
    path: str = ""
    sha256: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    stripped: tuple[str, ...] = ()


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sniff(path: Path) -> str:
    """Return "safetensors", "torch-zip", "torch-legacy" or "unknown" from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and n < 100 * (1 << 20):
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "torch-legacy"
    return "unknown"


def _check_path(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise CkptscopeError(f"checkpoint {str(path)!r} is a dangling symlink; point it at a file.")
    if not path.exists():
        raise CkptscopeError(f"checkpoint {str(path)!r} does not exist; check the path.")
    if path.stat().st_size == 0:
        raise CkptscopeError(
            f"checkpoint {str(path)!r} is empty (0 bytes); it was not saved fully."
        )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # The ckptscope fields, bounded, before any tensor is read.
            metadata = read_metadata(f.metadata() or {}, source=str(path))
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except CkptscopeError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CkptscopeError(
            f"{str(path)!r} is not a readable safetensors file ({reason}); it may be truncated "
            f"or corrupt: save it again or re-download it."
        ) from None
    return state, metadata


def _read_torch(path: Path, kind: str) -> object:
    if kind == "torch-zip" and not zipfile.is_zipfile(path):
        raise CkptscopeError(
            f"{str(path)!r} starts like a torch file but is not a complete zip archive; it may be "
            f"truncated: save it again."
        )
    try:
        # A zip-format file is memory-mapped (private pages: a write never reaches the file),
        # so its tensors are read as they are used instead of all at once.
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True,
                              mmap=kind == "torch-zip")
        except RuntimeError:
            if kind != "torch-zip":
                raise
            # Some zip files cannot be mapped (written by other tools): read them whole.
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = unpickling_reason(err)
        raise CkptscopeError(
            f"{str(path)!r} holds objects that only a full unpickle could load, which could run "
            f"code ({reason[:160]}); ckptscope reads weights only. Re-save its state_dict with "
            f"torch.save(model.state_dict(), ...) or as safetensors."
        ) from None
    except Exception as err:  # any other reader failure is the file's fault, not a bug here
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise CkptscopeError(
            f"{str(path)!r} is not a readable torch checkpoint ({reason[:160]}); it may be "
            f"truncated or of another format: save it again."
        ) from None


def unpickling_reason(err: BaseException) -> str:
    """What torch's weights-only unpickler refused, in one plain line: its
    ``WeightsUnpickler error: Unsupported global: GLOBAL pkg.Class ...`` sentence (torch's
    first line is advice with terminal escapes), else its first line; never escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\n|$)", text)
    line = found.group(1) if found else (text.splitlines() or [type(err).__name__])[0]
    return "".join(c if c.isprintable() else "?" for c in line).strip()


def unwrap_state(
    obj: object, *, source: str = "state"
) -> tuple[dict[str, torch.Tensor], list[str], tuple[str, ...]]:
    """Return the tensor state dict inside ``obj``, notes on what was unwrapped, and the
    prefixes stripped from every key.

    Args:
        obj: a mapping of tensors, possibly wrapped as ``{"state_dict": ...}`` or
            ``{"model": ...}`` (the first wrapper holding tensors wins; a Lightning checkpoint's
            trainer keys are summed up in one note, never read further), with keys possibly
            prefixed by ``module.`` or ``_orig_mod.`` (or ``model.`` in a Lightning checkpoint).
        source: the name used in error messages.
    """
    notes: list[str] = []
    if not isinstance(obj, Mapping):
        raise CkptscopeError(
            f"{source} holds a {type(obj).__name__}, not a state dict; save model.state_dict()."
        )
    lightning = is_lightning(obj)
    for wrapper in WRAPPER_KEYS:
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            notes.append(trainer_note(obj, wrapper))
            obj = inner
            break
    else:
        lightning = False
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CkptscopeError(
            f"{source} holds no tensors (top-level keys: {sorted(map(str, obj))[:8]}); "
            f"save model.state_dict()."
        )
    state, more, stripped = strip_wrappers(state, lightning=lightning)
    return state, notes + more, stripped


def strip_wrappers(
    state: dict[str, torch.Tensor], *, lightning: bool = False
) -> tuple[dict[str, torch.Tensor], list[str], tuple[str, ...]]:
    """Strip the wrappers' prefixes every key has (:func:`ckptscope.wrappers.wrapper_prefixes`).

    Returns:
        The state, one note per prefix (``"stripped prefix 'module.' from 12 keys"``), and the
        prefixes, outermost first.
    """
    stripped = tuple(wrapper_prefixes(state, lightning=lightning))
    notes = []
    for prefix in stripped:
        state = strip_prefix(state, prefix)
        notes.append(f"stripped prefix {prefix!r} from {len(state)} keys")
    return state, notes, stripped


def _normalise(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Refuse complex tensors; keep the others as stored (no copy).

    float16 and bfloat16 tensors stay in their dtype (memory-mapped when read from
    safetensors): the engine upcasts them one tensor at a time as it computes each point
    (:func:`ckptscope.points.write_point`), so a pair never exists as whole float32 copies.
    Floating dtypes the engine does not interpolate from (float8) are upcast to float32 here.
    """
    out: dict[str, torch.Tensor] = {}
    held: list[str] = []
    upcast: list[str] = []
    for key, value in state.items():
        if value.is_complex():
            raise CkptscopeError(
                f"{source}: tensor {key!r} is complex ({value.dtype}); ckptscope evaluates real "
                f"weights only."
            )
        if value.dtype in _LOW_PRECISION:
            held.append(str(value.dtype).replace("torch.", ""))
        elif value.is_floating_point() and value.dtype not in _KEPT:
            upcast.append(str(value.dtype).replace("torch.", ""))
            value = value.float()
        out[key] = value
    notes = []
    if held:
        notes.append(
            f"kept {len(held)} {'/'.join(sorted(set(held)))} tensor(s) in their dtype, each "
            f"upcast to the evaluation dtype (float32) one tensor at a time as points are computed"
        )
    if upcast:
        notes.append(f"upcast {len(upcast)} {'/'.join(sorted(set(upcast)))} tensor(s) to float32")
    return out, notes


def _read_file(path: Path
               ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str], tuple[str, ...]]:
    """(state, ckptscope metadata, notes, prefixes stripped) of one checkpoint file, told by its
    first bytes; wrappers and their prefixes removed (:mod:`ckptscope.wrappers`)."""
    _check_path(path)
    kind = _sniff(path)
    if kind == "safetensors":
        state, metadata = _read_safetensors(path)
        state, notes, stripped = strip_wrappers(state)
        return state, metadata, notes, stripped
    if kind in ("torch-zip", "torch-legacy"):
        state, notes, stripped = unwrap_state(_read_torch(path, kind), source=repr(str(path)))
        return state, {}, notes, stripped
    raise CkptscopeError(
        f"{str(path)!r} is neither a safetensors file nor a torch checkpoint (it starts with "
        f"{path.read_bytes()[:8]!r}); pass a file written by safetensors or torch.save."
    )


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file (safetensors or torch), folder or shard index as weights only.

    Args:
        path: a ``.safetensors`` file, or a torch file (``.pt``, ``.pth``, ``.bin``) saved with
            ``torch.save``; the format is told from the file's first bytes, not its name. Or a
            folder (``save_pretrained``'s: ``model.safetensors``, shards and their
            ``model.safetensors.index.json``, or ``pytorch_model.bin``) or a
            ``*.safetensors.index.json`` file (:mod:`ckptscope.shards`).

    Returns:
        The checkpoint: tensors as stored (memory-mapped for safetensors), float16 and
        bfloat16 kept, with a note (see :class:`Checkpoint`). Its ``sha256`` is the file's; for
        shards, :func:`ckptscope.shards.shards_sha256` (a digest over the shards' digests, as
        ``sha256sum model-*.safetensors | sha256sum`` prints it).

    Raises:
        CkptscopeError: the file is missing, empty, truncated, corrupt, not a checkpoint, or
            holds objects whose unpickling could run code; a shard index is invalid or does not
            match its shards.
    """
    path = Path(path)
    if path.is_dir() or (shards.is_index(path) and path.is_file()):
        return _load_folder(path)
    state, metadata, notes, stripped = _read_file(path)
    state, more = _normalise(state, repr(str(path)))
    return Checkpoint(state, str(path), file_sha256(path), metadata, tuple(notes + more),
                      stripped)


def _load_folder(path: Path) -> Checkpoint:
    """A checkpoint folder or shard index (:func:`load_checkpoint`)."""
    folder = path if path.is_dir() else path.parent
    file, index = shards.checkpoint_files(path) if path.is_dir() else (path, True)
    if index:
        state, metadata, notes, files = shards.read_shards(file, lambda p: _read_file(p)[:3])
        notes = [f"read {len(files)} shard(s) listed in {file.name}", *notes]
        stripped: tuple[str, ...] = ()
    else:
        (state, metadata, notes, stripped), files = _read_file(file), [file]
    for key, value in shards.model_folder_metadata(folder).items():
        metadata.setdefault(key, value)  # what the files themselves carry wins
    state, more = _normalise(state, repr(str(path)))
    sha256 = shards.shards_sha256(files, file_sha256)
    return Checkpoint(state, str(path), sha256, metadata, tuple(notes + more), stripped)


def as_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor] | Checkpoint,
) -> Checkpoint:
    """Return a :class:`Checkpoint` from a path, an in-memory state dict or a checkpoint."""
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, (str, os.PathLike)):
        return load_checkpoint(source)
    state, notes, stripped = unwrap_state(source)
    state = {k: v.detach().cpu() for k, v in state.items()}
    state, more = _normalise(state, "state dict")
    return Checkpoint(state, notes=tuple(notes + more), stripped=stripped)


def _diff_list(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_pair(
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    *,
    names: tuple[str, str] = ("A", "B"),
    fix: str = "they must be two states of one architecture",
) -> None:
    """Raise unless ``a`` and ``b`` have the same keys, shapes and kinds of dtype.

    Args:
        a, b: the two state dicts.
        names: how to call them in the error message.
        fix: the advice that ends the error message.

    Raises:
        CkptscopeError: listing, sorted, the keys only in one, and the shape or dtype mismatches.
    """
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    problems = []
    if only_a:
        problems.append(f"only in {names[0]}: {_diff_list(only_a)}")
    if only_b:
        problems.append(f"only in {names[1]}: {_diff_list(only_b)}")
    shapes = sorted(k for k in set(a) & set(b) if a[k].shape != b[k].shape)
    if shapes:
        problems.append(
            "shapes differ: "
            + _diff_list([f"{k} {tuple(a[k].shape)} vs {tuple(b[k].shape)}" for k in shapes])
        )
    kinds = sorted(
        k for k in set(a) & set(b) if a[k].is_floating_point() != b[k].is_floating_point()
    )
    if kinds:
        problems.append(
            "dtypes differ: " + _diff_list([f"{k} {a[k].dtype} vs {b[k].dtype}" for k in kinds])
        )
    if problems:
        raise CkptscopeError(
            f"{names[0]} and {names[1]} do not match ({'; '.join(problems)}); {fix}."
        )


def save_checkpoint(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write ``state`` as safetensors atomically, with ckptscope metadata.

    Args:
        path: the target file; written to a temporary name in the same folder, then renamed.
        state: key -> tensor; tied tensors are cloned so each key is stored.
        metadata: values stored under ``ckptscope.<key>``; non-strings are JSON-encoded. The
            bounds :func:`load_checkpoint` holds a file to apply here too
            (:func:`ckptscope.metadata.check_fields`), so ckptscope never writes what it would
            refuse to read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    check_fields(fields, source=str(path))
    meta = {META_PREFIX + k: v for k, v in fields.items()}
    with replacing(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except SafetensorError as err:  # a full disk: safetensors' own error, not an OSError
            raise write_error(path, err) from None
    return path


def describe_dtypes(state: Mapping[str, torch.Tensor]) -> str:
    """Return e.g. ``"float32 x10, int64 x2"`` for a state dict."""
    counts: dict[str, int] = {}
    for value in state.values():
        name = str(value.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items()))
