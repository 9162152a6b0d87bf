"""Permutation specs from the fx graph, weight matching against brute force, and the errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ckptscope.adapters.mlp import MLP
from ckptscope.adapters.resnet import resnet18
from ckptscope.align import PermutationSpec, alignment, apply_permutation, spec_from_graph
from ckptscope.align.spec import check_spec
from ckptscope.align.weights import inner_product, weight_matching
from ckptscope.errors import CkptscopeError


def _state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _brute_force(spec, ref, other, name, perms):
    """The best permutation of class ``name`` over all n! of them, the others held."""
    n = len(perms[name])
    best, best_value = None, -float("inf")
    for order in itertools.permutations(range(n)):
        trial = {**perms, name: torch.tensor(order)}
        value = inner_product(spec, ref, apply_permutation(spec, trial, other))
        if value > best_value:
            best, best_value = trial[name], value
    return best, best_value


def test_weight_matching_finds_the_brute_force_optimum_of_one_class():
    model = MLP([3, 4, 2])
    spec = spec_from_graph(model)
    assert list(spec.classes) == ["layers.0"]
    for seed in range(5):
        ref, other = _state(model, 2 * seed), _state(model, 2 * seed + 1)
        found = weight_matching(spec, ref, other)
        best, best_value = _brute_force(spec, ref, other, "layers.0",
                                        {"layers.0": torch.arange(4)})
        assert torch.equal(found.perms["layers.0"], best)
        assert found.objective_after == pytest.approx(best_value, rel=1e-6)


def test_weight_matching_ends_where_no_class_alone_can_do_better():
    model = MLP([3, 4, 4, 2])
    spec = spec_from_graph(model)
    ref, other = _state(model, 0), _state(model, 1)
    found = weight_matching(spec, ref, other, seed=1)
    for name in spec.classes:  # coordinate descent's fixed point, checked by enumeration
        _, best_value = _brute_force(spec, ref, other, name, found.perms)
        assert found.objective_after == pytest.approx(best_value, rel=1e-6)


def test_spec_from_graph_of_a_resnet_ties_each_stage_through_its_residual_adds():
    spec = spec_from_graph(resnet18(width=4))
    stream = next(axes for axes in spec.classes.values() if ("layer1.1.conv2.weight", 0) in axes)
    # the stem's output, both blocks' second convs and the next stage's inputs share a class
    for axis in [("conv1.weight", 0), ("bn1.running_mean", 0), ("layer1.0.conv2.weight", 0),
                 ("layer1.0.conv1.weight", 1), ("layer2.0.downsample.0.weight", 1)]:
        assert axis in stream
    assert len(spec.classes) == 4 + 8  # four streams, one inner class per block
    assert ("fc.weight", 1) in next(a for a in spec.classes.values() if ("fc.weight", 1) in a)
    assert all(ax[0] != "fc.bias" for a in spec.classes.values() for ax in a)


def test_spec_leaves_a_grouped_conv_and_an_unknown_module_fixed_and_names_them():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.conv2 = nn.Conv2d(8, 6, 1)
            self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
            self.fc1 = nn.Linear(6, 5)
            self.fc2 = nn.Linear(5, 2)

        def forward(self, x):
            x = self.conv2(torch.relu(self.grouped(torch.relu(self.conv1(x)))))
            x = x.mean((2, 3)).unsqueeze(1)
            x, _ = self.attn(x, x, x)
            return self.fc2(torch.relu(self.fc1(x[:, 0])))

    model = Mixed()
    spec = spec_from_graph(model)
    assert list(spec.classes) == ["fc1"]
    note = spec.note(model.state_dict())
    assert note.startswith("left fixed: ") and "\n" not in note
    assert "grouped conv 'grouped'" in note and "'attn' (MultiheadAttention)" in note
    ref, other = _state(model, 0), _state(model, 1)
    result = alignment(ref, other, model)
    assert result.note == note
    x = torch.randn(2, 3, 5, 5)
    model.load_state_dict(other)
    want = model(x)
    model.load_state_dict(result.state)
    torch.testing.assert_close(model(x), want)


def test_spec_from_graph_of_a_depthwise_conv_carries_the_class():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6, padding=1),
                          nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))
    spec = spec_from_graph(model)
    [(name, axes)] = spec.classes.items()
    assert {("0.weight", 0), ("2.weight", 0), ("3.running_var", 0), ("5.weight", 1)} <= set(axes)


def test_align_refuses_a_model_where_nothing_can_be_permuted():
    with pytest.raises(CkptscopeError, match=r"nothing in Sequential can be permuted"):
        spec_from_graph(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
    with pytest.raises(CkptscopeError, match=r"^nothing in Linear can be permuted.*\.$"):
        alignment(nn.Linear(4, 3).state_dict(), nn.Linear(4, 3).state_dict(), nn.Linear(4, 3))


def test_align_refuses_a_model_fx_cannot_trace():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.fc2(self.fc1(x))

    with pytest.raises(CkptscopeError, match=r"torch.fx cannot trace Branchy .*by hand"):
        spec_from_graph(Branchy())


def test_align_with_a_spec_given_by_hand():
    class Opaque(nn.Module):  # reads its weights directly: nothing the rules can place
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(5, 3))
            self.w2 = nn.Parameter(torch.randn(2, 5))

        def forward(self, x):
            return torch.relu(x @ self.w1.T) @ self.w2.T

    spec = PermutationSpec({"hidden": (("w1", 0), ("w2", 1))})
    model = Opaque()
    ref, other = _state(model, 0), _state(model, 1)
    result = alignment(ref, other, model, spec=spec)
    x = torch.randn(4, 3)
    torch.testing.assert_close(torch.relu(x @ result.state["w1"].T) @ result.state["w2"].T,
                               torch.relu(x @ other["w1"].T) @ other["w2"].T)
    with pytest.raises(CkptscopeError, match="activation matching needs .* method='weights'"):
        alignment(ref, other, model, spec=spec, method="activations", data=x)


@pytest.mark.parametrize("classes, message", [
    ({}, "has no class"),
    ({"h": ()}, "class 'h' holds no axis"),
    ({"h": (("nope", 0),)}, "names 'nope', which is not in the state"),
    ({"h": (("w1", 0), ("w2", 0))}, "mixes sizes w1\\[0\\]=5, w2\\[0\\]=2"),
    ({"h": (("w1", 2),)}, "'w1' has 2 dims, no dim 2"),
    ({"h": (("steps", 0),)}, "only floating tensors are permuted"),
])
def test_check_spec_refuses_a_bad_spec(classes, message):
    state = {"w1": torch.zeros(5, 3), "w2": torch.zeros(2, 5), "steps": torch.zeros(5).long()}
    with pytest.raises(CkptscopeError, match=message):
        check_spec(PermutationSpec(classes), state)


def test_align_refuses_an_unknown_method_and_a_mismatched_pair():
    a = MLP([3, 4, 2]).state_dict()
    with pytest.raises(CkptscopeError, match=r"method 'magic' is not one of \('weights', "):
        alignment(a, a, MLP([3, 4, 2]), method="magic")
    with pytest.raises(CkptscopeError, match="do not match"):
        alignment(a, MLP([3, 5, 2]).state_dict(), MLP([3, 4, 2]))


def test_spec_of_a_flatten_without_pool_permutes_the_linear_input_in_blocks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 2))
    spec = spec_from_graph(model)
    assert spec.classes == {"0": (("0.weight", 0), ("0.bias", 0), ("3.weight", 1, 25))}
    assert ("flatten", -1) not in spec.sites["0"]  # its last axis is not the channels
    state = _state(model, 0)
    perm = torch.tensor([2, 0, 3, 1])
    out = apply_permutation(spec, {"0": perm}, state)
    # the obvious way: the Linear's input as (out, channel, position), channels reordered
    want = state["3.weight"].reshape(2, 4, 25)[:, perm].reshape(2, 100)
    assert torch.equal(out["3.weight"], want)
    assert torch.equal(out["0.weight"], state["0.weight"][perm])


def test_check_spec_refuses_blocks_that_do_not_divide_the_axis():
    state = {"w": torch.zeros(3, 10), "c": torch.zeros(4, 2)}
    with pytest.raises(CkptscopeError, match=r"'w' dim 1 \(10\) is not a whole number of "
                                             r"blocks of 3"):
        check_spec(PermutationSpec({"h": (("c", 0), ("w", 1, 3))}), state)

