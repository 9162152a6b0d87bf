"""Finished chunks of curves kept on disk beside the output, so an interrupted run resumes.

Each path's alphas are cut into chunks of consecutive grid points at fixed boundaries
(:func:`chunk_size`). As a chunk of one (run, group) path finishes, its curves go to
``DIR/<key>.safetensors``, written atomically; a rerun with the same inputs reads back the
chunks it finds and evaluates only the rest, and its curves are bitwise those of an
uninterrupted run (each point's numbers do not depend on which points share its passes; the
key holds everything they do depend on). A chunk file is a plain safetensors file:

- tensors ``loss`` and ``accuracy`` (split, point) float64, ``alpha`` (point,) float64 and
  ``alpha_index`` (point,) int64;
- metadata ``format`` (``ckptscope-chunk``), ``version``, ``key`` (sha256 of the curve
  fingerprint of :mod:`ckptscope.identity`, the group's keys and the chunk's alphas) and
  ``digest`` (sha256 of the key and the four tensors).

A file is read only if it is a regular file no larger than a chunk can be (checked on the open
descriptor before a byte is read; no compression, no pickle), its header parses as exactly
those tensors with those dtypes and shapes, and then only if its key, digest, alpha indices
and values match and its values are possible: accuracy in [0, 1] or NaN (for a built-in loss a
whole number of the units it counts: examples, or targets other than -100), loss real, NaN or
+Inf, and not negative for the built-in losses.
A file that fails is deleted and its points recomputed, with one warning per call; files of an
earlier format (``.npz``) are deleted unread.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save as safetensors_bytes

from ckptscope.files import remove_stale_temporaries, replacing
from ckptscope.identity import curve_fingerprint
from ckptscope.losses import counted_units

CHUNK = 8  # grid points per file of a whole-model path: a kill loses at most this many
GROUP_CHUNKS = 4  # at most this many files per group path (see chunk_size)
FORMAT, VERSION = "ckptscope-chunk", "2"
HEADER_LIMIT = 16 << 10  # bytes; a chunk's header takes under 1 KiB
_NAME = re.compile(r"[0-9a-f]{40}\.safetensors")
_DTYPES = {"F64": np.dtype("<f8"), "I64": np.dtype("<i8")}


class _Refused(Exception):
    """A chunk file that is not used; the message says why (one phrase)."""


def chunk_size(n_alpha: int, *, hoistable: bool) -> int:
    """Grid points per chunk of a path of ``n_alpha`` points.

    Where the whole model moves, every point is a full forward pass and a chunk adds only one
    load of the held state: :data:`CHUNK`. A group path may be hoisted, and a hoisted path
    computes its alpha-invariant part (the layers before the group, over all the data) once
    per chunk, up to a whole forward pass for a last-layer group: at most :data:`GROUP_CHUNKS`
    chunks there, so resuming costs at most three such passes more. (ResNet-18 with its six
    block groups and the whole model, 51 alphas: 3.3% more multiply-adds than one chunk per
    path; 17 alphas: 6.5%. Chunks of 8 everywhere would double that.)
    """
    return CHUNK if not hoistable else max(CHUNK, -(-n_alpha // GROUP_CHUNKS))


def chunks(points: np.ndarray, size: int = CHUNK) -> list[np.ndarray]:
    """Cut grid indices into chunks at fixed boundaries (``index // size``), so a rerun asks
    for the very chunks the first run stored, whatever it had finished."""
    points = np.asarray(points, dtype=np.int64)
    if points.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(points // size)) + 1
    return np.split(points, cuts)


def chunk_key(fingerprint: str, keys: Sequence[str], index: np.ndarray, alphas: np.ndarray) -> str:
    """The key of one chunk: the curves' fingerprint, the group's keys and the chunk's alphas
    (their exact float64 values, by their bytes)."""
    text = json.dumps([fingerprint, list(keys), np.asarray(index).tolist(),
                       np.asarray(alphas, dtype="<f8").tobytes().hex()])
    return hashlib.sha256(text.encode()).hexdigest()


def chunk_digest(key: str, tensors: dict[str, np.ndarray]) -> str:
    """sha256 of the key and each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(key.encode())
    for name in ("loss", "accuracy", "alpha", "alpha_index"):
        t = np.ascontiguousarray(tensors[name])
        digest.update(f"|{name}|{t.dtype.str}|{t.shape}|".encode())
        digest.update(t.tobytes())
    return digest.hexdigest()


def encode_chunk(key: str, loss: np.ndarray, accuracy: np.ndarray, alphas: np.ndarray,
                 index: np.ndarray) -> bytes:
    """One chunk file's bytes (safetensors)."""
    tensors = {
        "loss": np.ascontiguousarray(loss, dtype="<f8"),
        "accuracy": np.ascontiguousarray(accuracy, dtype="<f8"),
        "alpha": np.ascontiguousarray(alphas, dtype="<f8"),
        "alpha_index": np.ascontiguousarray(index, dtype="<i8"),
    }
    metadata = {"format": FORMAT, "version": VERSION, "key": key,
                "digest": chunk_digest(key, tensors)}
    return safetensors_bytes(tensors, metadata=metadata)


def _read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; the size is checked on the open
    descriptor (no race with a swap of the file) before anything is read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:  # removed since it was listed (a finished run cleaning up)
        raise
    except OSError as err:
        raise _Refused(f"cannot be opened ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Refused("not a regular file")
        if info.st_size > limit:
            raise _Refused(f"{info.st_size} bytes, more than the {limit} a chunk takes")
        parts, left = [], limit + 1
        while left > 0 and (part := os.read(fd, left)):
            parts.append(part)
            left -= len(part)
    finally:
        os.close(fd)
    data = b"".join(parts)
    if len(data) > limit:
        raise _Refused("grew past the size of a chunk while it was read")
    return data


def decode_chunk(data: bytes, shapes: dict[str, tuple[str, tuple[int, ...]]]
                 ) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """Parse a chunk file strictly: exactly the tensors of ``shapes`` (name -> (dtype, shape)),
    contiguous, covering the body; returns (metadata, arrays)."""
    if len(data) < 8:
        raise _Refused("shorter than a header")
    size = int.from_bytes(data[:8], "little")
    if size > HEADER_LIMIT or 8 + size > len(data):
        raise _Refused(f"header of {size} bytes does not fit")
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _Refused("header is not JSON") from None
    if not isinstance(header, dict):
        raise _Refused("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Refused("no metadata")
    if set(header) != set(shapes):
        raise _Refused(f"tensors {sorted(header)[:6]}, not {sorted(shapes)}")
    body = memoryview(data)[8 + size :]
    arrays, spans = {}, []
    for name, (dtype, shape) in shapes.items():
        entry = header[name]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype:
            raise _Refused(f"{name} is not {dtype}")
        if entry.get("shape") != list(shape):
            raise _Refused(f"{name} has shape {entry.get('shape')}, not {list(shape)}")
        offsets = entry.get("data_offsets")
        count, width = int(np.prod(shape)), _DTYPES[dtype].itemsize
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= len(body)
                or offsets[1] - offsets[0] != count * width):
            raise _Refused(f"{name} has bad offsets")
        spans.append(offsets)
        arrays[name] = np.frombuffer(body, _DTYPES[dtype], count, offsets[0]).reshape(shape)
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])) or sum(
            e - b for b, e in spans) != len(body):
        raise _Refused("tensors overlap or leave bytes over")
    return metadata, {name: a.astype(a.dtype.newbyteorder("=")) for name, a in arrays.items()}


