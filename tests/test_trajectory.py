"""Trajectories: the paths between a run's checkpoints, held against one linear_path per pair;
the result layout, its file round trip, the figures and the command."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import xarray as xr

from ckptscope import shape
from ckptscope.checkpoints import save_checkpoint
from ckptscope.cli import main
from ckptscope.errors import CkptscopeError
from ckptscope.linear import linear_path
from ckptscope.matrix_results import midpoint_loss, open_matrix, path_metrics, save_matrix
from ckptscope.results import save_result
from ckptscope.train import run
from ckptscope.trajectories import run_checkpoints, trajectory, trajectory_pairs
from tests.conftest import spiral_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A spiral MLP trained 3 epochs, saved after each: init, epoch_001, epoch_002, final."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("traj") / "run"
    run(spiral_recipe(epochs=3, batch_size=16), seed=0, out=out, save_every=1)
    return out


@pytest.fixture(scope="module")
def every_pair(run_dir):
    torch.set_num_threads(1)
    return trajectory(run_dir, alphas=5, groups=["layers.0"], device="cpu")


def test_trajectory_entries_equal_each_pairs_linear_path(run_dir, every_pair):
    ds = every_pair
    labels = [str(s) for s in ds["start"].values]
    assert labels == ["init", "epoch_001", "epoch_002", "final"]
    assert ds["start_epoch"].values.tolist() == [0, 1, 2, 3]
    for i, j in itertools.combinations(range(4), 2):
        one = linear_path(run_dir / f"{labels[i]}.safetensors",
                          run_dir / f"{labels[j]}.safetensors", alphas=5, groups=["layers.0"],
                          device="cpu")
        at = {"start": labels[i], "end": labels[j]}
        np.testing.assert_array_equal(ds["loss"].sel(at).values, one["loss"].values[0])
        np.testing.assert_array_equal(ds["accuracy"].sel(at).values, one["accuracy"].values[0])
        np.testing.assert_array_equal(ds["distance"].sel(at).values, one["distance"].values[0])
        for name in ("barrier_height", "chord_barrier", "midpoint_barrier"):
            np.testing.assert_array_equal(ds[name].sel(at).values, one[name].values[0])
        np.testing.assert_array_equal(ds["midpoint_loss"].sel(at).values,
                                      one["loss"].sel(alpha=0.5).values[0])


def test_trajectory_diagonal_is_the_checkpoint_and_reverse_pairs_are_nan(run_dir, every_pair):
    ds = every_pair
    labels = [str(s) for s in ds["start"].values]
    for i, label in enumerate(labels):
        end = linear_path(run_dir / "init.safetensors", run_dir / f"{label}.safetensors",
                          alphas=2, device="cpu") if i else linear_path(
            run_dir / "init.safetensors", run_dir / "final.safetensors", alphas=2,
            device="cpu")
        own = end["loss"].sel(group="all").values[0, :, -1 if i else 0]
        diagonal = ds["loss"].sel(start=label, end=label)  # (group, split, alpha)
        assert np.all(diagonal.values == own[None, :, None])  # constant, for every group
        for name in ("barrier_height", "chord_barrier", "error_barrier", "error_chord_barrier"):
            assert np.all(ds[name].sel(start=label, end=label).values == 0)
        assert np.all(ds["distance"].sel(start=label, end=label).values == 0)
        for j in range(i):
            assert np.all(np.isnan(ds["loss"].sel(start=label, end=labels[j]).values))
            assert np.all(np.isnan(ds["barrier_height"].sel(start=label, end=labels[j])))


def test_trajectory_without_the_whole_model_leaves_the_diagonal_curves_nan(run_dir):
    ds = trajectory(run_dir, alphas=3, groups=["layers.0"], full=False, to_final=True,
                    device="cpu")
    assert np.all(np.isnan(ds["loss"].sel(start="final", end="final").values))
    assert ds["distance"].sel(start="final", end="final").item() == 0


def test_trajectory_to_final_is_the_final_column(every_pair, run_dir):
    calls = []
    ds = trajectory(run_dir, alphas=5, groups=["layers.0"], to_final=True, device="cpu",
                    progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (30, 30)  # 3 paths x 2 groups x 5 alphas
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
    assert [str(e) for e in ds["end"].values] == ["final"]
    assert ds.sizes["start"] == 4 and ds.attrs["pairs"] == "to_final"
    xr.testing.assert_identical(ds["loss"], every_pair["loss"].sel(end=["final"]))
    xr.testing.assert_identical(ds["error_barrier"],
                                every_pair["error_barrier"].sel(end=["final"]))


def test_trajectory_reads_each_file_once_and_evaluates_each_pair_once(run_dir, monkeypatch):
    import ckptscope.trajectories as module

    loaded, swept = [], []
    real_load, real_paths = module.load_checkpoint, module.linear_paths
    monkeypatch.setattr(module, "load_checkpoint",
                        lambda path: loaded.append(str(path)) or real_load(path))

    def paths(pairs, *args, **kwargs):
        swept.append(pairs)
        return real_paths(pairs, *args, **kwargs)

    monkeypatch.setattr(module, "linear_paths", paths)
    trajectory(run_dir, alphas=3, device="cpu")
    assert len(loaded) == len(set(loaded)) == 4
    assert len(swept) == 1  # one sweep: one evaluator for every pair
    pairs = [(a.path, b.path) for a, b in swept[0].values()]
    assert len(pairs) == len(set(pairs)) == 6
    assert trajectory_pairs(4) == list(itertools.combinations(range(4), 2))
    assert trajectory_pairs(4, to_final=True) == [(0, 3), (1, 3), (2, 3)]


def test_run_checkpoints_are_in_training_order(tmp_path):
    state = {"w": torch.zeros(2)}
    for name, epoch in (("final", 1000), ("epoch_999", 999), ("epoch_1000", None),
                        ("init", 5), ("epoch_010", 10)):
        save_checkpoint(tmp_path / f"{name}.safetensors", state,
                        metadata={} if epoch is None else {"epoch": epoch})
    (tmp_path / "epoch_010.state.pt").write_bytes(b"not a checkpoint")  # not picked up
    infos = [info for info, _ in run_checkpoints(tmp_path)]
    assert [i.label for i in infos] == ["init", "epoch_010", "epoch_999", "epoch_1000", "final"]
    assert [i.epoch for i in infos] == [5, 10, 999, 1000, 1000]


@pytest.mark.parametrize(("make", "kwargs", "match"), [
    (lambda p: p / "nope", {}, r"run directory .*nope' does not exist"),
    (lambda p: p, {}, r"holds 0 of init.safetensors.*train with `ckptscope train --save-every"),
    (lambda p: p, {"alphas": [0.0, 0.5]}, r"alphas run from 0 to 1 .* got 0 to 0.5"),
])
def test_trajectory_bad_input_names_the_fix(tmp_path, make, kwargs, match):
    with pytest.raises(CkptscopeError, match=match):
        trajectory(make(tmp_path), **kwargs)


def test_path_metrics_match_slow_references():
    rng = np.random.default_rng(0)
    alpha = np.array([0.0, 0.2, 0.45, 0.7, 1.0])
    loss = rng.random((3, 2, 5))
    accuracy = rng.random((3, 2, 5))
    out = path_metrics(loss, accuracy, alpha)
    for idx in np.ndindex(3, 2):
        error = 1 - accuracy[idx]
        assert out["midpoint_loss"][idx] == pytest.approx(np.interp(0.5, alpha, loss[idx]))
        assert out["error_barrier"][idx] == pytest.approx(max(error) - (error[0] + error[-1]) / 2)
        chord = [e - ((1 - a) * error[0] + a * error[-1]) for a, e in zip(alpha, error)]
        assert out["error_chord_barrier"][idx] == pytest.approx(max(chord))
        assert out["barrier_height"][idx] == shape.barrier_height(loss[idx], alpha)
    assert np.isnan(path_metrics(np.full((1, 5), np.nan), np.full((1, 5), np.nan), alpha)[
        "error_barrier"]).all()
    assert midpoint_loss(loss, np.linspace(0, 1, 5))[0, 0] == loss[0, 0, 2]


def test_trajectory_file_round_trips_and_refuses_other_results(every_pair, tmp_path):
    path = save_matrix(every_pair, tmp_path / "t.nc")
    back = open_matrix(path)
    xr.testing.assert_allclose(back, every_pair)
    assert back.attrs["ckptscope_kind"] == "trajectory"
    save_result(linear_path(every_pair["start_path"].values[0],
                            every_pair["end_path"].values[-1], alphas=3, device="cpu"),
                tmp_path / "path.nc")
    with pytest.raises(CkptscopeError, match=r"'ckptscope_kind' is 'None', expected one of"):
        open_matrix(tmp_path / "path.nc")
    bad = every_pair.copy()
    bad["accuracy"] = bad["accuracy"] + 2
    with pytest.raises(CkptscopeError, match=r"'accuracy' holds values outside \[0, 1\]"):
        save_matrix(bad, tmp_path / "bad.nc")
    assert not (tmp_path / "bad.nc").exists()


@pytest.mark.parametrize("command", [["summarize"], ["check", "--expect", "all:shape=monotonic"],
                                     ["report", "--out", "{tmp}/r.html"]])
def test_path_commands_name_a_trajectory_result(every_pair, tmp_path, capsys, command):
    path = save_matrix(every_pair, tmp_path / "t.nc")
    code = main([command[0], str(path), *(a.format(tmp=tmp_path) for a in command[1:])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "is a trajectory result, not a path result" in err and "open_matrix" in err
    assert not (tmp_path / "r.html").exists()


def test_plot_trajectory_draws_heatmaps_and_the_to_final_view(every_pair):
    import matplotlib

    matplotlib.use("Agg")
    from ckptscope.trajectory_plots import plot_trajectory

    fig = plot_trajectory(every_pair)
    titles = [ax.get_title() for ax in fig.axes]
    assert "chord barrier (all, test)" in titles and "paths to final (all)" in titles
    assert len(fig.axes[-2].lines) == 3  # init, epoch_001, epoch_002 to final


def test_trajectory_command_writes_result_and_figure(run_dir, tmp_path, capsys):
    out, figure = tmp_path / "t.nc", tmp_path / "t.png"
    assert main(["trajectory", str(run_dir), "--alphas", "3", "--to-final", "--device", "cpu",
                 "--out", str(out), "--plot", str(figure)]) == 0
    text = capsys.readouterr().out
    assert "4 checkpoints, 3 paths of 3 points" in text and "epoch_002  2" in text
    assert open_matrix(out).sizes["end"] == 1 and figure.stat().st_size > 0
    assert main(["trajectory", str(tmp_path / "missing")]) == 2
    assert "error: run directory" in capsys.readouterr().err
    assert main(["trajectory", str(run_dir), "--out", str(tmp_path / "t.txt")]) == 2
    assert "--out" in capsys.readouterr().err


def test_trajectory_of_checkpoint_files_in_the_given_order(run_dir, every_pair):
    files = [run_dir / "init.safetensors", run_dir / "epoch_002.safetensors",
             run_dir / "final.safetensors"]
    ds = trajectory(files, alphas=5, groups=["layers.0"], device="cpu")
    assert [str(s) for s in ds["start"].values] == ["init", "epoch_002", "final"]
    assert ds["start_epoch"].values.tolist() == [0, 2, 3]  # as the trainer recorded them
    labels = ["init", "epoch_002", "final"]
    xr.testing.assert_identical(
        ds["loss"].drop_vars([c for c in ds["loss"].coords if c.startswith(("start_", "end_"))]),
        every_pair["loss"].sel(start=labels, end=labels).drop_vars(
            [c for c in every_pair["loss"].coords if c.startswith(("start_", "end_"))]))
