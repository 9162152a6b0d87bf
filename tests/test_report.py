"""The HTML report: parsed with html.parser, every group and verdict named, nothing fetched,
every string from the result escaped. (No headless browser is installable here.)"""

from __future__ import annotations

import base64
import re
import warnings
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

import ckptscope
from ckptscope.errors import CkptscopeError
from ckptscope.report import render_report, report
from ckptscope.results import RunInfo, build_result
from ckptscope.shape import classify
from tests.study import study_result


class Page(HTMLParser):
    """Tags, attributes and text of an HTML page, with its structure checked as it goes."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.open: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)

    @property
    def words(self) -> str:
        return " ".join(self.text)

    def cells(self) -> list[str]:
        return [t.strip() for t in self.text]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return study_result(tmp_path_factory.mktemp("study"))


def _no_network(text: str, page: Page) -> None:
    for tag, attrs in page.tags:
        assert tag not in ("script", "iframe", "object", "embed", "link"), tag
        for name in ("src", "href", "srcset", "action", "data"):
            value = attrs.get(name)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, name, value[:60])
    stripped = re.sub(r'data:[^"]*', "", text)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", stripped, re.I)
    assert "url(" not in stripped and "@import" not in stripped
    csp = [a["content"] for t, a in page.tags if t == "meta"
           and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]


def _svgs(page: Page) -> list[ET.Element]:
    out = []
    for tag, attrs in page.tags:
        if tag == "img":
            head, _, data = attrs["src"].partition(",")
            assert head == "data:image/svg+xml;base64"
            assert attrs.get("alt")
            out.append(ET.fromstring(base64.b64decode(data)))
    return out


def test_report_names_every_group_and_verdict(ds, tmp_path):
    path = report(ds, tmp_path / "r.html", expect=["all:shape=monotonic", "*:shape!=invalid"],
                  title="study")
    text = path.read_text()
    page = Page(text)
    assert not page.open                                   # every element closed
    _no_network(text, page)
    cells = page.cells()
    fresh = classify(ds)
    for group in ds["group"].values:
        assert str(group) in cells
    for verdict in np.unique(fresh["shape"].values):
        assert str(verdict) in cells                       # verdict table
    # One verdict row per (run, group, split), each with its verdict.
    n_rows = ds.sizes["run"] * ds.sizes["group"] * ds.sizes["split"]
    assert sum(c in ("monotonic", "barrier", "plateau", "invalid") for c in cells) >= n_rows
    # The tolerances, the check outcome (one run is monotonic: the claim fails for the rest).
    assert "rtol 0.02, atol 0.01, plateau_alpha 0.75" in page.words
    assert "FAIL" in cells and "PASS" in cells
    n_checks = ds.sizes["run"] * (1 + ds.sizes["group"])
    n_failed = int((fresh["shape"].sel(group="all") != "monotonic").sum())
    assert f"{n_checks - n_failed} passed, {n_failed} failed." in page.words
    # Provenance: every checkpoint's digest and the versions.
    for digest in (*ds["start_sha256"].values, *ds["end_sha256"].values):
        assert digest in cells
    assert "torch_version" in cells and "xarray" in cells
    # Figures: the overview and one per group, each a well-formed SVG.
    svgs = _svgs(page)
    assert len(svgs) == 1 + ds.sizes["group"]
    assert all(s.tag.endswith("svg") for s in svgs)


def test_report_escapes_every_string_from_the_result(tmp_path):
    hostile = '<script>alert("x")</script>'
    alphas = np.linspace(0, 1, 5)
    loss = np.array([[[[1.0, 0.8, 0.6, 0.4, 0.2]], [[1.0, 1.5, 0.6, 0.4, 0.2]]]] * 3)
    ds = build_result(
        loss=loss, accuracy=np.full(loss.shape, 0.5), distance=np.ones((3, 2)), alphas=alphas,
        groups=["all", "<b>g&h</b>"], patterns=[".*", "<img src=x>"], n_tensors=[2, 1],
        n_params=[2, 1], splits=["test"], n_examples=[5],
        runs=[RunInfo(f"<i>{i}</i>", start_path=f"http://evil/{i}", end_path=hostile)
              for i in range(3)],
        attrs={"notes": hostile, "data": '"><a href="http://evil">'})
    text = render_report(ds, expect=["<b>g&h</b>:shape=barrier"])
    page = Page(text)
    assert [t for t, _ in page.tags if t in ("script", "b", "i", "a") and t != "a"] == []
    assert not [a for t, a in page.tags if t == "a" and not a.get("href", "").startswith("#")]
    assert hostile in page.words and "<b>g&h</b>" in page.cells()
    assert "http://evil/0" in page.words                   # shown, as text only
    for tag, attrs in page.tags:
        assert tag != "img" or attrs["src"].startswith("data:")


def test_report_of_several_results_merged_and_not(ds, tmp_path):
    ds = ds.sel(group=["all"])                            # fewer figures: a faster test
    halves = [ds.isel(run=[0, 1, 2]), ds.isel(run=[3, 4, 5])]
    merged = ckptscope.merge([h.assign_coords(run=["a", "b", "c"]) for h in halves])
    text = render_report({"sweep": ds, "merged": merged}, by=None)
    page = Page(text)
    _no_network(text, page)
    assert "sweep" in page.cells() and "merged" in page.cells()
    assert "0:a" in page.cells() and "1:c" in page.cells()
    assert len(_svgs(page)) == 2 * (1 + ds.sizes["group"])
    with_conditions = Page(render_report(merged, by="run_prefix"))
    assert "condition" in with_conditions.cells()


def test_report_errors(ds, tmp_path):
    with pytest.raises(CkptscopeError, match="names group 'fc'"):
        report(ds, tmp_path / "r.html", expect=["fc:shape=barrier"])
    assert not (tmp_path / "r.html").exists()
    forged = ds.copy(deep=True)
    forged["shape"].values[:] = "plateau"
    with pytest.raises(CkptscopeError, match="stores shape = 'plateau'"):
        render_report(forged)



def test_report_of_invalid_curves_names_them_without_warnings():
    alphas = np.linspace(0, 1, 5)
    loss = np.array([[[[1.0, 0.8, 0.6, 0.4, 0.2]]], [[[np.nan] * 5]],
                     [[[1.0, np.inf, 0.6, 0.4, 0.2]]]])
    ds = build_result(loss=loss, accuracy=np.full(loss.shape, 0.5), distance=np.ones((3, 1)),
                      alphas=alphas, groups=["all"], patterns=[".*"], n_tensors=[1],
                      n_params=[1], splits=["test"], n_examples=[5],
                      runs=[RunInfo(str(i)) for i in range(3)], attrs={})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = Page(render_report(ds, expect=["all:shape!=invalid"]))
    cells = page.cells()
    assert cells.count("invalid") >= 2 and "2 (67%)" in cells       # the summary's invalid count
    assert "1 passed, 2 failed." in page.words


def test_report_shows_correlations_and_the_ones_it_cannot_compute(ds):
    from scipy import stats

    with pytest.warns(UserWarning, match="no correlation of all:shape with acc_end"):
        page = Page(render_report(ds, correlate=[("all:barrier_height", "acc_end"),
                                                 ("all:shape", "acc_end")]))
    want = stats.spearmanr(ds["barrier_height"].sel(group="all", split="test").values,
                           ds["accuracy"].sel(group="all", split="test").isel(alpha=-1).values)
    cells = page.cells()
    assert f"{want.statistic:+.3f}" in cells and f"{want.pvalue:.3g}" in cells
    assert any("shape is a verdict" in c for c in cells)
    assert len(_svgs(page)) == 1 + ds.sizes["group"] + 1        # one scatter
