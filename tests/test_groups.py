"""Group specs, regex anchoring and errors."""

from __future__ import annotations

import pytest

from ckptscope.errors import CkptscopeError
from ckptscope.groups import normalise_groups, parse_group, resolve_groups

KEYS = [
    "conv1.weight",
    "bn1.weight",
    "layer1.0.conv1.weight",
    "layer3.0.conv1.weight",
    "layer3.1.bn2.running_mean",
    "model.layer3.x",
    "fc.weight",
    "fc.bias",
]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("layer3.*", ("layer3.*", "layer3.*")),
        ("b3=layer3\\.", ("b3", "layer3\\.")),
        ("(?P<x>fc)=?", ("(?P<x>fc)=?", "(?P<x>fc)=?")),
        ("fc", ("fc", "fc")),
    ],
)
def test_parse_group(spec, expected):
    assert parse_group(spec) == expected


def test_resolve_groups_anchors_at_start():
    groups = resolve_groups(KEYS, normalise_groups(["layer3.*", "head=fc\\."]), full=True)
    assert [g.name for g in groups] == ["all", "layer3.*", "head"]
    assert groups[0].keys == tuple(KEYS)
    assert groups[1].keys == ("layer3.0.conv1.weight", "layer3.1.bn2.running_mean")
    assert "model.layer3.x" not in groups[1].keys
    assert groups[2].keys == ("fc.weight", "fc.bias")


def test_resolve_groups_without_full():
    groups = resolve_groups(KEYS, {"fc": "fc"}, full=False)
    assert [g.name for g in groups] == ["fc"]


def test_resolve_groups_matching_nothing_points_to_inspect():
    with pytest.raises(CkptscopeError, match=r"matched no tensor.*ckptscope inspect a.pt"):
        resolve_groups(KEYS, {"x": "layer9"}, source="a.pt")


@pytest.mark.parametrize(
    "groups, match",
    [
        (["fc", "fc"], "given twice"),
        ({"all": "fc"}, "reserved"),
        (["bad=("], "not a valid regex"),
    ],
)
def test_normalise_groups_errors(groups, match):
    with pytest.raises(CkptscopeError, match=match):
        normalise_groups(groups)


def test_normalise_groups_mapping_and_none():
    assert normalise_groups(None) == {}
    assert normalise_groups({"a": "fc"}) == {"a": "fc"}
    assert normalise_groups("fc") == {"fc": "fc"}
