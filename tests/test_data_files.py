"""File-based datasets (CIFAR-10/100, MNIST, Fashion-MNIST), read from tiny files in each format.

Every reader is held against the uint8 pixels and labels that were written: undoing the
normalisation must give the written pixels back exactly.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptscope.data import load_data
from ckptscope.data.cifar import CIFAR10, CIFAR100, Cifar, RestrictedUnpickler
from ckptscope.data.mnist import FASHION_MNIST, MNIST, IdxSet, read_idx
from ckptscope.data.transforms import normalize_pixels, subset
from ckptscope.errors import CkptscopeError

# --- writers for each real format ----------------------------------------------------------------


def _pixels(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size), dtype=np.uint8)


def _py2_pickle(obj: object) -> bytes:
    """Protocol-2 bytes as Python 2's cPickle wrote the official CIFAR files.

    Python 2 str (here: bytes) as BINSTRING, numpy arrays via ``numpy.core.multiarray``; supports
    the bytes, ints, lists, dicts and 2-d uint8 arrays a CIFAR batch holds.
    """

    def enc(o: object) -> bytes:
        if isinstance(o, bytes):
            head = b"U" + bytes([len(o)]) if len(o) < 256 else b"T" + struct.pack("<i", len(o))
            return head + o
        if isinstance(o, (int, np.integer)):
            o = int(o)
            return b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o)
        if isinstance(o, list):
            return b"](" + b"".join(map(enc, o)) + b"e"
        if isinstance(o, dict):
            return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
        if isinstance(o, np.ndarray):
            assert o.dtype == np.uint8 and o.ndim == 2
            dtype = (b"cnumpy\ndtype\n" + enc(b"u1") + enc(0) + enc(1) + b"\x87R"
                     + b"(" + enc(3) + enc(b"|") + b"NNN" + enc(-1) + enc(-1) + enc(0) + b"tb")
            return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + enc(0) + b"\x85"
                    + enc(b"b") + b"\x87R" + b"(" + enc(1) + enc(o.shape[0]) + enc(o.shape[1])
                    + b"\x86" + dtype + b"\x89" + enc(o.tobytes()) + b"tb")
        raise TypeError(type(o))

    return b"\x80\x02" + enc(obj) + b"."


def _dump(batch: dict, path: Path, protocol: int | str) -> None:
    path.write_bytes(_py2_pickle(batch) if protocol == "py2" else pickle.dumps(batch, protocol))


def write_cifar_python(root: Path, spec: Cifar, *, n: int = 3, protocol: int | str = 4,
                       seed: int = 0) -> dict:
    """Write the python version into ``root``; return split -> (pixels (n, 3072), labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, names in spec.python_files.items():
        pixels, labels = [], []
        for name in names:
            batch_pixels = _pixels(rng, n, 3072)
            batch_labels = [int(v) for v in rng.integers(0, spec.n_class, size=n)]
            batch = {b"batch_label": b"batch " + name.encode(), b"data": batch_pixels,
                     spec.label_key: batch_labels,
                     b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
            if spec is CIFAR100:  # coarse labels that differ from the fine ones
                batch[b"coarse_labels"] = [(v + 1) % 20 for v in batch_labels]
            _dump(batch, root / name, protocol)
            pixels.append(batch_pixels)
            labels += batch_labels
        written[split] = (np.concatenate(pixels), np.array(labels))
    return written


def write_cifar_binary(root: Path, spec: Cifar, *, n: int = 3, seed: int = 0) -> dict:
    """Write the binary version into ``root``; return split -> (pixels (n, 3072), labels)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, names in spec.binary_files.items():
        pixels, labels = [], []
        for name in names:
            batch_pixels = _pixels(rng, n, 3072)
            fine = rng.integers(0, spec.n_class, size=(n, 1), dtype=np.uint8)
            heads = fine if spec.label_bytes == 1 else np.hstack([(fine + 1) % 20, fine])
            (root / name).write_bytes(np.hstack([heads, batch_pixels]).tobytes())
            pixels.append(batch_pixels)
            labels.append(fine[:, 0])
        written[split] = (np.concatenate(pixels), np.concatenate(labels))
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) \
        + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, *, gz: bool = False, seed: int = 0) -> dict:
    """Write the four IDX files into ``folder``; return split -> (images (n, 28, 28), labels)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, (images_name, labels_name), n in (
            ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), 6),
            ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), 4)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for name, array in ((images_name, images), (labels_name, labels)):
            data = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        written[split] = (images, labels)
    return written


