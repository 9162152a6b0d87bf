"""Checkpoint folders and shard sets (ckptscope.shards through load_checkpoint)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from ckptscope.checkpoints import file_sha256, load_checkpoint
from ckptscope.errors import CkptscopeError


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 4, generator=g),
        "block.0.weight": torch.randn(4, 4, generator=g),
        "block.0.bias": torch.randn(4, generator=g),
        "block.1.weight": torch.randn(4, 4, generator=g),
        "head.weight": torch.randn(3, 4, generator=g),
        "steps": torch.tensor(7),
    }


def write_shards(folder, state, parts, *, index_name="model.safetensors.index.json"):
    """Write ``state`` as len(parts) safetensors shards (parts: lists of keys) with an index."""
    folder.mkdir(exist_ok=True)
    n = len(parts)
    weight_map = {}
    for i, keys in enumerate(parts, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(folder / name))
        weight_map.update({k: name for k in keys})
    index = folder / index_name
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


PARTS = [["embed.weight", "block.0.weight"], ["block.0.bias", "block.1.weight"],
         ["head.weight", "steps"]]


def test_load_checkpoint_folder_of_shards_equals_the_state(tmp_path, state):
    index = write_shards(tmp_path / "ckpt", state, PARTS)
    for path in (tmp_path / "ckpt", index):
        ckpt = load_checkpoint(path)
        assert list(ckpt.state) == [k for part in PARTS for k in part]
        for key, value in state.items():
            assert torch.equal(ckpt.state[key], value)
        assert any("3 shard(s)" in note for note in ckpt.notes)
        assert ckpt.path == str(path)


def test_load_checkpoint_shards_sha256_is_sha256sum_of_the_shards(tmp_path, state):
    write_shards(tmp_path / "ckpt", state, PARTS)
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in shards)
    assert load_checkpoint(tmp_path / "ckpt").sha256 == hashlib.sha256(listing.encode()).hexdigest()
    # a changed shard changes the digest
    save_file({"head.weight": state["head.weight"] + 1, "steps": state["steps"]},
              str(shards[-1]))
    assert load_checkpoint(tmp_path / "ckpt").sha256 != hashlib.sha256(listing.encode()).hexdigest()


def test_load_checkpoint_folder_with_one_file(tmp_path, state):
    folder = tmp_path / "st"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    ckpt = load_checkpoint(folder)
    assert ckpt.sha256 == file_sha256(folder / "model.safetensors")
    assert set(ckpt.state) == set(state)
    assert ckpt.metadata == {}  # no config.json: no adapter implied

    folder = tmp_path / "pt"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    ckpt = load_checkpoint(folder)
    assert all(torch.equal(ckpt.state[k], v) for k, v in state.items())


def test_load_checkpoint_model_folder_names_the_huggingface_adapter(tmp_path, state):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    ckpt = load_checkpoint(folder)
    assert ckpt.metadata["adapter"] == "huggingface"
    assert json.loads(ckpt.metadata["adapter_options"]) == {"model_dir": str(folder)}


def _corrupt(index, change):
    data = json.loads(index.read_text())
    change(data["weight_map"])
    index.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty_dir", "is a directory that holds none of model.safetensors.index.json"),
        ("missing_shard", r"names 1 shard\(s\) that are not in .*copy every shard"),
        ("outside", "not a file name in the index's folder"),
        ("unlisted_key", "holds 'head.weight', which the index does not put there"),
        ("absent_key", "lacks 'ghost', which the index puts there"),
        ("twice", "'block.0.bias' is in two shards"),
        ("not_json", "is not valid JSON"),
        ("no_map", "has no 'weight_map'"),
    ],
)
def test_load_checkpoint_bad_shard_sets_one_line_errors(tmp_path, state, case, match):
    folder = tmp_path / "ckpt"
    if case == "empty_dir":
        folder.mkdir()
    else:
        index = write_shards(folder, state, PARTS)
    if case == "missing_shard":
        (folder / "model-00002-of-00003.safetensors").unlink()
    elif case == "outside":
        _corrupt(index, lambda m: m.update({"head.weight": "../model-00003-of-00003.safetensors"}))
    elif case == "unlisted_key":
        _corrupt(index, lambda m: m.pop("head.weight"))
    elif case == "absent_key":
        _corrupt(index, lambda m: m.update({"ghost": "model-00001-of-00003.safetensors"}))
    elif case == "twice":
        save_file({k: state[k] for k in ["embed.weight", "block.0.weight", "block.0.bias"]},
                  str(folder / "model-00001-of-00003.safetensors"))
        _corrupt(index, lambda m: m.update({"block.0.bias": "model-00001-of-00003.safetensors"}))
    elif case == "not_json":
        index.write_text('{"weight_map": {')
    elif case == "no_map":
        index.write_text('{"metadata": {}}')
    with pytest.raises(CkptscopeError, match=match) as err:
        load_checkpoint(folder)
    assert "\n" not in str(err.value)
