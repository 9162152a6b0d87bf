"""The trainer's commands (``train``, ``sweep``, ``reproduce``) in a click group, as the main
CLI registers them, and the sweep and reproduction functions behind them."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from ckptscope.checkpoints import load_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.results import open_result
from ckptscope.train import recipe_names
from ckptscope.train.cli import reproduce, sweep, train
from ckptscope.train.reproduce import TARGETS, fig1a, train_seeds, verdict_table
from ckptscope.train.sweep import parse_seeds
from ckptscope.train.sweep import sweep as run_sweep
from tests.conftest import spiral_recipe

SMALL = ["--set", "epochs=2", "--set", "data='spiral:64,32'"]


pytestmark = pytest.mark.usefixtures("one_thread")


@click.group()
def group():
    """The commands as ``ckptscope`` holds them."""


for _command in (train, sweep, reproduce):
    group.add_command(_command)


def invoke(*args: str):
    """Run a command; a CkptscopeError comes back as the result's exception."""
    return CliRunner().invoke(group, list(args), catch_exceptions=True)


def test_train_list_names_every_recipe_and_its_figure():
    result = invoke("train", "--list")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == len(recipe_names())
    assert any(line.startswith("resnet18-cifar10 ") and "Fig. 1B" in line for line in lines)


def test_train_show_prints_the_resolved_recipe():
    result = invoke("train", "--show", "resnet18-cifar10", "--set", "lr=0.05")
    assert result.exit_code == 0
    assert "lr = 0.05\n" in result.output and 'adapter = "resnet18"' in result.output


@pytest.mark.parametrize(("args", "match"), [
    (("train", "--recipe", "mlp-spiral-fig1a"), "give --recipe NAME and --out DIR"),
    (("train", "--show", "mlp-spiral-fig1a", "--set", "widths=3"),
     r"'widths' is not a recipe field; valid: name, description"),
    (("train", "--show", "mlp-spiral-fig1a", "--set", "epochs=x"), r"epochs='x' is a str"),
    (("sweep", "--recipe", "mlp-spiral-fig1a", "--out", "x", "--seeds", "a-b"),
     r"seeds 'a-b' are not a list like 0-9"),
    (("reproduce", "fig9"), r"fig9 is GPU-sized"),
    (("reproduce", "nope"), r"unknown target 'nope'"),
])
def test_commands_bad_input_raise_one_line_errors(args, match):
    result = invoke(*args)
    assert isinstance(result.exception, CkptscopeError)
    assert len(str(result.exception).splitlines()) == 1
    with pytest.raises(CkptscopeError, match=match):
        raise result.exception


def test_train_writes_the_run_and_resume_continues_it(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", "--recipe", "mlp-spiral-fig1a", "--seed", "1", "--out", str(out),
                    "--save-every", "1", "--device", "cpu", *SMALL)
    assert result.exit_code == 0, result.output
    assert "mlp-spiral-fig1a seed 1: 2 epochs, test acc" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "epoch_001.safetensors", "epoch_001.state.pt", "final.safetensors", "init.safetensors", "metrics.jsonl",
        "train.log"]
    assert (out / "train.log").read_text().startswith("epoch 1/2  lr 0.0005  train loss")
    again = invoke("train", "--recipe", "mlp-spiral-fig1a", "--seed", "1", "--out", str(out),
                   "--resume", *SMALL)
    assert "already finished" in again.output


def test_sweep_trains_each_seed_once_and_evaluates_one_result(tmp_path):
    recipe = spiral_recipe(epochs=2)
    seen = []
    first = run_sweep(recipe, seeds=[0, 1], out=tmp_path, presets=["layers"], alphas=5,
                      on_run=lambda s, r: seen.append((s, r.skipped)))
    assert seen == [(0, False), (1, False)]
    assert list(first.result["run"].values) == ["seed_0", "seed_1"]
    assert list(first.result["group"].values) == ["all", "layer1", "layer2", "layer3"]
    stamp = (tmp_path / "seed_0" / "final.safetensors").stat().st_mtime_ns
    seen.clear()
    (tmp_path / "seed_1" / "final.safetensors").unlink()  # an unfinished run is trained again
    (tmp_path / "seed_1" / "init.safetensors").unlink()
    (tmp_path / "seed_1" / "metrics.jsonl").unlink()
    run_sweep(recipe, seeds=[0, 1], out=tmp_path, alphas=5,
              on_run=lambda s, r: seen.append((s, r.skipped)))
    assert seen == [(0, True), (1, False)]
    assert (tmp_path / "seed_0" / "final.safetensors").stat().st_mtime_ns == stamp
    assert open_result(tmp_path / "result.nc").attrs["recipe"] == "mlp-spiral-fig1a"


def test_sweep_command_prints_verdicts(tmp_path):
    result = invoke("sweep", "--recipe", "mlp-spiral-fig1a", "--seeds", "0", "--out",
                    str(tmp_path), "--alphas", "5", "--device", "cpu", *SMALL)
    assert result.exit_code == 0, result.output
    assert "seed_0  all" in result.output and f"wrote {tmp_path / 'result.nc'}" in result.output


@pytest.mark.parametrize(("text", "seeds"), [("0-3", [0, 1, 2, 3]), ("0,5", [0, 5]),
                                             ("0-1,7", [0, 1, 7]), (3, [0, 1, 2])])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


def test_fig1a_tiny_trains_evaluates_and_tabulates(tmp_path):
    out = fig1a(tmp_path, seeds=[0, 1], epochs={"spiral": 2, "digits": 1}, alphas=3)
    assert set(out.results) == {"digits", "spiral"}
    runs = [str(r) for r in out.results["spiral"]["run"].values]
    assert runs == ["i-f:0", "i-f:1", "i'-f:0", "i'-f:1", "i-i':0", "i-i':1"]
    assert len(out.rows) == 12 and {r["shape"] for r in out.rows} <= {
        "monotonic", "barrier", "plateau"}
    other = tmp_path / "spiral" / "seed_0" / "other_init.safetensors"
    assert other.is_file()
    table = verdict_table(out.rows)
    assert "| spiral | i-f | all | 2 |" in table
    assert out.figure is not None and len(out.figure.axes) == 2


def test_train_seeds_in_child_processes_match_files(tmp_path):
    recipe = spiral_recipe(epochs=2)
    runs = train_seeds(recipe, [0, 1], tmp_path, jobs=2)
    assert [r.last["epoch"] for r in runs.values()] == [2, 2]  # read back from the files
    assert load_checkpoint(runs[1].final).metadata["threads"] == "1"
    assert train_seeds(recipe, [0, 1], tmp_path)[0].skipped


def test_reproduce_command_writes_figure_and_table(tmp_path):
    result = invoke("reproduce", "fig1a", "--out", str(tmp_path), "--seeds", "1", "--epochs",
                    "1", "--alphas", "3")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fig1a.png").stat().st_size > 0
    assert "| digits | i-f | all | 0 |" in (tmp_path / "fig1a.md").read_text()
    assert open_result(tmp_path / "digits" / "result.nc").attrs["adapter"] == "mlp"


def test_reproduce_list_names_targets_and_commands():
    result = invoke("reproduce", "--list")
    assert result.exit_code == 0
    for name in TARGETS:
        assert result.output.count(f"{name} ") >= 1
    assert "ckptscope sweep --recipe resnet18-cifar10 --seeds 0-9" in result.output