def assert_round_trip(splits: dict, written: dict, *, mean, std, shape) -> None:
    """Undo the normalisation and compare with the uint8 pixels and labels written."""
    assert sorted(splits) == sorted(written)
    for split, (pixels, labels) in written.items():
        x, y = splits[split]
        n = len(labels)
        assert x.dtype == torch.float32 and tuple(x.shape) == (n, *shape)
        assert y.dtype == torch.int64 and y.tolist() == [int(v) for v in labels]
        m = torch.tensor(mean).reshape(1, -1, 1, 1)
        s = torch.tensor(std).reshape(1, -1, 1, 1)
        back = torch.round((x * s + m) * 255).to(torch.uint8).numpy()
        np.testing.assert_array_equal(back, pixels.reshape(n, *shape))


def assert_cifar(splits: dict, written: dict, spec: Cifar) -> None:
    assert_round_trip(splits, written, mean=spec.mean, std=spec.std, shape=(3, 32, 32))


def assert_mnist(splits: dict, written: dict, spec: IdxSet = MNIST) -> None:
    assert_round_trip(splits, written, mean=(spec.mean,), std=(spec.std,), shape=(1, 28, 28))


# --- CIFAR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "folder"])
@pytest.mark.parametrize("version", ["python", "binary"])
@pytest.mark.parametrize("spec", [CIFAR10, CIFAR100], ids=lambda s: s.name)
def test_load_data_cifar_reads_both_versions_and_dir_forms(tmp_path, spec, version, inside):
    if version == "python":
        folder = tmp_path / spec.python_folder
        written = write_cifar_python(folder, spec)
    else:
        folder = tmp_path / spec.binary_folder
        written = write_cifar_binary(folder, spec)
    splits = load_data(f"{spec.name}:{folder if inside else tmp_path}")
    assert_cifar(splits, written, spec)
    if spec is CIFAR10:
        assert len(splits["train"][0]) == 5 * len(splits["test"][0])  # five training batches


@pytest.mark.parametrize("protocol", ["py2", 2, 3, 4, 5])
def test_load_cifar_python_reads_every_pickle_protocol(tmp_path, protocol):
    written = write_cifar_python(tmp_path / CIFAR10.python_folder, CIFAR10, protocol=protocol)
    assert_cifar(load_data(f"cifar10:{tmp_path}"), written, CIFAR10)


def test_load_cifar_python_accepts_numpy_labels(tmp_path):
    """Re-pickled batches may hold labels as a numpy array or numpy scalars."""
    folder = tmp_path / CIFAR10.python_folder
    written = write_cifar_python(folder, CIFAR10)
    for i, name in enumerate(CIFAR10.python_files["train"]):
        with open(folder / name, "rb") as f:
            batch = pickle.load(f)  # our own file, written above
        labels = batch[b"labels"]
        batch[b"labels"] = np.array(labels) if i % 2 else [np.int64(v) for v in labels]
        _dump(batch, folder / name, 4)
    assert_cifar(load_data(f"cifar10:{tmp_path}"), written, CIFAR10)


def test_load_cifar_prefers_python_version(tmp_path):
    written = write_cifar_python(tmp_path / CIFAR10.python_folder, CIFAR10, seed=1)
    write_cifar_binary(tmp_path / CIFAR10.binary_folder, CIFAR10, seed=2)
    assert_cifar(load_data(f"cifar10:{tmp_path}"), written, CIFAR10)


def test_load_cifar_missing_dir(tmp_path):
    with pytest.raises(CkptscopeError, match=r"no such directory.*cifar-10-batches-py/"):
        load_data(f"cifar10:{tmp_path / 'nowhere'}")


def test_load_cifar_without_dir(tmp_path):
    with pytest.raises(CkptscopeError, match=r"cifar100 needs a directory: --data cifar100:DIR"):
        load_data("cifar100")


def test_load_cifar_empty_dir_names_the_files(tmp_path):
    with pytest.raises(CkptscopeError, match=r"holds neither cifar-10-batches-py/ \(data_batch_1, "
                       r".*test_batch\) nor cifar-10-batches-bin/ \(.*test_batch.bin\)"):
        load_data(f"cifar10:{tmp_path}")


