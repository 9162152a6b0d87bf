"""examples/ci: the script runs, its expectations hold, and the workflow runs the script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ckptscope.check import load_expectations
from ckptscope.results import open_result

CI = Path(__file__).resolve().parents[1] / "examples" / "ci"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_run_sh_passes_and_writes_the_junit_report(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "WORK": str(work),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    res = subprocess.run(["bash", str(CI / "run.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("init.safetensors", "final.safetensors", "result.nc", "paths.png", "report.xml",
                 "report.html"):
        assert (work / name).is_file(), name
    assert not (work / "result.nc.partial").exists()

    suite = ET.parse(work / "report.xml").getroot().find("testsuite")
    n_rows = int(suite.get("tests"))
    assert suite.get("failures") == "0"
    assert n_rows >= len(load_expectations(CI / "expectations.toml"))
    assert f"{n_rows} passed, 0 failed" in res.stdout

    ds = open_result(work / "result.nc")
    assert list(ds.group.values) == ["all", "layer1", "layer2", "layer3"]
    assert ds.sizes["alpha"] == 51


def test_expectations_file_reads():
    expectations = load_expectations(CI / "expectations.toml")
    assert {e.group for e in expectations} == {"all", "*"}
    assert any(e.metric == "shape" for e in expectations)


def test_run_sh_is_strict_bash():
    text = (CI / "run.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    for step in ("ckptscope demo", "ckptscope path", "ckptscope report", "ckptscope check",
                 "--junit"):
        assert step in text, step
    # The report comes before the gate, so a failing check still leaves it for the artifact.
    assert text.index("ckptscope report") < text.index("ckptscope check")


def test_workflow_installs_torch_then_ckptscope_and_runs_the_script():
    text = (CI / "github-workflow.yml").read_text()
    torch = text.index("pip install torch==2.13.0")
    assert torch < text.index("pip install -e .") < text.index("bash examples/ci/run.sh")
    assert "python-version:" in text and "upload-artifact" in text
    assert "report.html" in text
    assert "\t" not in text  # YAML forbids tabs for indentation
