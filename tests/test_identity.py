"""Tensor identity: tied aliases, and the parameter / buffer / non-float split."""

from __future__ import annotations

import torch

from ckptscope.identity import (
    aliases,
    buffer_keys,
    float_keys,
    named_tensors,
    nonfloat_keys,
    parameter_keys,
    state_aliases,
    tied,
    unique,
    unique_keys,
)
from tests.conftest import SmallConvNet
from tests.test_hoist import Tied


def test_aliases_map_every_name_of_a_tied_tensor_to_its_first():
    slots = named_tensors(Tied())
    alias = aliases(slots)
    assert alias["dec.weight"] == "enc.weight" and alias["enc.weight"] == "enc.weight"
    assert alias["mid.weight"] == "mid.weight"
    # Restricted to the names a checkpoint has, in its order: the first of those.
    assert aliases(slots, ["dec.weight", "mid.bias", "enc.weight", "nothing"]) == {
        "dec.weight": "dec.weight", "mid.bias": "mid.bias", "enc.weight": "dec.weight"}
    assert tied(["dec.weight"], slots) == {"enc.weight", "dec.weight"}
    assert unique(["dec.weight", "mid.weight", "enc.weight"], alias) == ["dec.weight", "mid.weight"]


def test_state_aliases_follow_shared_storage():
    state = Tied().state_dict()  # the tied tensor under both names, one storage
    alias = state_aliases(state)
    assert alias["dec.weight"] == "enc.weight"
    cloned = {k: v.clone() for k, v in state.items()}
    assert state_aliases(cloned)["dec.weight"] == "dec.weight"
    empty = {"a": torch.empty(0), "b": torch.empty(0)}
    assert state_aliases(empty) == {"a": "a", "b": "b"}


def test_parameter_buffer_and_non_float_keys():
    module = SmallConvNet()
    state = module.state_dict()
    params = {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.weight", "fc.bias"}
    buffers = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    assert parameter_keys(state, module) == parameter_keys(state) == params
    assert buffer_keys(state, module) == buffer_keys(state) == buffers
    assert nonfloat_keys(state) == ["bn.num_batches_tracked"]
    assert set(float_keys(state)) == params | buffers - {"bn.num_batches_tracked"}
    # Without a module a tied tensor counts once; with one, every name is a parameter and
    # unique_keys keeps one per tensor.
    tied_module = Tied()
    tied_state = tied_module.state_dict()
    assert "dec.weight" not in parameter_keys(tied_state)
    with_module = parameter_keys(tied_state, tied_module)
    assert {"enc.weight", "dec.weight"} <= with_module
    assert unique_keys(["enc.weight", "dec.weight", "dec.bias"], with_module, tied_module) == [
        "enc.weight", "dec.bias"]