def test_load_cifar_archive_not_extracted(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(CkptscopeError, match=r"extract cifar-10-python.tar.gz first: tar xzf"):
        load_data(f"cifar10:{tmp_path}")
    with pytest.raises(CkptscopeError, match=r"is a file; .*tar xzf"):
        load_data(f"cifar10:{tmp_path / 'cifar-10-python.tar.gz'}")


@pytest.mark.parametrize("inside", [False, True], ids=["parent", "folder"])
def test_load_cifar_missing_file(tmp_path, inside):
    folder = tmp_path / CIFAR10.python_folder
    write_cifar_python(folder, CIFAR10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(CkptscopeError, match=r"cifar-10-batches-py lacks data_batch_3;"):
        load_data(f"cifar10:{folder if inside else tmp_path}")


def test_load_cifar_binary_truncated(tmp_path):
    folder = tmp_path / CIFAR100.binary_folder
    write_cifar_binary(folder, CIFAR100)
    data = (folder / "test.bin").read_bytes()
    (folder / "test.bin").write_bytes(data[:-10])
    with pytest.raises(CkptscopeError, match=r"test.bin has 9212 bytes, not a whole number of "
                                             r"3074-byte records"):
        load_data(f"cifar100:{tmp_path}")


def test_load_cifar_labels_out_of_range(tmp_path):
    """CIFAR-100 batches renamed into a CIFAR-10 layout are caught by their labels."""
    folder = tmp_path / CIFAR10.binary_folder
    write_cifar_binary(folder, CIFAR10)
    data = bytearray((folder / "data_batch_2.bin").read_bytes())
    data[0] = 57
    (folder / "data_batch_2.bin").write_bytes(bytes(data))
    with pytest.raises(CkptscopeError,
                       match=r"data_batch_2.bin: labels span .*57, outside 0..9 of cifar10"):
        load_data(f"cifar10:{tmp_path}")


class _Payload:
    """Unpickling this opens (so creates) ``path`` for writing."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_restricted_unpickler_refuses_code(tmp_path):
    # The control: a plain unpickler does run the payload.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()

    folder = tmp_path / CIFAR10.python_folder
    write_cifar_python(folder, CIFAR10)
    marker = tmp_path / "marker"
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(marker)}
    _dump(batch, folder / "data_batch_2", 2)
    with pytest.raises(CkptscopeError, match=r"refuses to unpickle io.open from "
                                             r".*data_batch_2: a CIFAR batch holds only"):
        load_data(f"cifar10:{tmp_path}")
    assert not marker.exists()


class Unexpected:
    def __init__(self):
        self.value = 1


@pytest.mark.parametrize("protocol", [2, 5])
def test_restricted_unpickler_refuses_unexpected_class(tmp_path, protocol):
    folder = tmp_path / CIFAR100.python_folder
    write_cifar_python(folder, CIFAR100)
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"extra": Unexpected()}
    _dump(batch, folder / "test", protocol)
    with pytest.raises(CkptscopeError, match=r"refuses to unpickle \S*test_data_files.Unexpected "):
        load_data(f"cifar100:{tmp_path}")


def test_restricted_unpickler_refuses_other_codecs(tmp_path):
    path = tmp_path / "p"
    # _codecs.encode('x', 'rot13') in protocol 2: only latin-1 text may become bytes.
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with open(path, "rb") as f, pytest.raises(CkptscopeError, match=r"encoding 'rot13'"):
        RestrictedUnpickler(f, source=str(path), fix="").load()


@pytest.mark.parametrize("content, message", [
    (b"\x80\x04\x95", r"is not a readable pickle \(UnpicklingError|EOFError"),
    (pickle.dumps([1, 2, 3]), r"expected a dict with b'data' \(n, 3072\) uint8 and b'labels'; "
                              r"found a list"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}),
     r"found keys b'data', b'labels' with data float32 \(2, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}),
     r"expected 2 integer labels, found int64 of shape \(1,\)"),
])
def test_load_cifar_malformed_batch(tmp_path, content, message):
    folder = tmp_path / CIFAR10.python_folder
    write_cifar_python(folder, CIFAR10)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(CkptscopeError, match=message):
        load_data(f"cifar10:{tmp_path}")


# --- MNIST ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", [".", "raw", "MNIST/raw"])
def test_load_data_mnist_layouts(tmp_path, gz, layout):
    written = write_idx_set(tmp_path / layout, gz=gz)
    assert_mnist(load_data(f"mnist:{tmp_path}"), written)


def test_load_data_fashion_mnist(tmp_path):
    written = write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    assert_mnist(load_data(f"fashion-mnist:{tmp_path}"), written, FASHION_MNIST)


def test_load_mnist_prefers_plain_file(tmp_path):
    written = write_idx_set(tmp_path, seed=1)
    write_idx_set(tmp_path, gz=True, seed=2)
    assert_mnist(load_data(f"mnist:{tmp_path}"), written)


def test_load_mnist_missing_dir(tmp_path):
    with pytest.raises(CkptscopeError, match=r"mnist:.*nowhere: no such directory.*or MNIST/raw/"):
        load_data(f"mnist:{tmp_path / 'nowhere'}")


def test_load_mnist_empty_dir(tmp_path):
    with pytest.raises(CkptscopeError, match=r"found none of train-images-idx3-ubyte, .*"
                                             r"t10k-labels-idx1-ubyte \(plain or .gz\) in"):
        load_data(f"mnist:{tmp_path}")


def test_load_mnist_missing_file(tmp_path):
    write_idx_set(tmp_path / "MNIST" / "raw", gz=True)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(CkptscopeError, match=r"MNIST/raw lacks t10k-labels-idx1-ubyte \(plain"):
        load_data(f"mnist:{tmp_path}")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_truncated(tmp_path, gz):
    data = idx_bytes(np.zeros((5, 28, 28), np.uint8))[:-100]
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(CkptscopeError, match=r"truncated"):
        read_idx(path, ndim=3)


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((5, 28, 28), np.uint8)))[:-30])
    with pytest.raises(CkptscopeError, match=r"cannot be read \(EOFError"):
        read_idx(path, ndim=3)


def test_read_idx_longer_than_declared(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)) + b"\x00")
    with pytest.raises(CkptscopeError, match=r"holds 6 data bytes but its header declares "
                                             r"shape \(5,\), 5 bytes; it is longer"):
        read_idx(path, ndim=1)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_read_idx_huge_declared_size_allocates_nothing(tmp_path, gz):
    """A header declaring ~3 TB must fail on the length check, not on a MemoryError."""
    data = struct.pack(">IIII", 0x0803, 2**32 - 1, 28, 28) + bytes(784)
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(CkptscopeError, match=r"truncated"):
        read_idx(path, ndim=3)


@pytest.mark.parametrize("content, ndim, message", [
    (idx_bytes(np.zeros(5, np.uint8)), 3, r"expected magic 0x00000803, found magic 0x00000801"),
    (b"\x00\x00\x0d\x03" + bytes(20), 3, r"found magic 0x00000d03"),
    (b"", 1, r"found an empty file"),
    (b"\x00\x00\x08\x03\x00\x00", 3, r"truncated inside its 16-byte header"),
])
def test_read_idx_wrong_magic_or_header(tmp_path, content, ndim, message):
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(CkptscopeError, match=message):
        read_idx(path, ndim=ndim)


def test_read_idx_not_gzip(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(CkptscopeError, match=r"cannot be read \(BadGzipFile"):
        read_idx(path, ndim=3)


def test_load_mnist_counts_differ(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(CkptscopeError, match=r"holds 4 images but .* 3 labels"):
        load_data(f"mnist:{tmp_path}")


# --- transforms ----------------------------------------------------------------------------------


def test_normalize_pixels_matches_float64_reference():
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 3, 5, 5), dtype=np.uint8)
    mean, std = CIFAR10.mean, CIFAR10.std
    x = normalize_pixels(pixels[:, :, ::-1], mean=mean, std=std)  # a strided view is fine
    ref = (pixels[:, :, ::-1] / 255.0 - np.reshape(mean, (1, 3, 1, 1))) \
        / np.reshape(std, (1, 3, 1, 1))
    assert x.dtype == torch.float32 and x.is_contiguous()
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-6, atol=1e-6)


def test_subset_is_seeded_and_keeps_pairs():
    x = torch.arange(20).reshape(10, 2)
    y = torch.arange(10)
    splits = {"train": (x, y), "test": (x[:3].numpy(), y[:3].numpy())}
    a = subset(splits, 4, seed=0)
    assert len(a["train"][0]) == 4 and len(a["test"][0]) == 3  # a small split stays whole
    assert isinstance(a["test"][0], np.ndarray)
    sub_x, sub_y = a["train"]
    assert torch.equal(sub_x, x[sub_y])  # inputs still match their targets
    assert len(set(sub_y.tolist())) == 4
    assert torch.equal(subset(splits, 4, seed=0)["train"][1], sub_y)
    assert not torch.equal(subset(splits, 4, seed=1)["train"][1], sub_y)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_subset_bad_size(n):
    with pytest.raises(CkptscopeError, match=r"subset size .* is not a positive integer"):
        subset({"train": (torch.zeros(3), torch.zeros(3))}, n, seed=0)
