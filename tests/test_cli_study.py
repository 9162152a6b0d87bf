"""The study commands end to end: summarize, correlate, report (exit codes, outputs)."""

from __future__ import annotations

import csv
import io
from html.parser import HTMLParser

import pytest
from scipy import stats

from ckptscope.results import save_result
from tests.conftest import run_cli as run
from tests.study import ACCURACIES, study_result


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    ds = study_result(folder)
    return ds, save_result(ds, folder / "result.nc")


def test_summarize_formats(study, capsys, tmp_path):
    ds, path = study
    code, out, err = run(["summarize", path], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["group", "split", "runs", "monotonic"]
    assert [line.split()[0] for line in lines[2:5]] == ["all", "first", "last"]
    code, out, _ = run(["summarize", path, "--format", "csv", "-o", tmp_path / "s.csv"], capsys)
    assert code == 0 and (tmp_path / "s.csv").read_text() == out
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["group"] for r in rows] == ["all", "first", "last"]
    assert all(int(r["n_run"]) == ds.sizes["run"] for r in rows)
    code, out, _ = run(["summarize", path, path, "--format", "markdown", "--by", "adapter"],
                       capsys)
    assert code == 0 and out.startswith("| condition | group |")
    assert f"| mlp | all | test | {2 * ds.sizes['run']} |" in out   # both files pooled


@pytest.mark.parametrize("argv, match", [
    (["--by", "nope"], "no run coordinate or attribute 'nope'"),
    (["--tolerance", "rtol=-1"], "rtol must be a finite number"),
])
def test_summarize_bad_input_exits_2(study, capsys, argv, match):
    code, out, err = run(["summarize", study[1], *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and match in err and "Traceback" not in err


def test_summarize_missing_file(capsys, tmp_path):
    code, _, err = run(["summarize", tmp_path / "none.nc"], capsys)
    assert code == 2 and "does not exist" in err


def test_correlate_prints_scipys_numbers_and_plots(study, capsys, tmp_path):
    ds, path = study
    fig = tmp_path / "c.png"
    code, out, err = run(["correlate", path, "--metric", "all:barrier_height", "--with",
                          "final_metrics.test_accuracy", "--method", "kendall", "--bootstrap",
                          "200", "--seed", "3", "--plot", fig], capsys)
    assert code == 0, err
    x = ds["barrier_height"].sel(group="all", split="test").values
    want = stats.kendalltau(x, ACCURACIES)
    assert f"kendall tau = {want.statistic:+.3f} (p = {want.pvalue:.3g}, n = 6)" in out
    assert "95% bootstrap interval" in out and "seed 3" in out
    assert fig.is_file() and fig.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, match", [
    (["--metric", "all:barrier_height", "--with", "acc_end", "--method", "cosine"],
     "Invalid value for '--method'"),
    (["--metric", "all:barrier_height", "--with", "nothing.csv"], "does not exist"),
    (["--metric", "all:shape", "--with", "acc_end"], "shape is a verdict"),
    (["--metric", "all:barrier_height", "--with", "acc_end", "--plot", "x.txt"],
     "--plot 'x.txt' should end in"),
])
def test_correlate_bad_input(study, capsys, argv, match):
    code, out, err = run(["correlate", study[1], *argv], capsys)
    assert code == 2 and match in err and "Traceback" not in err


def test_correlate_too_few_runs_and_constant_column(study, capsys, tmp_path):
    ds, _ = study
    few = save_result(ds.isel(run=[0, 1]), tmp_path / "few.nc")
    code, _, err = run(["correlate", few, "--metric", "all:barrier_height", "--with",
                        "acc_end"], capsys)
    assert code == 2 and "needs at least 3" in err
    table = tmp_path / "same.csv"
    table.write_text("run,y\n" + "".join(f"{r},1\n" for r in ds["run"].values))
    code, _, err = run(["correlate", study[1], "--metric", "all:barrier_height", "--with",
                        table], capsys)
    assert code == 2 and "cannot correlate" in err


def test_report_writes_html_and_records_the_check(study, capsys, tmp_path):
    out_file = tmp_path / "report.html"
    code, out, err = run(["report", study[1], "--out", out_file, "--expect",
                          "*:shape!=invalid", "--title", "CI <run>", "--correlate",
                          "all:barrier_height", "final_metrics.test_accuracy", "--correlate",
                          "all:barrier_height", "none.csv"], capsys)
    assert code == 0, err
    assert out.strip() == f"wrote {out_file}"
    assert err.startswith("warning: ") and "table 'none.csv' does not exist" in err
    text = out_file.read_text()
    parser = HTMLParser()
    parser.feed(text)
    assert "<title>CI &lt;run&gt;</title>" in text
    assert "PASS</span>" in text and "0 failed" in text
    assert "Correlations across runs" in text and "final_metrics.test_accuracy" in text


@pytest.mark.parametrize("argv, match", [
    (["--out", "r.txt"], "--out 'r.txt' should end in .html or .htm"),
    (["--out", "r.html", "--expect", "fc:shape=barrier"], "names group 'fc'"),
    (["--out", "r.html", "--expect", "all:speed<1"], "unknown metric"),
])
def test_report_bad_input_writes_nothing(study, capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["report", study[1], *argv], capsys)
    assert code == 2 and match in err
    assert list(tmp_path.iterdir()) == []


def test_study_commands_on_a_sweep(tmp_path, capsys):
    """A real trainer sweep: its result, its final checkpoints' final_metrics."""
    import json

    from ckptscope.checkpoints import load_checkpoint

    args = ["sweep", "--recipe", "mlp-spiral-fig1a", "--seeds", "0-2", "--out", tmp_path / "sw",
            "--alphas", "5", "--device", "cpu", "--set", "epochs=2", "--set",
            "data=spiral:64,32"]
    assert run(args, capsys)[0] == 0
    result = tmp_path / "sw" / "result.nc"
    code, out, err = run(["correlate", result, "--metric", "all:chord_barrier", "--with",
                          "final_metrics.test_accuracy", "--method", "pearson"], capsys)
    assert code == 0, err
    from ckptscope.results import open_result

    ds = open_result(result)
    accs = [json.loads(load_checkpoint(p).metadata["final_metrics"])["test_accuracy"]
            for p in ds["end_path"].values]
    want = stats.pearsonr(ds["chord_barrier"].sel(group="all", split="test").values, accs)
    assert f"pearson r = {want.statistic:+.3f}" in out and "n = 3" in out
    code, out, _ = run(["summarize", result, "--by", "recipe", "--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[0]["condition"] == "mlp-spiral-fig1a" and rows[0]["n_run"] == "3"
    code, _, err = run(["report", result, "--out", tmp_path / "r.html"], capsys)
    assert code == 0, err
