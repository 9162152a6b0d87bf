"""CIFAR-10 and CIFAR-100 from the files of https://www.cs.toronto.edu/~kriz/cifar.html, offline.

``cifar10:DIR`` and ``cifar100:DIR`` read either version of the extracted archives:

- python: ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``) or
  ``cifar-100-python/`` (``train``, ``test``): pickled dicts with ``b"data"`` (n, 3072) uint8 and
  ``b"labels"`` (CIFAR-100: ``b"fine_labels"``). They are read by a restricted unpickler that
  admits only containers, numbers, bytes and numpy arrays, so a tampered file cannot run code.
- binary: ``cifar-10-batches-bin/`` (``data_batch_1.bin`` .. ``data_batch_5.bin``,
  ``test_batch.bin``; records of 1 label byte + 3072 pixel bytes) or ``cifar-100-binary/``
  (``train.bin``, ``test.bin``; 2 label bytes, coarse then fine, + 3072 pixel bytes).

``DIR`` is the folder holding the extracted folder, or that folder itself; the python version is
used when both are present. Images come out as (n, 3, 32, 32) float32, normalised per channel
with the training-set mean and std that CIFAR training recipes use; labels as (n,) int64 (the
100 fine classes for CIFAR-100). The splits are the official ones (50,000 / 10,000) and do not
depend on ``seed``.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

import numpy as np
import torch

from ckptscope.data import DATASETS, Dataset, Split
from ckptscope.data.transforms import normalize_pixels
from ckptscope.errors import CkptscopeError

# numpy >= 2 renamed numpy.core to numpy._core; pickles name either, depending on who wrote them.
try:
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

PIXELS = 3 * 32 * 32
URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class Cifar:
    """Where one CIFAR variant keeps its files and how to read them.

    Attributes:
        name: the registry name.
        n_class: the number of (fine) classes.
        mean: per-channel training-set mean, on the [0, 1] scale.
        std: per-channel training-set std, on the [0, 1] scale.
        python_folder: the extracted python version's folder.
        python_files: split -> the pickled batches, in order.
        label_key: the labels' key in a pickled batch.
        binary_folder: the extracted binary version's folder.
        binary_files: split -> the binary batches, in order.
        label_bytes: label bytes before each record's pixels; the last of them is the label kept.
        archives: the archives the two versions come in, for messages.
    """

    name: str
    n_class: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    python_folder: str
    python_files: dict[str, tuple[str, ...]]
    label_key: bytes
    binary_folder: str
    binary_files: dict[str, tuple[str, ...]]
    label_bytes: int
    archives: tuple[str, str]


CIFAR10 = Cifar(
    name="cifar10",
    n_class=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    python_folder="cifar-10-batches-py",
    python_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    label_key=b"labels",
    binary_folder="cifar-10-batches-bin",
    binary_files={"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                  "test": ("test_batch.bin",)},
    label_bytes=1,
    archives=("cifar-10-python.tar.gz", "cifar-10-binary.tar.gz"),
)

CIFAR100 = Cifar(
    name="cifar100",
    n_class=100,
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    python_folder="cifar-100-python",
    python_files={"train": ("train",), "test": ("test",)},
    label_key=b"fine_labels",
    binary_folder="cifar-100-binary",
    binary_files={"train": ("train.bin",), "test": ("test.bin",)},
    label_bytes=2,
    archives=("cifar-100-python.tar.gz", "cifar-100-binary.tar.gz"),
)


# --- the restricted unpickler -------------------------------------------------------------------


def _latin1_encode(text: object, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: latin-1 text only."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise CkptscopeError(
            f"ckptscope refuses to unpickle _codecs.encode with encoding {encoding!r}: pickled "
            f"bytes use 'latin1' only. Re-extract the file from the official archive."
        )
    return text.encode("latin-1")


def _allowed_globals() -> MappingProxyType:
    """(module, name) -> object for every global a CIFAR batch may name, and nothing else."""
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # Old pickles (and the official CIFAR files) name numpy.core, numpy >= 2 writes numpy._core.
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = _multiarray.scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = _numeric._frombuffer  # protocol 5 arrays
    # Python 2 pickles name the builtins module __builtin__; the unpickler passes names verbatim.
    for module in ("builtins", "__builtin__"):
        for kind in (set, frozenset, bytearray, complex):
            allowed[(module, kind.__name__)] = kind
    return MappingProxyType(allowed)


ALLOWED_GLOBALS = _allowed_globals()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only containers, numbers, bytes, strings and numpy arrays.

    Every global a pickle names goes through :meth:`find_class`, which looks it up in
    :data:`ALLOWED_GLOBALS` and raises :class:`CkptscopeError` for anything else, before the
    global is imported, so a file whose ``__reduce__`` would run code is refused unrun.

    Args:
        file: a binary file open for reading.
        source: the file's name, for messages.
        fix: the next step to suggest when a global is refused.
    """

    def __init__(self, file: BinaryIO, *, source: str, fix: str):
        # encoding="bytes": the official files are Python 2 pickles whose str keys become bytes.
        super().__init__(file, encoding="bytes")
        self.source = source
        self.fix = fix

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CkptscopeError(
                f"ckptscope refuses to unpickle {module}.{name} from {self.source}: a CIFAR batch "
                f"holds only containers, numbers, bytes and numpy arrays. {self.fix}"
            ) from None


