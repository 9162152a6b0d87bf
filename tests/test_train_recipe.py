"""Recipes: the shipped TOML files, validation, ``--set`` overrides."""

from __future__ import annotations

import dataclasses

import pytest

from ckptscope.errors import CkptscopeError
from ckptscope.train.loop import lr_factor
from ckptscope.train.recipe import (
    Recipe,
    field_names,
    load_recipe,
    override,
    parse_assignments,
    parse_value,
    recipe_names,
)

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib


@pytest.mark.parametrize("name", recipe_names())
def test_load_recipe_every_shipped_recipe_names_a_figure_or_table(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert "Fig" in recipe.description or "Table" in recipe.description
    # --show output is TOML that loads back into the same recipe.
    again = Recipe(**tomllib.loads(recipe.to_toml()))
    assert again == recipe


def test_recipe_names_cover_the_paper():
    names = set(recipe_names())
    for expected in ("resnet18-cifar10", "resnet18-cifar10-pretrained", "resnet50-cifar100",
                     "resnet18-cifar10-random-labels", "resnet18-cifar10-barrier-init",
                     "resnet18-cifar10-partial", "resnet18-cifar10-blockwise-random-labels",
                     "resnet18-cifar10-subset", "resnet18-cifar10-noaug",
                     "resnet18-cifar10-brightness", "resnet18-cifar10-fixed-lr",
                     "resnet18-cifar10-lr-barrier-blocks", "resnet34-cifar10",
                     "resnet50-cifar10", "vgg11-cifar10", "vgg11-bn-cifar10",
                     "mlp-spiral-fig1a", "mlp-mnist-fig1a", "mlp-digits-fig1a",
                     "mlp6-spiral-50", "mlp6-spiral-500", "mlp6-spiral-mixed"):
        assert expected in names


def test_load_recipe_baseline_matches_the_paper():
    r = load_recipe("resnet18-cifar10")
    assert (r.adapter, r.data, r.epochs, r.batch_size, r.optimizer) == (
        "resnet18", "cifar10", 100, 128, "sgd")
    assert (r.lr, r.momentum, r.weight_decay, r.lr_milestones) == (0.1, 0.9, 5e-4, [33, 66])
    assert r.augment == ["crop", "flip"] and r.crop_padding == 4
    mixed = load_recipe("mlp6-spiral-mixed")
    assert mixed.adapter_options["widths"] == [2, 500, 500, 500, 500, 25, 25, 1]


def test_lr_factor_drops_after_each_milestone():
    factors = [lr_factor(e, milestones=[33, 66], gamma=0.1) for e in (1, 33, 34, 66, 67, 100)]
    assert factors == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_factor(50, milestones=[], gamma=0.1) == 1


def test_load_recipe_unknown_name_lists_known():
    with pytest.raises(CkptscopeError, match=r"unknown recipe 'nope'; known: .*resnet18-cifar10"):
        load_recipe("nope")


def test_load_recipe_from_file_unknown_field(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('adapter = "mlp"\nlearning_rate = 0.1\n')
    with pytest.raises(CkptscopeError, match=r"unknown field\(s\) learning_rate; valid: name, "):
        load_recipe(str(path))
    path.write_text('adapter = "mlp"\ndata = "spiral"\naugment = []\n')
    assert load_recipe(str(path)).name == "mine"


@pytest.mark.parametrize(("text", "value"), [
    ("0.01", 0.01), ("3", 3), ("true", True), ("[33, 66]", [33, 66]), ("[]", []),
    ("resnet34", "resnet34"), ('"spiral:200,100"', "spiral:200,100"),
    ("{num_classes = 100}", {"num_classes": 100}), ('{"a": 1}', {"a": 1}),
    ("['layer1\\.']", ["layer1\\."]),
])
def test_parse_value_reads_toml_json_or_text(text, value):
    assert parse_value(text) == value


def test_override_replaces_fields_and_table_entries():
    base = load_recipe("resnet50-cifar100")
    r = override(base, parse_assignments(["epochs=2", "adapter_options.in_channels=1",
                                          "lr_milestones=[]"]))
    assert (r.epochs, r.lr_milestones) == (2, [])
    assert r.adapter_options == {"num_classes": 100, "in_channels": 1}
    assert base.epochs == 100  # frozen: the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.epochs = 3


def test_override_unknown_field_lists_valid_ones():
    with pytest.raises(CkptscopeError, match=r"--set lrate: 'lrate' is not a recipe field; "
                                             r"valid: name, description, adapter"):
        override(load_recipe("resnet18-cifar10"), {"lrate": 0.1})
    assert "lr" in field_names()


@pytest.mark.parametrize(("values", "match"), [
    ({"epochs": "ten"}, r"epochs='ten' is a str, expected int; e.g. --set epochs=3"),
    ({"epochs": 2.5}, r"epochs=2.5 is a float, expected int"),
    ({"eval_train": 1}, r"eval_train=1 is a int, expected bool"),
    ({"optimizer": "rmsprop"}, r"optimizer 'rmsprop' is not one of"),
    ({"batch_size": 0}, r"batch_size=0 must be >= 1"),
    ({"lr": 0}, r"lr=0 must be > 0"),
    ({"lr_milestones": [66, 33]}, r"lr_milestones=\[66, 33\] must be increasing"),
    ({"lr_milestones": ["a"]}, r"lr_milestones=\['a'\] must be increasing"),
    ({"augment": ["rotate"]}, r"augment \['rotate'\] is not a subset"),
    ({"init_alpha": "top"}, r"init_alpha='top' must be a number or 'barrier'"),
    ({"reset": ["layer1("]}, r"reset pattern 'layer1\(' is not a regex"),
    ({"param_groups": [{"lr": 0.1}]}, r"param_groups\[0\]=.* must be a table with 'pattern'"),
    ({"init_from": "a.pt", "init_result": "r.nc"}, r"init_from and init_result are exclusive"),
    ({"name": "other"}, r"--set name: a recipe's name is fixed"),
    ({"epochs.x": 1}, r"--set epochs.x: 'epochs' is not a table"),
])
def test_override_rejects_bad_values(values, match):
    with pytest.raises(CkptscopeError, match=match):
        override(load_recipe("resnet18-cifar10"), values)


def test_parse_assignments_needs_key_value():
    with pytest.raises(CkptscopeError, match=r"--set 'epochs' is not KEY=VALUE"):
        parse_assignments(["epochs"])


def test_missing_needs_names_the_field():
    recipe = load_recipe("resnet18-cifar10-pretrained")
    assert recipe.missing_needs() == ["init_from"]
    assert override(recipe, {"init_from": "w.pt"}).missing_needs() == []