class ChunkCache:
    """A folder of finished chunks of one evaluation's paths.

    Args:
        folder: where the chunk files live (created on the first write).
        fingerprint: the curves' fingerprint (:func:`ckptscope.identity.curve_fingerprint`).
        grid: (n,) the evaluation's alpha grid.
        n_examples: per evaluated split, in order, the units a built-in loss averages over
            (:func:`ckptscope.losses.counted_units`: examples, or counted tokens).
        builtin_loss: the loss is a built-in (non-negative loss, 0/1 correctness).

    Attributes:
        hits: grid points served from files.
        discarded: one ``name: reason`` per file that failed verification and was deleted.
        outdated: files of an earlier format deleted unread.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str, *, grid: np.ndarray,
                 n_examples: Sequence[int], builtin_loss: bool):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.grid = np.asarray(grid, dtype=np.float64)
        self.n_examples = np.asarray(n_examples, dtype=np.float64)
        self.builtin_loss = builtin_loss
        self.hits, self.discarded, self.outdated = 0, [], 0
        self.unwritable: str | None = None  # why storing failed, once it has
        if self.folder.is_dir():  # an earlier format's files: deleted, never opened
            for path in self.folder.glob("*.npz"):
                if path.is_file() or path.is_symlink():
                    path.unlink(missing_ok=True)
                    self.outdated += 1

    def _path(self, key: str) -> Path:
        return self.folder / f"{key[:40]}.safetensors"

    def load(self, keys: Sequence[str], index: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(loss, accuracy), each (split, point), of a stored chunk; ``None`` when absent or
        when the file fails verification (it is then deleted and noted in ``discarded``)."""
        key = chunk_key(self.fingerprint, keys, index, self.grid[index])
        path = self._path(key)
        if not os.path.lexists(path):
            return None
        try:
            curves = self._verify(path, key, np.asarray(index, dtype=np.int64))
        except FileNotFoundError:
            return None
        except _Refused as why:
            self.discarded.append(f"{path.name}: {why}")
            try:
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
            except OSError:  # not ours to delete: it stays unused (and storing there fails)
                pass
            return None
        self.hits += len(index)
        return curves

    def _verify(self, path: Path, key: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n_split, m = len(self.n_examples), len(index)
        shapes = {"loss": ("F64", (n_split, m)), "accuracy": ("F64", (n_split, m)),
                  "alpha": ("F64", (m,)), "alpha_index": ("I64", (m,))}
        limit = 8 + HEADER_LIMIT + 8 * (2 * n_split * m + 2 * m)
        metadata, t = decode_chunk(_read_bounded(path, limit), shapes)
        if (metadata.get("format"), metadata.get("version")) != (FORMAT, VERSION):
            raise _Refused(f"format {metadata.get('format')} {metadata.get('version')}")
        if metadata.get("key") != key:
            raise _Refused("written for other inputs (key mismatch)")
        if metadata.get("digest") != chunk_digest(key, t):
            raise _Refused("values do not match their digest")
        if not np.array_equal(t["alpha_index"], index) or (
                t["alpha"].view(np.uint64) != self.grid[index].view(np.uint64)).any():
            raise _Refused("other alphas")
        loss, acc = t["loss"], t["accuracy"]
        known = ~np.isnan(acc)
        if not ((acc[known] >= 0) & (acc[known] <= 1)).all():
            raise _Refused("accuracy outside [0, 1]")
        if self.builtin_loss:
            counts = acc * self.n_examples[:, None]
            # (never NaN either: a built-in loss counts argmax hits, whatever the weights)
            if not np.array_equal(np.round(counts) / self.n_examples[:, None], acc):
                raise _Refused("accuracy is not a whole number of examples (or counted targets)")
            if (loss < 0).any():  # -Inf included; NaN (NaN weights) is a value like any
                raise _Refused("negative loss from a non-negative loss function")
        return loss, acc

    def store(self, keys: Sequence[str], index: np.ndarray, loss: np.ndarray,
              accuracy: np.ndarray) -> None:
        """Write one finished chunk's curves, each (split, point), atomically."""
        index = np.asarray(index, dtype=np.int64)
        alphas = self.grid[index]
        key = chunk_key(self.fingerprint, keys, index, alphas)
        data = encode_chunk(key, loss, accuracy, alphas, index)
        if self.unwritable:
            return
        try:
            with replacing(self._path(key)) as tmp:
                tmp.write_bytes(data)
        except OSError as err:  # the evaluation goes on; only resuming it would start over
            self.unwritable = f"{err.strerror or err} ({err.filename or self.folder})"
            warnings.warn(f"cannot keep finished chunks in {self.folder}/ ({self.unwritable}); "
                          f"an interrupted run will start over.", stacklevel=2)

    def warning(self) -> str | None:
        """One line on the files deleted in this call, or ``None``."""
        parts = []
        if self.discarded:
            parts.append(f"{len(self.discarded)} chunk file(s) that failed verification "
                         f"({self.discarded[0]}{', ...' if len(self.discarded) > 1 else ''})")
        if self.outdated:
            parts.append(f"{self.outdated} file(s) of an earlier format (unread)")
        if not parts:
            return None
        return f"deleted {' and '.join(parts)} in {self.folder}/: their points are recomputed"

    def notes(self, total: int) -> tuple[str, ...]:
        """Lines for the result's notes: how many of ``total`` points were reused, and the
        files deleted."""
        lines = (f"resumed {self.hits} of {total} points from {self.folder}/",) if self.hits else ()
        return lines + ((line,) if (line := self.warning()) else ())


def remove_partial(folder: str | os.PathLike) -> None:
    """Remove a resume folder's chunk files (after the final result is safely written): chunk
    and earlier-format files, and temporaries of writers that were killed; then the folder if
    nothing else is in it. A live writer's temporary and files that are not ours stay."""
    folder = Path(folder)
    try:  # another run of the same --out may be removing it at the same time
        for path in list(folder.iterdir()):
            if _NAME.fullmatch(path.name) or path.suffix == ".npz":
                path.unlink(missing_ok=True)
        left = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in {m[1] for p in left
                 if (m := re.fullmatch(r"\.([0-9a-f]{40}\.safetensors)\..*", p.name))}:
        remove_stale_temporaries(folder / name)
    try:
        folder.rmdir()
    except OSError:  # something else is in it (a live writer's temporary, a user's file)
        pass


def open_cache(
    folder: str | os.PathLike,
    *,
    module,
    loss,
    anchors: tuple[dict, dict],
    data: dict,
    bn_data,
    settings: dict,
    device,
    grid: np.ndarray,
) -> tuple[ChunkCache | None, str | None]:
    """The chunk cache of one evaluation, keyed by its curves' fingerprint; or ``None`` and a
    note when something the curves depend on cannot be fingerprinted (then nothing is reused
    or kept: a stored curve could belong to other inputs). Arguments as for
    :func:`ckptscope.identity.curve_fingerprint`."""
    found = curve_fingerprint(module=module, loss=loss, anchors=anchors, data=data,
                              bn_data=bn_data, settings=settings, device=device)
    if found.unknown:
        more = f" and {len(found.unknown) - 1} more" if len(found.unknown) > 1 else ""
        return None, (f"resume is off: the resume key cannot identify {found.unknown[0]}{more}, "
                      f"so nothing is reused from or kept in {folder}/")
    builtin = isinstance(loss, str)
    counted = [counted_units(loss, y) if builtin else len(x) for x, y in data.values()]
    return ChunkCache(folder, found.key, grid=grid, n_examples=counted, builtin_loss=builtin), None