# --- reading the files ---------------------------------------------------------------------------


def _field(batch: dict, key: bytes) -> object:
    """``batch[key]``, also under the str key that a Python 3 re-pickle would have written."""
    return batch[key] if key in batch else batch.get(key.decode())


def _check_labels(labels: np.ndarray, n: int, spec: Cifar, path: Path, fix: str) -> np.ndarray:
    """Return ``labels`` as (n,) int64 after checking their count and range."""
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        raise CkptscopeError(
            f"{path}: expected {n} integer labels, found {labels.dtype} of shape {labels.shape}. "
            f"{fix}"
        )
    if n and (labels.min() < 0 or labels.max() >= spec.n_class):
        raise CkptscopeError(
            f"{path}: labels span {labels.min()}..{labels.max()}, outside 0..{spec.n_class - 1} "
            f"of {spec.name}. Is this the other CIFAR? {fix}"
        )
    return labels.astype(np.int64)


def read_python_batch(path: Path, spec: Cifar) -> tuple[np.ndarray, np.ndarray]:
    """Return pixels (n, 3072) uint8 and labels (n,) int64 of one pickled batch."""
    fix = (f"Re-extract {spec.archives[0]} from {URL}, or use the binary version "
           f"({spec.binary_folder}/).")
    with open(path, "rb") as f:
        try:
            batch = RestrictedUnpickler(f, source=str(path), fix=fix).load()
        except CkptscopeError:
            raise
        except Exception as err:  # a corrupt pickle can fail with almost any exception type
            raise CkptscopeError(
                f"{path} is not a readable pickle ({type(err).__name__}: {err}). {fix}"
            ) from None
    data = _field(batch, b"data") if isinstance(batch, dict) else None
    labels = _field(batch, spec.label_key) if isinstance(batch, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == PIXELS and labels is not None):
        found = (f"keys {', '.join(sorted(map(repr, batch)))}" if isinstance(batch, dict)
                 else f"a {type(batch).__name__}")
        shape = f" with data {data.dtype} {data.shape}" if isinstance(data, np.ndarray) else ""
        raise CkptscopeError(
            f"{path}: expected a dict with b'data' (n, {PIXELS}) uint8 and {spec.label_key!r}; "
            f"found {found}{shape}. {fix}"
        )
    return data, _check_labels(np.asarray(labels), len(data), spec, path, fix)


