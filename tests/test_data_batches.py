"""Data given in Python as batches: DataLoaders, iterators, lists of (x, y) pairs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ckptscope
from ckptscope.data import as_splits
from ckptscope.errors import CkptscopeError
from ckptscope.identity import curve_fingerprint


@pytest.fixture
def xy():
    g = torch.Generator().manual_seed(0)
    return torch.randn(50, 2, generator=g), (torch.rand(50, generator=g) > 0.5).float()


def _chunks(x, y, size):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("make", [
    lambda x, y: DataLoader(TensorDataset(x, y), batch_size=7),
    lambda x, y: iter(_chunks(x, y, 9)),
    lambda x, y: _chunks(x, y, 20),  # a list of three pairs: batches
    lambda x, y: [(x, y)],  # one batch
    lambda x, y: ((a.numpy(), b.numpy()) for a, b in _chunks(x, y, 16)),  # arrays
    lambda x, y: (lambda: iter(_chunks(x, y, 11))),  # a callable returning batches
])
def test_batches_are_concatenated_in_order(xy, make):
    x, y = xy
    [(split, (got_x, got_y))] = as_splits(make(x, y)).items()
    assert split == "eval" and got_x.device.type == "cpu"
    assert torch.equal(got_x, x) and torch.equal(got_y, y)


def test_mapping_of_loaders_and_pairs(xy):
    x, y = xy
    splits = as_splits({"test": DataLoader(TensorDataset(x, y), batch_size=8),
                        "train": (x[:10], y[:10])})
    assert list(splits) == ["test", "train"]
    assert torch.equal(splits["test"][0], x) and torch.equal(splits["train"][1], y[:10])


def test_plain_pair_is_still_inputs_and_targets(xy):
    x, y = xy
    [(got_x, got_y)] = as_splits((x, y)).values()
    assert got_x is x and got_y is y
    [(got_x, _)] = as_splits(([[0.0, 1.0], [2.0, 3.0]], [0, 1])).values()  # nested lists: data
    assert got_x.shape == (2, 2)


@pytest.mark.parametrize("data, match", [
    (lambda x, y: _chunks(x, y, 25), r"list of two \(tensor, tensor\) pairs: two batches, or "
                                     r"\(inputs, targets\)\? Pass batches as an iterator"),
    (lambda x, y: {"test": _chunks(x, y, 25)}, r"data\['test'\] is a list of two"),
    (lambda x, y: iter([{"input_ids": x, "labels": y}]), r"batch 0 is a mapping with keys "
                                                        r"\['input_ids', 'labels'\].*\(inputs, "
                                                        r"targets\) pairs instead"),
    (lambda x, y: iter([]), "yielded no batch; an iterator can be read only once"),
    (lambda x, y: iter([(x, y), (x[:, :1], y)]), r"batch 1's inputs are \(50, 1\) "
                                                 r"torch.float32, batch 0's \(50, 2\)"),
    (lambda x, y: iter([(x, y), (x, y.long())]), r"batch 1's targets .*torch.int64"),
    (lambda x, y: iter([(x, y, y)]), r"batch 0 is a tuple of 3, not an \(inputs, targets\)"),
    (lambda x, y: iter([x]), r"batch 0 is a Tensor, not an \(inputs, targets\) pair"),
    (lambda x, y: iter([(x, y[:3])]), "batch 0 has 50 inputs and 3 targets"),
    (lambda x, y: iter([(x, 3)]), "batch 0's targets are a int, not a tensor"),
    (lambda x, y: 3, "data is a int; give \\(inputs, targets\\), a DataLoader"),
])
def test_bad_batches_are_refused_with_the_fix(xy, data, match):
    with pytest.raises(CkptscopeError, match=match):
        as_splits(data(*xy))


def test_shuffling_or_dropping_loader_warns(xy):
    x, y = xy
    with pytest.warns(UserWarning, match="shuffles; it is read once"):
        as_splits(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    with pytest.warns(UserWarning, match="drop_last=True: its last 2 example"):
        as_splits(DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        as_splits(DataLoader(TensorDataset(x, y), batch_size=8))


def test_linear_path_on_a_dataloader_equals_the_tensors(mlp_pair, xy):
    module, a, b = mlp_pair
    x, y = xy
    kwargs = dict(groups=["layers.1"], alphas=5, loss="bce")
    want = ckptscope.linear_path(a, b, module, {"test": (x, y)}, **kwargs)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    got = ckptscope.linear_path(a, b, module, {"test": loader}, **kwargs)
    np.testing.assert_array_equal(got.loss.values, want.loss.values)
    np.testing.assert_array_equal(got.accuracy.values, want.accuracy.values)
    # A reference by hand at the end point: the mean BCE over every example.
    module.load_state_dict(b)
    with torch.no_grad():
        ref = torch.nn.functional.binary_cross_entropy_with_logits(module(x).squeeze(1), y)
    np.testing.assert_allclose(got.loss.sel(group="all", split="test", alpha=1.0).item(),
                               ref.item(), rtol=1e-6)


def test_linear_paths_read_a_generator_once(mlp_pair, xy):
    module, a, b = mlp_pair
    x, y = xy
    reads = []

    def batches():
        for chunk in _chunks(x, y, 10):
            reads.append(1)
            yield chunk

    ds = ckptscope.linear_paths([(a, b), (b, a)], module, batches(), alphas=3, loss="bce")
    assert ds.sizes["run"] == 2 and len(reads) == 5


def test_fingerprint_sees_the_concatenated_bytes(mlp_pair, xy):
    module, a, b = mlp_pair
    x, y = xy

    def key(data):
        return curve_fingerprint(module=module, loss="bce", anchors=(a, b),
                                 data=as_splits(data), bn_data=None, settings={},
                                 device=torch.device("cpu")).key

    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    assert key(loader) == key((x, y))
    y2 = y.clone()
    y2[-1] = 1 - y2[-1]  # one target of the last batch differs
    assert key(DataLoader(TensorDataset(x, y2), batch_size=7)) != key(loader)
