"""Alignment's guarantees, for every built-in adapter and a model the adapters don't know:
the aligned network computes OTHER's function, a permuted copy is recovered exactly, aligning to
itself is the identity, and the result is deterministic for a seed."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from ckptscope.adapters.mlp import MLP
from ckptscope.adapters.resnet import resnet18, resnet34, resnet50
from ckptscope.adapters.vgg import VGG
from ckptscope.align import (
    alignment,
    apply_permutation,
    inverse,
    random_permutations,
    spec_from_graph,
)
from ckptscope.align.spec import check_spec

NARROW_VGG = (4, "M", 8, "M", 8, 8, "M", 16, 16, "M", 16, 16, "M")  # VGG-11's 8 convs


def _sequential():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _flattening():
    """A classic CNN: a feature map flattened without a global pool (blocked axes)."""
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(5, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dropout(),
                         nn.Linear(4 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 2))


MODELS = {  # name -> (build, input shape)
    "mlp": (lambda: MLP([12, 9, 7, 3]), (12,)),
    "mlp-bn": (lambda: MLP([12, 9, 7, 3], batchnorm=True), (12,)),
    "resnet18": (lambda: resnet18(num_classes=3, width=4), (3, 8, 8)),
    "resnet34": (lambda: resnet34(num_classes=3, width=2), (3, 8, 8)),
    "resnet50": (lambda: resnet50(num_classes=3, width=2), (3, 8, 8)),
    "vgg11": (lambda: VGG(NARROW_VGG, num_classes=3), (3, 32, 32)),
    "vgg11-bn": (lambda: VGG(NARROW_VGG, batchnorm=True, num_classes=3), (3, 32, 32)),
    "sequential": (_sequential, (3, 6, 6)),
    "flattening": (_flattening, (3, 6, 6)),
}


def _state(build, seed: int) -> dict[str, torch.Tensor]:
    """A fresh network's state with non-trivial BatchNorm statistics and counters."""
    torch.manual_seed(seed)
    model = build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 100)
    for k, v in state.items():
        if k.endswith("running_mean"):
            state[k] = torch.randn(v.shape, generator=generator)
        elif k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=generator) + 0.5
        elif k.endswith(("bn1.weight", "bn2.weight", "bn3.weight")) or ".norms." in k:
            state[k] = torch.randn(v.shape, generator=generator)
        elif k.endswith("num_batches_tracked"):
            state[k] = torch.tensor(seed + 7)
    return state


def _outputs(build, state, x):
    model = build()
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", list(MODELS))
def test_align_computes_the_same_function_as_other(name):
    build, shape = MODELS[name]
    ref, other = _state(build, 0), _state(build, 1)
    result = alignment(ref, other, build())
    assert result.changed  # two independent networks: something was permuted
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5))
    want, got = _outputs(build, other, x), _outputs(build, result.state, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k, v in other.items():
        if not v.is_floating_point():
            assert result.state[k].dtype == v.dtype and torch.equal(result.state[k], v)
    assert result.objective_after >= result.objective_before
    assert result.distance_after <= result.distance_before


@pytest.mark.parametrize("name", list(MODELS))
def test_align_recovers_a_permuted_copy_exactly(name):
    build, _ = MODELS[name]
    ref = _state(build, 0)
    spec = spec_from_graph(build())
    perms = random_permutations(check_spec(spec, ref), seed=11)
    shuffled = apply_permutation(spec, perms, ref)
    assert any(not torch.equal(shuffled[k], ref[k]) for k in spec.permuted)
    result = alignment(ref, shuffled, build())
    for k in ref:
        assert torch.equal(result.state[k], ref[k]), k
    for c, p in perms.items():  # the permutation found undoes the one applied
        assert torch.equal(p[result.perms[c]], torch.arange(len(p)))


@pytest.mark.parametrize("name", ["mlp", "resnet18", "vgg11-bn", "sequential"])
def test_align_to_itself_is_the_identity(name):
    build, _ = MODELS[name]
    ref = _state(build, 0)
    result = alignment(ref, ref, build())
    assert result.changed == []
    assert all(torch.equal(result.state[k], ref[k]) for k in ref)


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_align_is_deterministic_for_a_seed(name):
    build, _ = MODELS[name]
    ref, other = _state(build, 0), _state(build, 1)
    first = alignment(ref, other, build(), seed=3)
    again = alignment(ref, other, build(), seed=3)
    assert first.perms.keys() == again.perms.keys()
    assert all(torch.equal(first.perms[c], again.perms[c]) for c in first.perms)
    assert first.objective_after == again.objective_after


@pytest.mark.parametrize("name", ["mlp", "mlp-bn", "vgg11-bn", "sequential", "flattening"])
def test_activation_matching_keeps_the_function_and_recovers_a_copy(name):
    build, shape = MODELS[name]
    ref, other = _state(build, 0), _state(build, 1)
    x = torch.randn(64, *shape, generator=torch.Generator().manual_seed(2))
    result = alignment(ref, other, build(), method="activations", data=x)
    torch.testing.assert_close(_outputs(build, result.state, x[:4]),
                               _outputs(build, other, x[:4]), rtol=1e-5, atol=1e-5)
    assert result.objective_after >= result.objective_before
    spec = spec_from_graph(build())
    shuffled = apply_permutation(spec, random_permutations(check_spec(spec, ref), seed=4), ref)
    found = alignment(ref, shuffled, build(), method="activations", data=x)
    assert all(torch.equal(found.state[k], ref[k]) for k in ref)
    itself = alignment(ref, ref, build(), method="activations", data=x)
    assert itself.changed == []


def test_inverse_undoes_a_permutation():
    p = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p[inverse(p)], torch.arange(9))
    assert torch.equal(inverse(p)[p], torch.arange(9))


def test_align_of_tied_tensors_permutes_every_alias():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 6)
            self.hidden = nn.Linear(6, 6)
            self.b = nn.Linear(6, 2)
            self.again = self.hidden  # one module, two names: keys hidden.* and again.*

        def forward(self, x):
            return self.b(torch.relu(self.again(torch.relu(self.hidden(torch.relu(self.a(x)))))))

    ref, other = _state(Tied, 0), _state(Tied, 1)
    result = alignment(ref, other, Tied())
    assert {"hidden.weight", "again.weight"} <= set(result.permuted)
    assert torch.equal(result.state["hidden.weight"], result.state["again.weight"])
    x = torch.randn(3, 5)
    torch.testing.assert_close(_outputs(Tied, result.state, x), _outputs(Tied, other, x))


def test_ckptscope_align_reads_files_and_returns_a_state_dict(tmp_path):
    import ckptscope
    from ckptscope.checkpoints import save_checkpoint

    build, _ = MODELS["mlp"]
    meta = {"adapter": "mlp", "adapter_options": {"widths": [12, 9, 7, 3]}}
    ref = save_checkpoint(tmp_path / "a.safetensors", _state(build, 0), metadata=meta)
    other = save_checkpoint(tmp_path / "b.safetensors", _state(build, 1), metadata=meta)
    aligned = ckptscope.align(ref, other)  # the adapter from the metadata
    assert set(aligned) == set(_state(build, 1))
    want = alignment(_state(build, 0), _state(build, 1), build()).state
    assert all(torch.equal(aligned[k], want[k]) for k in want)