def read_binary_batches(paths: list[Path], spec: Cifar) -> tuple[np.ndarray, np.ndarray]:
    """Return pixels (n, 3072) uint8 (a view of one buffer) and labels (n,) int64 of the files."""
    fix = f"Re-extract {spec.archives[1]} from {URL}."
    record = spec.label_bytes + PIXELS
    sizes = [p.stat().st_size for p in paths]
    for path, size in zip(paths, sizes, strict=True):
        if size == 0 or size % record:
            raise CkptscopeError(
                f"{path} has {size} bytes, not a whole number of {record}-byte records "
                f"({spec.label_bytes} label byte(s) + {PIXELS} pixels): truncated, or not "
                f"{spec.name}'s binary version. {fix}"
            )
    # One buffer for every file, so the pixels are read once and converted once.
    buffer = np.empty(sum(sizes), dtype=np.uint8)
    offset = 0
    for path, size in zip(paths, sizes, strict=True):
        with open(path, "rb") as f:
            if f.readinto(memoryview(buffer)[offset:offset + size]) != size:
                raise CkptscopeError(f"{path} changed size while being read. {fix}")
        offset += size
    records = buffer.reshape(-1, record)
    labels = records[:, spec.label_bytes - 1]
    start = 0
    for path, size in zip(paths, sizes, strict=True):  # per file, so an error names the file
        _check_labels(labels[start:start + size // record], size // record, spec, path, fix)
        start += size // record
    return records[:, spec.label_bytes:], labels.astype(np.int64)


def _missing(folder: Path, files: dict[str, tuple[str, ...]]) -> list[str]:
    return [name for names in files.values() for name in names if not (folder / name).is_file()]


def find_files(root: Path, spec: Cifar) -> tuple[str, Path]:
    """Return ("python" or "binary", the folder holding that version's files) under ``root``.

    The extracted folders under ``root`` are tried first, then ``root`` itself.
    """
    files = {"python": spec.python_files, "binary": spec.binary_files}
    folders = f"{spec.python_folder}/ or {spec.binary_folder}/"
    if root.is_file():
        raise CkptscopeError(
            f"{spec.name}:{root} is a file; give the directory holding {folders} (an archive "
            f"must be extracted first: tar xzf {root})."
        )
    if not root.is_dir():
        raise CkptscopeError(
            f"{spec.name}:{root}: no such directory; give the directory holding {folders} "
            f"extracted from {spec.archives[0]} or {spec.archives[1]} ({URL}; ckptscope "
            f"downloads nothing)."
        )
    candidates = [("python", root / spec.python_folder), ("binary", root / spec.binary_folder),
                  ("python", root), ("binary", root)]
    partial = []
    for kind, folder in candidates:
        missing = _missing(folder, files[kind])
        if not missing:
            return kind, folder
        n_files = sum(len(names) for names in files[kind].values())
        if folder.is_dir() and (folder != root or len(missing) < n_files):
            partial.append((folder, missing))
    if partial:
        folder, missing = partial[0]
        raise CkptscopeError(
            f"{spec.name}: {folder} lacks {', '.join(missing)}; re-extract the archive there."
        )
    listed = {kind: ", ".join(name for names in files[kind].values() for name in names)
              for kind in files}
    archives = [a for a in spec.archives if (root / a).is_file()]
    fix = (f"extract {archives[0]} first: tar xzf {root / archives[0]} -C {root}" if archives
           else f"extract {spec.archives[0]} or {spec.archives[1]} from {URL} there "
                f"(ckptscope downloads nothing)")
    raise CkptscopeError(
        f"{spec.name}: {root} holds neither {spec.python_folder}/ ({listed['python']}) nor "
        f"{spec.binary_folder}/ ({listed['binary']}), nor those files itself; {fix}."
    )


def load(spec: Cifar, arg: str | None, *, seed: int = 0) -> dict[str, Split]:
    """Train and test splits from ``arg``, the directory (see the module docstring).

    ``seed`` is accepted for the registry's signature; the official splits do not depend on it.
    """
    if not arg:
        raise CkptscopeError(
            f"{spec.name} needs a directory: --data {spec.name}:DIR, where DIR holds "
            f"{spec.python_folder}/ or {spec.binary_folder}/ from {URL}."
        )
    kind, folder = find_files(Path(arg).expanduser(), spec)
    splits = {}
    files = spec.python_files if kind == "python" else spec.binary_files
    for split, names in files.items():
        paths = [folder / name for name in names]
        if kind == "python":
            batches = [read_python_batch(path, spec) for path in paths]
            pixels = np.concatenate([p for p, _ in batches]) if len(batches) > 1 else batches[0][0]
            labels = np.concatenate([lab for _, lab in batches])
        else:
            pixels, labels = read_binary_batches(paths, spec)
        x = normalize_pixels(pixels.reshape(-1, 3, 32, 32), mean=spec.mean, std=spec.std)
        splits[split] = (x, torch.from_numpy(labels))
    return splits


DATASETS.register("cifar10")(Dataset(
    "cifar10", functools.partial(load, CIFAR10),
    "CIFAR-10 from a local DIR (python or binary version), 50000 train / 10000 test"))
DATASETS.register("cifar100")(Dataset(
    "cifar100", functools.partial(load, CIFAR100),
    "CIFAR-100 (fine labels) from a local DIR (python or binary version), 50000 / 10000"))
