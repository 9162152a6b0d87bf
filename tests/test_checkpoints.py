"""Reading checkpoints as weights only, unwrapping, and pair validation."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.checkpoints import (
    as_checkpoint,
    check_pair,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from ckptscope.errors import CkptscopeError


@pytest.fixture
def state():
    torch.manual_seed(0)
    return {
        "layers.0.weight": torch.randn(3, 2),
        "layers.0.bias": torch.randn(3),
        "bn.num_batches_tracked": torch.tensor(5),
    }


def test_load_checkpoint_safetensors_roundtrip_with_metadata(tmp_path, state):
    path = save_checkpoint(
        tmp_path / "a.safetensors",
        state,
        metadata={"adapter": "mlp", "adapter_options": {"widths": [2, 3]}},
    )
    ckpt = load_checkpoint(path)
    assert set(ckpt.state) == set(state)
    for k, v in state.items():
        assert torch.equal(ckpt.state[k], v)
    assert ckpt.metadata["adapter"] == "mlp"
    assert ckpt.metadata["adapter_options"] == '{"widths": [2, 3]}'
    assert ckpt.sha256 == file_sha256(path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod."])
def test_load_checkpoint_torch_unwraps(tmp_path, state, wrapper, prefix):
    obj = {prefix + k: v for k, v in state.items()}
    if wrapper:
        obj = {wrapper: obj, "epoch": 3, "optimizer": {"lr": 0.1}}
    path = tmp_path / "a.pt"
    torch.save(obj, path)
    ckpt = load_checkpoint(path)
    assert sorted(ckpt.state) == sorted(state)
    assert torch.equal(ckpt.state["layers.0.weight"], state["layers.0.weight"])


def test_load_checkpoint_format_from_bytes_not_suffix(tmp_path, state):
    path = tmp_path / "weights.bin"
    save_file(state, str(path))
    assert torch.equal(load_checkpoint(path).state["layers.0.bias"], state["layers.0.bias"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_load_checkpoint_keeps_half_precision_as_stored(tmp_path, state, dtype):
    path = tmp_path / "a.safetensors"
    save_file(
        {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}, str(path)
    )
    ckpt = load_checkpoint(path)
    # Held in the file's dtype (the engine upcasts per tensor), not as a float32 copy.
    assert ckpt.state["layers.0.weight"].dtype == dtype
    assert torch.equal(ckpt.state["layers.0.weight"], state["layers.0.weight"].to(dtype))
    assert ckpt.state["bn.num_batches_tracked"].dtype == torch.int64
    assert any("upcast" in n and str(dtype).replace("torch.", "") in n for n in ckpt.notes)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_checkpoint_refuses_code_execution(tmp_path, state):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": state, "x": Payload(str(marker))}, path)
    with pytest.raises(CkptscopeError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_load_checkpoint_refuses_plain_pickle_payload(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(str(marker)), protocol=2))
    with pytest.raises(CkptscopeError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", "does not exist"),
        ("empty", "empty"),
        ("text", "neither a safetensors file nor a torch checkpoint"),
        ("dir", "is a directory"),
        ("dangling", "dangling symlink"),
        ("truncated_st", "not a readable safetensors file"),
        ("truncated_pt", "not a complete zip archive|not a readable torch checkpoint"),
        ("zip", "not a readable torch checkpoint"),
    ],
)
def test_load_checkpoint_bad_files_one_line_errors(tmp_path, state, case, match):
    path = tmp_path / "bad.safetensors"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("hello, this is not a checkpoint\n")
    elif case == "dir":
        path.mkdir()
    elif case == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    elif case == "truncated_st":
        save_file(state, str(path))
        path.write_bytes(path.read_bytes()[:-10])
    elif case == "truncated_pt":
        torch.save(state, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "zip":
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "not torch")
    with pytest.raises(CkptscopeError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_as_checkpoint_from_mapping_detaches_and_keeps_half_precision(state):
    ckpt = as_checkpoint({"model": {**state, "w": torch.ones(2, dtype=torch.float16)}})
    assert ckpt.state["w"].dtype == torch.float16
    assert any("upcast" in n for n in ckpt.notes)
    assert ckpt.path == "" and ckpt.sha256 == ""


def test_as_checkpoint_rejects_non_tensor_mapping():
    with pytest.raises(CkptscopeError, match="holds no tensors"):
        as_checkpoint({"epoch": 3})


def test_check_pair_lists_differences_sorted(state):
    other = dict(state)
    del other["layers.0.bias"]
    other["zzz.extra"] = torch.zeros(1)
    other["aaa.extra"] = torch.zeros(1)
    other["layers.0.weight"] = torch.zeros(4, 2)
    with pytest.raises(CkptscopeError) as info:
        check_pair(state, other, names=("A", "B"))
    msg = str(info.value)
    assert "only in A: layers.0.bias" in msg
    assert "only in B: aaa.extra, zzz.extra" in msg
    assert "layers.0.weight (3, 2) vs (4, 2)" in msg


def test_check_pair_accepts_matching(state):
    check_pair(state, {k: v.clone() for k, v in state.items()})
