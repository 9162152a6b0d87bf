"""``ckptscope align`` and ``ckptscope path --align/--repair`` as users meet them."""

from __future__ import annotations

import json

import pytest
import torch

from ckptscope.adapters.mlp import MLP
from ckptscope.checkpoints import load_checkpoint, save_checkpoint
from ckptscope.results import open_result
from tests.conftest import run_cli as run

META = {"adapter": "mlp", "adapter_options": {"widths": [2, 12, 10, 1]}, "data": "spiral:120,90"}


@pytest.fixture
def two_seeds(tmp_path):
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = MLP([2, 12, 10, 1]).state_dict()
        paths.append(save_checkpoint(tmp_path / f"seed{seed}.safetensors", state, metadata=META))
    return paths


def _outputs(path, x):
    model = MLP([2, 12, 10, 1])
    model.load_state_dict(load_checkpoint(path).state)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_align_writes_a_checkpoint_computing_others_function(two_seeds, tmp_path, capsys,
                                                              method):
    ref, other = two_seeds
    out = tmp_path / "aligned.safetensors"
    code, stdout, stderr = run(["align", str(ref), str(other), "--out", str(out),
                                "--method", method, "--seed", "3"], capsys)
    assert code == 0, stderr
    assert f"{method} matching (seed 3): 2 classes" in stdout and f"wrote {out}" in stdout
    x = torch.randn(16, 2)
    torch.testing.assert_close(_outputs(out, x), _outputs(other, x))
    meta = load_checkpoint(out).metadata
    assert meta["align_method"] == method and meta["align_seed"] == "3"
    assert meta["adapter"] == "mlp" and meta["role"] == "aligned"
    assert "layers.0.weight" in json.loads(meta["align_permuted"])
    assert float(meta["align_objective_after"]) >= float(meta["align_objective_before"])


def test_path_align_and_repair_record_it_in_the_result(two_seeds, tmp_path, capsys):
    ref, other = two_seeds
    out = tmp_path / "r.nc"
    code, _, stderr = run(["path", str(ref), str(other), "--alphas", "3", "--align", "weights",
                           "--repair", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "aligned END to START by weights matching: objective" in stderr
    ds = open_result(out)
    assert ds.attrs["align"] == "weights" and ds.attrs["repair"] == "rescale"


@pytest.mark.parametrize("argv, match", [
    (["--out", "x.pt"], "x.pt' should end in .safetensors"),
    (["--adapter-opt", "widths=[2,1]", "--out", "x.safetensors"], "do not match"),
    (["--method", "activations", "--data", "nope", "--out", "x.safetensors"],
     "dataset 'nope'"),
])
def test_align_bad_input_is_one_line_and_exit_2(two_seeds, tmp_path, capsys, argv, match):
    ref, other = two_seeds
    argv = [a if not a.endswith((".pt", ".safetensors")) else str(tmp_path / a) for a in argv]
    code, stdout, stderr = run(["align", str(ref), str(other), *argv], capsys)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert match in stderr
    assert not list(tmp_path.glob("x.*"))


def test_align_refuses_a_model_with_nothing_to_permute(tmp_path, capsys):
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 1]}}
    paths = [save_checkpoint(tmp_path / f"{i}.safetensors", MLP([2, 1]).state_dict(),
                             metadata=meta) for i in range(2)]
    code, _, stderr = run(["align", *map(str, paths), "--out", str(tmp_path / "o.safetensors")],
                          capsys)
    assert code == 2 and "error: nothing in MLP can be permuted" in stderr
    assert stderr.count("\n") == 1 and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("command", ["align", "path"])
def test_activation_matching_on_data_the_model_does_not_take_is_one_line(two_seeds, tmp_path,
                                                                         capsys, command):
    """The model's own error during activation matching came out as a traceback, exit 1."""
    ref, other = two_seeds
    out = tmp_path / ("aligned.safetensors" if command == "align" else "r.nc")
    argv = (["align", str(ref), str(other), "--method", "activations"] if command == "align"
            else ["path", str(ref), str(other), "--align", "activations", "--alphas", "3"])
    code, _, stderr = run([*argv, "--data", "digits", "--out", str(out)], capsys)
    assert code == 2, stderr
    assert stderr.startswith("error: the model failed on the 'train' inputs of shape")
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.safetensors", "seed1.safetensors"]
