"""MNIST and Fashion-MNIST from their IDX files, offline.

``mnist:DIR`` and ``fashion-mnist:DIR`` read ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
plain or gzipped (``.gz``; the plain file wins when both exist), from ``DIR``, ``DIR/raw/`` or
the torchvision layout ``DIR/MNIST/raw/`` (``DIR/FashionMNIST/raw/``). Every header is checked:
the magic number, and the declared sizes against the file's length before anything that size is
allocated. Images come out as (n, 1, 28, 28) float32 normalised with the training-set mean and
std, labels as (n,) int64. The splits are the official ones (60,000 / 10,000) and do not depend
on ``seed``.
"""

from __future__ import annotations

import functools
import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ckptscope.data import DATASETS, Dataset, Split
from ckptscope.data.transforms import normalize_pixels
from ckptscope.errors import CkptscopeError

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these sets use
CHUNK = 1 << 20


@dataclass(frozen=True)
class IdxSet:
    """A dataset stored as the four MNIST-style IDX files.

    Attributes:
        name: the registry name.
        folder: the torchvision folder name (``DIR/<folder>/raw/``).
        mean: the training-set pixel mean, on the [0, 1] scale.
        std: the training-set pixel std, on the [0, 1] scale.
        source: where the files come from, for messages.
    """

    name: str
    folder: str
    mean: float
    std: float
    source: str


MNIST = IdxSet("mnist", "MNIST", 0.1307, 0.3081, "the MNIST page or a torchvision download")
FASHION_MNIST = IdxSet("fashion-mnist", "FashionMNIST", 0.2860, 0.3530,
                       "github.com/zalandoresearch/fashion-mnist or a torchvision download")


def _read_exactly(f, n: int, path: Path, what: str) -> bytes:
    """Read ``n`` bytes, in chunks so a stream (gzip) never holds more than it really has."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(min(CHUNK, n - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got < n:
        raise CkptscopeError(
            f"{path} is truncated: its header declares {what}, but the file ends after {got} of "
            f"those bytes. Re-extract or re-download it."
        )
    return b"".join(chunks)


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Return an IDX file of unsigned bytes as a read-only uint8 array of its declared shape.

    Args:
        path: the file; gzip-compressed when its name ends in ``.gz``.
        ndim: the number of dims the file must declare (3 for images, 1 for labels).

    Raises:
        CkptscopeError: the magic number is not ``0x000008`` + ``ndim``, the file is shorter or
            longer than its header declares, or it cannot be read (a bad gzip stream).
    """
    gzipped = path.name.endswith(".gz")
    header = 4 + 4 * ndim
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as f:
            head = f.read(header)
            magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
            if magic != (UBYTE << 8 | ndim):
                found = "an empty file" if not head else f"magic 0x{head[:4].hex()}"
                raise CkptscopeError(
                    f"{path} is not an IDX file of {ndim}-d unsigned bytes: expected magic "
                    f"0x{UBYTE << 8 | ndim:08x}, found {found}. Is it the right file, and "
                    f"{'gzipped' if gzipped else 'decompressed (gunzip it)'}?"
                )
            if len(head) < header:
                raise CkptscopeError(f"{path} is truncated inside its {header}-byte header.")
            shape = struct.unpack(f">{ndim}I", head[4:])
            size = math.prod(shape)
            what = f"shape {shape}, {size} bytes"
            if not gzipped:  # the length is known up front: check it before allocating
                length = path.stat().st_size - header
                if length != size:
                    raise CkptscopeError(
                        f"{path} holds {length} data bytes but its header declares {what}; "
                        f"it is {'truncated' if length < size else 'longer than declared'}. "
                        f"Re-extract or re-download it."
                    )
            data = _read_exactly(f, size, path, what)
            if gzipped and f.read(1):
                raise CkptscopeError(
                    f"{path} is longer than its header declares ({what}). Re-download it."
                )
    except (OSError, EOFError, zlib.error) as err:
        raise CkptscopeError(
            f"{path} cannot be read ({type(err).__name__}: {err}); the download is probably "
            f"damaged. Re-download it."
        ) from None
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _resolve(folder: Path, name: str) -> Path | None:
    """The plain file, else the gzipped one, else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_files(root: Path, spec: IdxSet) -> dict[str, tuple[Path, Path]]:
    """Return split -> (images, labels) paths in ``root``, ``root/raw`` or ``root/<folder>/raw``."""
    names = [name for pair in FILES.values() for name in pair]
    hint = f"get them from {spec.source}; ckptscope downloads nothing"
    if not root.is_dir():
        raise CkptscopeError(
            f"{spec.name}:{root}: no such directory; give the directory holding "
            f"{', '.join(names)} (or .gz) or {spec.folder}/raw/ ({hint})."
        )
    partial = []
    for folder in (root, root / "raw", root / spec.folder / "raw"):
        found = {name: _resolve(folder, name) for name in names}
        if all(found.values()):
            return {split: (found[images], found[labels])
                    for split, (images, labels) in FILES.items()}
        if any(found.values()):
            partial.append((folder, [name for name, path in found.items() if path is None]))
    if partial:
        folder, missing = partial[0]
        raise CkptscopeError(
            f"{spec.name}: {folder} lacks {', '.join(missing)} (plain or .gz); {hint}."
        )
    raise CkptscopeError(
        f"{spec.name}: found none of {', '.join(names)} (plain or .gz) in {root}, {root}/raw or "
        f"{root}/{spec.folder}/raw; {hint}."
    )


def load(spec: IdxSet, arg: str | None, *, seed: int = 0) -> dict[str, Split]:
    """Train and test splits from ``arg``, the directory (see the module docstring).

    ``seed`` is accepted for the registry's signature; the official splits do not depend on it.
    """
    if not arg:
        raise CkptscopeError(
            f"{spec.name} needs a directory: --data {spec.name}:DIR, where DIR holds the four "
            f"IDX files ({spec.source})."
        )
    splits = {}
    for split, (images_path, labels_path) in find_files(Path(arg).expanduser(), spec).items():
        images = read_idx(images_path, ndim=3)
        labels = read_idx(labels_path, ndim=1)
        if images.shape[1:] != (28, 28):
            raise CkptscopeError(
                f"{images_path} holds {images.shape[1]}x{images.shape[2]} images; {spec.name} "
                f"images are 28x28."
            )
        if len(images) != len(labels):
            raise CkptscopeError(
                f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} "
                f"labels; they come in pairs from the same download."
            )
        if len(labels) and labels.max() > 9:
            raise CkptscopeError(
                f"{labels_path} holds label {labels.max()}; {spec.name} has classes 0..9."
            )
        x = normalize_pixels(images[:, None], mean=(spec.mean,), std=(spec.std,))
        splits[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    return splits


DATASETS.register("mnist")(Dataset(
    "mnist", functools.partial(load, MNIST),
    "MNIST from local IDX files in DIR (plain or .gz), 60000 train / 10000 test"))
DATASETS.register("fashion-mnist")(Dataset(
    "fashion-mnist", functools.partial(load, FASHION_MNIST),
    "Fashion-MNIST from local IDX files in DIR (plain or .gz), 60000 train / 10000 test"))
