"""The analysis commands end to end: check, compare, merge, distance, plot, path over runs.

The checkpoints are logistic regressions on the spiral (``mlp`` with widths [2, 1]) whose weights
are zero, so only the bias moves the loss and every curve is known in closed form. With balanced
classes the loss at bias b is L(b) = (softplus(b) + softplus(-b)) / 2, lowest (ln 2) at b = 0:

- HIGH -> LOW (bias 4 -> -1): falls from L(4) = 2.018 to ln 2 at alpha = 0.8, then climbs back to
  L(-1) = 0.813. The rise, 0.120, is 9 % of the range (1.325): a barrier under the default
  rtol = 0.02, none under rtol = 0.5 (then the curve, which covers half its drop by alpha 0.27,
  is monotonic).
- HIGH -> HIGH (B = A): flat, hence monotonic.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import xarray as xr

from ckptscope import shape
from ckptscope.checkpoints import save_checkpoint
from ckptscope.cli import main
from ckptscope.results import open_result
from tests.conftest import run_cli as run

META = {"adapter": "mlp", "adapter_options": {"widths": [2, 1]}, "data": "spiral:200,100"}
ALPHAS = "11"
RISE = 0.1202  # L(-1) - ln 2
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def bias_only(bias: float) -> dict:
    return {"layers.0.weight": torch.zeros(1, 2), "layers.0.bias": torch.tensor([bias])}


def rows(stdout: str, first: str) -> list[list[str]]:
    """The table rows (split on whitespace) whose first cell is ``first``."""
    return [line.split() for line in stdout.splitlines() if line.split()[:1] == [first]]


def assert_bad_input(code: int, err: str, match: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert match in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    return {
        name: str(save_checkpoint(folder / f"{name}.safetensors", bias_only(b), metadata=META))
        for name, b in (("high", 4.0), ("low", -1.0), ("mid", 2.0))
    }


@pytest.fixture(scope="module")
def results(ckpts, tmp_path_factory):
    """Result files shared by the tests (read only): barrier, flat, layered, coarse."""
    folder = tmp_path_factory.mktemp("results")
    specs = {
        "barrier": [ckpts["high"], ckpts["low"], "--alphas", ALPHAS],
        "flat": [ckpts["high"], ckpts["high"], "--alphas", ALPHAS],
        "layered": [ckpts["high"], ckpts["low"], "--alphas", ALPHAS, "--preset", "layers"],
        "coarse": [ckpts["high"], ckpts["low"], "--alphas", "5"],
    }
    out = {}
    for name, argv in specs.items():
        out[name] = folder / f"{name}.nc"
        assert main(["path", *argv, "--out", str(out[name])]) == 0
    return out


def test_fixture_curves_have_the_documented_shapes(results):
    barrier, flat = open_result(results["barrier"]), open_result(results["flat"])
    loss = barrier.loss.sel(run="0", group="all", split="test").values
    assert loss[0] == pytest.approx(2.01815, abs=1e-4)
    assert loss[8] == pytest.approx(math.log(2), abs=1e-6)       # bias 0 at alpha 0.8
    assert float(barrier.barrier_height.squeeze()) == pytest.approx(RISE, abs=1e-4)
    assert str(barrier["shape"].squeeze().values) == "barrier"
    assert str(flat["shape"].squeeze().values) == "monotonic"
    assert np.ptp(flat.loss.values) == 0.0


# --- check -----------------------------------------------------------------------------------
def test_check_inline_expectations_all_pass_exit_0(results, capsys):
    code, out, err = run(["check", results["barrier"], "--expect", "all:shape=barrier",
                          "--expect", "all@test:loss_start>2", "--expect", "all:above_start=0",
                          "--expect", f"all:barrier_height>={RISE - 1e-3}"], capsys)
    assert code == 0, err
    assert len(rows(out, "PASS")) == 4 and not rows(out, "FAIL")
    assert "4 passed, 0 failed" in out
    assert "shape = barrier (barrier_height 0.12" in out


def test_check_any_failure_exits_1_and_says_why(results, capsys):
    code, out, err = run(["check", results["barrier"], "--expect", "all:shape=barrier",
                          "--expect", "all:shape=monotonic"], capsys)
    assert code == 1, err
    assert len(rows(out, "PASS")) == 1
    [fail] = rows(out, "FAIL")
    assert fail[1:6] == ["all:shape=monotonic", "0", "all", "test", "barrier"]
    assert "expected = monotonic" in out and "1 passed, 1 failed" in out


def test_check_flat_curve_is_monotonic(results, capsys):
    code, out, err = run(["check", results["flat"], "--expect", "all:shape=monotonic",
                          "--expect", "all:barrier_height=0", "--expect", "all:distance=0"],
                         capsys)
    assert code == 0, err
    assert "3 passed, 0 failed" in out


@pytest.mark.parametrize("text", [
    'expect = ["all:shape=barrier", "*@test:shape!=invalid", "layer1:loss_end<0.9",\n'
    '          {group = "all", split = "test", metric = "acc_end", op = ">=", value = 0.5}]\n',
    '[[expect]]\ngroup = "all"\nmetric = "shape"\nvalue = "barrier"\n\n'
    '[[expect]]\ngroup = "*"\nsplit = "test"\nmetric = "shape"\nop = "!="\nvalue = "invalid"\n\n'
    '[[expect]]\ngroup = "layer1"\nmetric = "loss_end"\nop = "<"\nvalue = 0.9\n\n'
    '[[expect]]\ngroup = "all"\nsplit = "test"\nmetric = "acc_end"\nop = ">="\nvalue = 0.5\n',
], ids=["list", "tables"])
def test_check_expectations_file(results, tmp_path, capsys, text):
    toml = tmp_path / "expect.toml"
    toml.write_text(text)
    code, out, err = run(["check", results["layered"], "--expect", toml], capsys)
    assert code == 0, err
    # 1 + 2 (every group) + 1 + 1 rows
    assert len(rows(out, "PASS")) == 5 and "5 passed, 0 failed" in out
    assert [r[1] for r in rows(out, "PASS")] == [
        "all:shape=barrier", "*@test:shape!=invalid", "*@test:shape!=invalid",
        "layer1:loss_end<0.9", "all@test:acc_end>=0.5"]


def test_check_reads_an_existing_file_whatever_its_suffix(results, tmp_path, capsys):
    expectations = tmp_path / "expectations.txt"
    expectations.write_text('expect = ["all:shape=barrier", "all:loss_end<1"]\n')
    code, out, err = run(["check", results["barrier"], "--expect", expectations], capsys)
    assert code == 0, err
    assert "2 passed, 0 failed" in out


def test_check_file_and_inline_expectations_combine(results, tmp_path, capsys):
    toml = tmp_path / "expect.toml"
    toml.write_text('expect = ["all:shape=barrier"]\n')
    code, out, _ = run(["check", results["barrier"], "--expect", toml,
                        "--expect", "all:shape=plateau"], capsys)
    assert code == 1
    assert "1 passed, 1 failed" in out


def test_check_star_group_holds_every_group(results, capsys):
    code, out, err = run(["check", results["layered"], "--expect", "*:shape=barrier"], capsys)
    assert code == 0, err
    assert [r[3] for r in rows(out, "PASS")] == ["all", "layer1"]


def test_check_star_group_fails_when_one_group_fails(ckpts, tmp_path, capsys):
    # `layers.0.weight` alone never moves (both weights are zero): a flat, monotonic curve.
    out = tmp_path / "r.nc"
    assert main(["path", ckpts["high"], ckpts["low"], "--alphas", ALPHAS, "--group",
                 "w=layers.0.weight", "--out", str(out)]) == 0
    capsys.readouterr()
    code, stdout, _ = run(["check", out, "--expect", "*:shape=barrier"], capsys)
    assert code == 1
    assert [r[3] for r in rows(stdout, "PASS")] == ["all"]
    assert [r[3] for r in rows(stdout, "FAIL")] == ["w"]


def test_check_junit_report_written_and_parseable(results, tmp_path, capsys):
    report = tmp_path / "reports" / "report.xml"
    code, _, _ = run(["check", results["layered"], "--expect", "*:shape=barrier",
                      "--expect", "all:loss_end>1", "--junit", report], capsys)
    assert code == 1
    root = ET.parse(report).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "*:shape=barrier [run=0 group=all split=test]",
        "*:shape=barrier [run=0 group=layer1 split=test]",
        "all:loss_end>1 [run=0 group=all split=test]",
    ]
    [failure] = [c.find("failure") for c in cases if c.find("failure") is not None]
    assert "loss_end = 0.813" in failure.get("message")


def test_check_junit_written_when_all_pass(results, tmp_path, capsys):
    report = tmp_path / "report.xml"
    code, _, _ = run(["check", results["barrier"], "--expect", "all:shape=barrier",
                      "--junit", report], capsys)
    assert code == 0
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("tests") == "1" and suite.get("failures") == "0"


@pytest.mark.parametrize("args, match", [
    (["--expect", "all:nope=1"], "unknown metric 'nope'"),
    (["--expect", "layer9:shape=barrier"], "names group 'layer9'"),
    (["--expect", "all@train:shape=barrier"], "names split 'train'"),
    (["--expect", "all:shape=wavy"], "is not a shape"),
    (["--expect", "all barrier"], "is not GROUP[@SPLIT]:METRIC OP VALUE"),
    (["--expect", "{tmp}/missing.toml"], "does not exist"),
    (["--expect", "{tmp}/bad.toml"], "is not valid TOML"),
    (["--expect", "all:shape=barrier", "--tolerance", "rtol=big"], "is not a number"),
    (["--expect", "all:shape=barrier", "--tolerance", "slack=1"], "'slack' is not one of"),
])
def test_check_bad_input_exits_2_without_report(results, tmp_path, capsys, args, match):
    (tmp_path / "bad.toml").write_text("expect = [")
    report = tmp_path / "report.xml"
    argv = ["check", results["barrier"], *[a.format(tmp=tmp_path) for a in args],
            "--junit", report]
    code, out, err = run(argv, capsys)
    assert_bad_input(code, err, match)
    assert not report.exists()


def test_check_missing_result_exits_2(tmp_path, capsys):
    code, _, err = run(["check", tmp_path / "none.nc", "--expect", "all:shape=barrier"], capsys)
    assert_bad_input(code, err, "does not exist")


def test_check_without_expect_is_a_usage_error(results, capsys):
    code, _, err = run(["check", results["barrier"]], capsys)
    assert code == 2
    assert "Missing option '--expect'" in err and "Traceback" not in err


def test_check_tolerance_reclassifies_first(results, capsys):
    code, out, err = run(["check", results["barrier"], "--expect", "all:shape=monotonic",
                          "--tolerance", "rtol=0.5"], capsys)
    assert code == 0, err
    assert "tolerance 0.66" in out  # 0.5 x range 1.325
    code, _, _ = run(["check", results["barrier"], "--expect", "all:shape=monotonic"], capsys)
    assert code == 1


# --- compare ---------------------------------------------------------------------------------
def test_compare_same_checkpoints_exit_0(ckpts, results, tmp_path, capsys):
    again = tmp_path / "again.nc"
    assert main(["path", ckpts["high"], ckpts["low"], "--alphas", ALPHAS,
                 "--out", str(again)]) == 0
    capsys.readouterr()
    code, out, err = run(["compare", results["barrier"], again], capsys)
    assert code == 0, err
    assert len(rows(out, "PASS")) == 7 and "7 passed, 0 failed" in out
    assert "shape unchanged: barrier -> barrier" in out


def test_compare_other_checkpoints_exit_1_with_changed_rows(results, tmp_path, capsys):
    report = tmp_path / "compare.xml"
    code, out, _ = run(["compare", results["barrier"], results["flat"], "--junit", report],
                       capsys)
    assert code == 1
    failed = {r[3]: r for r in rows(out, "FAIL")}
    assert set(failed) == {"shape", "barrier_height", "midpoint_barrier", "loss_end"}
    assert failed["shape"][4:6] == ["barrier", "monotonic"]
    assert "shape changed: barrier -> monotonic" in out
    assert "lower barrier, L-LB" in out
    assert {r[3] for r in rows(out, "PASS")} == {"chord_barrier", "loss_start", "acc_end"}
    assert "3 passed, 4 failed" in out
    suite = ET.parse(report).getroot().find("testsuite")
    assert suite.get("tests") == "7" and suite.get("failures") == "4"


def test_compare_rtol_loosens_drift_but_not_verdicts(results, capsys):
    code, out, _ = run(["compare", results["barrier"], results["flat"], "--rtol", "10"], capsys)
    assert code == 1
    assert [r[3] for r in rows(out, "FAIL")] == ["shape"]


@pytest.mark.parametrize("new, match", [
    ("layered", "cannot compare results with different groups"),
    ("coarse", "cannot compare results on different alpha grids"),
])
def test_compare_disagreeing_results_exit_2(results, capsys, new, match):
    code, _, err = run(["compare", results["barrier"], results[new]], capsys)
    assert_bad_input(code, err, match)


# --- merge -----------------------------------------------------------------------------------
def test_merge_two_results_into_two_runs(results, tmp_path, capsys):
    out = tmp_path / "merged.nc"
    code, stdout, err = run(["merge", results["barrier"], results["flat"], "-o", out], capsys)
    assert code == 0, err
    assert f"wrote {out}: 2 runs, 1 groups" in stdout
    ds = open_result(out)
    assert ds.sizes["run"] == 2
    assert list(ds.run.values) == ["0:0", "1:0"]  # both inputs call their run "0"
    assert [str(s) for s in ds["shape"].sel(group="all", split="test").values] == [
        "barrier", "monotonic"]
    ends = [str(open_result(results[name]).end_path.values[0]) for name in ("barrier", "flat")]
    assert list(ds.end_path.values) == ends
    assert str(results["flat"]) in ds.attrs["merged_from"]


def test_merge_keeps_the_recorded_tolerances(ckpts, tmp_path, capsys):
    paths = []
    for name in ("a", "b"):
        paths.append(tmp_path / f"{name}.nc")
        assert main(["path", ckpts["high"], ckpts["low"], "--alphas", ALPHAS,
                     "--tolerance", "rtol=0.5", "--out", str(paths[-1])]) == 0
    code, _, err = run(["merge", *paths, "-o", tmp_path / "m.nc"], capsys)
    assert code == 0, err
    ds = open_result(tmp_path / "m.nc")
    assert ds.attrs["shape_rtol"] == 0.5
    assert set(ds["shape"].values.ravel()) == {"monotonic"}


@pytest.mark.parametrize("other, match", [
    ("coarse", "alpha grid differs"),
    ("layered", "groups ['all', 'layer1'] differ"),
])
def test_merge_disagreeing_results_exit_2_no_output(results, tmp_path, capsys, other, match):
    out = tmp_path / "merged.nc"
    code, _, err = run(["merge", results["barrier"], results[other], "-o", out], capsys)
    assert_bad_input(code, err, match)
    assert os.listdir(tmp_path) == []


def test_merge_results_on_different_data_exit_2_no_output(ckpts, results, tmp_path, capsys):
    other = tmp_path / "other.nc"
    assert main(["path", ckpts["high"], ckpts["low"], "--alphas", ALPHAS,
                 "--data", "spiral:300,50", "--out", str(other)]) == 0
    capsys.readouterr()
    out = tmp_path / "merged.nc"
    code, _, err = run(["merge", results["barrier"], other, "-o", out], capsys)
    assert code == 2, err
    assert err.startswith("error: cannot merge")
    assert not out.exists()


def test_merge_bad_suffix_exit_2(results, tmp_path, capsys):
    code, _, err = run(["merge", results["barrier"], "-o", tmp_path / "m.csv"], capsys)
    assert_bad_input(code, err, "should end in .nc")


# --- distance --------------------------------------------------------------------------------
@pytest.fixture
def bn_pair(tmp_path):
    """An MLP with BatchNorm whose running statistics move far more than its parameters."""
    from ckptscope.adapters.mlp import MLP

    torch.manual_seed(0)
    a = {k: v.clone() for k, v in MLP([2, 4, 1], batchnorm=True).state_dict().items()}
    g = torch.Generator().manual_seed(1)
    b = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3
         for k, v in a.items()}
    b["norms.0.running_mean"] = a["norms.0.running_mean"] + 10.0
    b["norms.0.running_var"] = a["norms.0.running_var"] * 5.0
    meta = {"adapter": "mlp", "adapter_options": {"widths": [2, 4, 1], "batchnorm": True}}
    paths = [save_checkpoint(tmp_path / f"{n}.safetensors", s, metadata=meta)
             for n, s in (("a", a), ("b", b))]
    return a, b, paths


def eq4(a: dict, b: dict, keys: list[str]) -> float:
    """||b - a||_F / ||a||_F over ``keys``, written out with numpy."""
    x = np.concatenate([a[k].double().numpy().ravel() for k in keys])
    y = np.concatenate([b[k].double().numpy().ravel() for k in keys])
    return float(np.linalg.norm(y - x) / np.linalg.norm(x))


def test_distance_table_is_eq4_by_hand(bn_pair, tmp_path, capsys):
    a, b, (pa, pb) = bn_pair
    out = tmp_path / "d.nc"
    code, stdout, err = run(["distance", pa, pb, "--preset", "layers", "--out", out], capsys)
    assert code == 0, err
    params = [k for k in a if not k.endswith(BUFFERS)]
    want = {
        "all": eq4(a, b, params),
        "layer1": eq4(a, b, [k for k in params if k.startswith(("layers.0.", "norms.0."))]),
        "layer2": eq4(a, b, [k for k in params if k.startswith("layers.1.")]),
    }
    for group, value in want.items():
        [row] = rows(stdout, group)
        assert row[3] == f"{value:.4g}", row
    assert f"wrote {out}" in stdout
    ds = xr.open_dataset(out).load()
    assert list(ds.group.values) == ["all", "layer1", "layer2"]
    np.testing.assert_allclose(ds.relative.values, list(want.values()), rtol=1e-12)
    assert list(ds.n_params.values) == [25, 20, 5]
    l2 = np.sqrt(sum(float(((b[k].double() - a[k].double()) ** 2).sum()) for k in params))
    assert float(ds.l2.sel(group="all")) == pytest.approx(l2, rel=1e-12)
    flat_a = np.concatenate([a[k].double().numpy().ravel() for k in params])
    flat_b = np.concatenate([b[k].double().numpy().ravel() for k in params])
    cosine = flat_a @ flat_b / np.sqrt((flat_a @ flat_a) * (flat_b @ flat_b))
    assert float(ds.cosine.sel(group="all")) == pytest.approx(cosine, rel=1e-12)
    assert ds.attrs["start_path"] == str(pa)


def test_distance_adapter_leaves_out_bn_running_stats(bn_pair, tmp_path, capsys):
    a, b, (pa, pb) = bn_pair
    out = tmp_path / "d.nc"
    code, stdout, err = run(["distance", pa, pb, "--adapter", "mlp", "--preset", "bn-stats",
                             "--out", out], capsys)
    assert code == 0, err
    params = [k for k in a if not k.endswith(BUFFERS)]
    with_stats = eq4(a, b, [k for k in a if a[k].is_floating_point()])
    ds = xr.open_dataset(out).load()
    relative = float(ds.relative.sel(group="all"))
    assert relative == pytest.approx(eq4(a, b, params), rel=1e-12)
    assert relative < with_stats / 2  # the stats moved by +10 and x5: counting them would show
    # The running statistics are buffers: their group holds no parameter.
    [row] = rows(stdout, "bn-stats")
    assert row[2:4] == ["0", "nan"]
    assert float(ds.n_params.sel(group="bn-stats")) == 0
    assert float(ds.n_params.sel(group="all")) == 25


def test_distance_bad_suffix_exit_2_no_output(bn_pair, tmp_path, capsys):
    _, _, (pa, pb) = bn_pair
    code, _, err = run(["distance", pa, pb, "--out", tmp_path / "d.csv"], capsys)
    assert_bad_input(code, err, "should end in .nc")
    assert not (tmp_path / "d.csv").exists()


# --- plot ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg")])
def test_plot_writes_the_figure(results, tmp_path, capsys, suffix, magic):
    out = tmp_path / "figures" / f"paths{suffix}"
    code, stdout, err = run(["plot", results["layered"], "-o", out, "--variable", "both",
                             "--title", "spiral"], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    assert magic in out.read_bytes()[:2000]
    assert os.listdir(out.parent) == [out.name]  # no temporary file left behind


def test_plot_run_layout(results, tmp_path, capsys):
    merged = tmp_path / "m.nc"
    assert main(["merge", str(results["barrier"]), str(results["flat"]), "-o", str(merged)]) == 0
    code, _, err = run(["plot", merged, "-o", tmp_path / "runs.png", "--layout", "run"], capsys)
    assert code == 0, err
    assert (tmp_path / "runs.png").stat().st_size > 1000


def test_plot_bad_suffix_exit_2_no_file(results, tmp_path, capsys):
    code, _, err = run(["plot", results["barrier"], "-o", tmp_path / "paths.jpg"], capsys)
    assert_bad_input(code, err, "should end in .png or .pdf or .svg")
    assert os.listdir(tmp_path) == []


# --- path over several runs ------------------------------------------------------------------
def test_path_pairs_give_a_run_dim(ckpts, tmp_path, capsys):
    out = tmp_path / "runs.nc"
    code, stdout, err = run(["path", "--pair", ckpts["high"], ckpts["low"],
                             "--pair", ckpts["high"], ckpts["high"], "--alphas", ALPHAS,
                             "--out", out], capsys)
    assert code == 0, err
    ds = open_result(out)
    assert ds.sizes["run"] == 2 and list(ds.run.values) == ["0", "1"]
    assert list(ds.end_path.values) == [ckpts["low"], ckpts["high"]]
    assert [str(s) for s in ds["shape"].sel(group="all", split="test").values] == [
        "barrier", "monotonic"]
    assert stdout.splitlines()[0].split()[:2] == ["run", "group"]
    assert [r[-2] for r in rows(stdout, "0")] == ["barrier"]
    assert [r[-2] for r in rows(stdout, "1")] == ["monotonic"]
    assert sorted(os.listdir(tmp_path)) == ["runs.nc"]  # the .partial folder is gone


def test_path_positional_pair_then_pairs(ckpts, tmp_path, capsys):
    out = tmp_path / "runs.nc"
    code, _, err = run(["path", ckpts["high"], ckpts["low"], "--pair", ckpts["mid"], ckpts["low"],
                        "--pair", ckpts["high"], ckpts["high"], "--alphas", ALPHAS,
                        "--out", out], capsys)
    assert code == 0, err
    ds = open_result(out)
    assert list(ds.run.values) == ["0", "1", "2"]
    assert list(ds.start_path.values) == [ckpts["high"], ckpts["mid"], ckpts["high"]]


def run_dir(folder, start: float, end: float):
    folder.mkdir(parents=True)
    save_checkpoint(folder / "init.safetensors", bias_only(start), metadata=META)
    save_checkpoint(folder / "final.safetensors", bias_only(end), metadata=META)
    return folder


def test_path_run_dirs_are_labelled_by_folder(tmp_path, capsys):
    seed0 = run_dir(tmp_path / "seed0", 4.0, -1.0)
    seed1 = run_dir(tmp_path / "seed1", 4.0, 4.0)
    out = tmp_path / "runs.nc"
    code, stdout, err = run(["path", "--run-dir", seed0, "--run-dir", seed1, "--alphas", ALPHAS,
                             "--out", out], capsys)
    assert code == 0, err
    ds = open_result(out)
    assert list(ds.run.values) == ["seed0", "seed1"]
    assert list(ds.start_path.values) == [str(seed0 / "init.safetensors"),
                                          str(seed1 / "init.safetensors")]
    assert [str(s) for s in ds["shape"].sel(group="all", split="test").values] == [
        "barrier", "monotonic"]
    assert rows(stdout, "seed0") and rows(stdout, "seed1")


def test_path_run_dirs_with_the_same_name_are_numbered(tmp_path, capsys):
    first = run_dir(tmp_path / "a" / "run", 4.0, -1.0)
    second = run_dir(tmp_path / "b" / "run", 4.0, 4.0)
    out = tmp_path / "runs.nc"
    code, _, err = run(["path", "--run-dir", first, "--run-dir", second, "--alphas", ALPHAS,
                        "--out", out], capsys)
    assert code == 0, err
    assert list(open_result(out).run.values) == ["0", "1"]


def test_path_run_dir_without_checkpoints_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run(["path", "--run-dir", tmp_path / "empty", "--out", tmp_path / "r.nc"],
                       capsys)
    assert_bad_input(code, err, "lacks init.safetensors and final.safetensors")
    assert os.listdir(tmp_path) == ["empty"]


def test_path_run_dir_names_what_is_missing(tmp_path, capsys):
    """A missing folder said it 'lacks' both files; a half-written one named both too."""
    code, _, err = run(["path", "--run-dir", tmp_path / "nope"], capsys)
    assert_bad_input(code, err, "nope' does not exist or is not a folder")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "init.safetensors").write_bytes(b"")
    code, _, err = run(["path", "--run-dir", tmp_path / "half"], capsys)
    assert_bad_input(code, err, "lacks final.safetensors; pass the files with --pair")


def test_path_tolerance_changes_verdict_and_is_recorded(ckpts, tmp_path, capsys):
    out = tmp_path / "r.nc"
    code, stdout, err = run(["path", ckpts["high"], ckpts["low"], "--alphas", ALPHAS,
                             "--tolerance", "rtol=0.5", "--out", out], capsys)
    assert code == 0, err
    [row] = rows(stdout, "all")
    assert row[-2:] == ["monotonic", "0.12"]
    ds = open_result(out)
    assert str(ds["shape"].squeeze().values) == "monotonic"
    assert ds.attrs["shape_rtol"] == 0.5
    assert float(ds.tolerance.squeeze()) == pytest.approx(0.5 * 1.3250, abs=1e-3)
    # the recorded tolerance is the one check reuses
    code, _, _ = run(["check", out, "--expect", "all:shape=monotonic"], capsys)
    assert code == 0


def test_path_default_tolerance_is_recorded(results):
    ds = open_result(results["barrier"])
    assert ds.attrs["shape_rtol"] == shape.DEFAULT_RTOL
    assert ds.attrs["shape_atol"] == shape.DEFAULT_ATOL
    assert ds.attrs["shape_plateau_alpha"] == shape.DEFAULT_PLATEAU_ALPHA


@pytest.mark.parametrize("tolerance, match", [
    ("rtol=-1", "shape rtol must be a finite number >= 0"),
    ("plateau_alpha=2", "plateau_alpha must be in (0, 1]"),
    ("rtol", "is not KEY=VALUE"),
    ("atol=small", "is not a number"),
])
def test_path_bad_tolerance_exit_2_no_output(ckpts, tmp_path, capsys, tolerance, match):
    code, _, err = run(["path", ckpts["high"], ckpts["low"], "--alphas", ALPHAS,
                        "--tolerance", tolerance, "--out", tmp_path / "r.nc"], capsys)
    assert_bad_input(code, err, match)
    assert os.listdir(tmp_path) == []
