"""Recipes: what to train, as data (TOML files in ``recipes/``) loaded into a frozen dataclass.

A recipe holds every choice of one experiment of the paper: the model, the data, the optimizer
and its schedule, the augmentation, and the interventions on the initial state (start from a
given state dict, from a point of an earlier linear path, from random-label pre-training, with
some blocks reset to a fresh random init). Vary one with :func:`override` (``--set key=value``)
or ``dataclasses.replace``. The schema is documented in ``docs/training.md``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ckptscope.errors import CkptscopeError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OPTIMIZERS = ("sgd", "adam")
AUGMENTATIONS = ("crop", "flip", "brightness")
PARAM_GROUP_KEYS = ("pattern", "lr", "weight_decay")
RECIPE_PACKAGE = "ckptscope.train.recipes"


@dataclass(frozen=True)
class Recipe:
    """One training experiment (see ``docs/training.md`` for every field).

    Attributes:
        name: the recipe's name (its file name without ``.toml``).
        description: one line naming the paper's figure or table it makes.
        adapter, adapter_options: the architecture (``ckptscope adapters``) and its options.
        data: a dataset spec (``spiral``, ``digits``, ``cifar10``); a file-based set without a
            directory is completed by ``--data DIR`` to ``cifar10:DIR``.
        data_seed: seeds generated data (spiral); fixed across runs so every seed sees one set.
        train_examples: keep this many training examples (a seeded subset); 0 keeps all.
        epochs, batch_size: passes over the training split and examples per step.
        optimizer, lr, momentum, weight_decay: ``sgd`` (with momentum) or ``adam``.
        lr_milestones, lr_gamma: the learning rate is multiplied by ``lr_gamma`` after each
            listed epoch (``[33, 66]``: epochs 1-33 at ``lr``, 34-66 at ``lr/10``, ...);
            ``[]`` keeps it fixed.
        param_groups: per-group settings, ``{pattern, lr, weight_decay}``; ``pattern`` is
            ``re.match``-ed against parameter names, the first matching group wins, parameters
            matching none use ``lr`` and ``weight_decay`` (table 2).
        augment: any of ``crop`` (random crop after zero padding by ``crop_padding``), ``flip``
            (horizontal), ``brightness`` (factor uniform in ``1 +- brightness``); image data only.
        eval_batch_size: examples per forward pass when measuring.
        eval_train: measure the training split in eval mode after each epoch (else the running
            mean over the epoch's batches, in train mode).
        steps_per_epoch: cap on steps per epoch (0: the whole split); for smoke tests.
        init_from: a state dict (safetensors or torch) to start from; keys matching ``init_skip``
            or whose shape differs (an ImageNet stem or head) keep their fresh random init.
        init_result, init_run, init_alpha, init_group: start from theta_alpha = lerp(theta_i,
            theta_f, alpha) of a run of an earlier result (its ``start_path``/``end_path``);
            ``init_alpha`` is a number or ``"barrier"`` (the peak of that run's ``init_group``
            test loss, figure 3).
        reset: regexes of tensors reset to a fresh random init after the above (partial
            (pre-)training, figure 4).
        random_labels: pre-train on random labels first (adversarial init, figure 2B) until
            ``random_labels_target`` training accuracy or ``random_labels_epochs`` epochs, at
            fixed ``random_labels_lr``, without augmentation.
        random_labels_blocks: regexes of tensors that take the random-label state; the rest keep
            the fresh random init (figure 5). Empty: the whole network.
        needs: fields the user must set (e.g. ``init_from`` for pre-trained weights).
    """

    name: str
    description: str = ""
    adapter: str = "resnet18"
    adapter_options: dict = field(default_factory=dict)
    data: str = "cifar10"
    data_seed: int = 0
    train_examples: int = 0
    epochs: int = 100
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_milestones: list = field(default_factory=lambda: [33, 66])
    lr_gamma: float = 0.1
    param_groups: list = field(default_factory=list)
    augment: list = field(default_factory=lambda: ["crop", "flip"])
    crop_padding: int = 4
    brightness: float = 0.05
    eval_batch_size: int = 1000
    eval_train: bool = False
    steps_per_epoch: int = 0
    init_from: str = ""
    init_skip: list = field(default_factory=list)
    init_result: str = ""
    init_run: str = ""
    init_alpha: float | str = "barrier"
    init_group: str = "all"
    reset: list = field(default_factory=list)
    random_labels: bool = False
    random_labels_blocks: list = field(default_factory=list)
    random_labels_epochs: int = 100
    random_labels_lr: float = 0.01
    random_labels_target: float = 1.0
    needs: list = field(default_factory=list)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_type(self.name, f.name, getattr(self, f.name), f.type)
        problems = []
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        for key in ("epochs", "batch_size", "eval_batch_size", "random_labels_epochs"):
            if getattr(self, key) < 1 and not (key == "epochs" and self.epochs == 0):
                problems.append(f"{key}={getattr(self, key)} must be >= 1")
        for key in ("train_examples", "steps_per_epoch", "crop_padding", "data_seed"):
            if getattr(self, key) < 0:
                problems.append(f"{key}={getattr(self, key)} must be >= 0 (0: off)")
        for key in ("lr", "random_labels_lr"):
            if not getattr(self, key) > 0:
                problems.append(f"{key}={getattr(self, key)} must be > 0")
        for key in ("weight_decay", "momentum", "brightness"):
            if getattr(self, key) < 0:
                problems.append(f"{key}={getattr(self, key)} must be >= 0")
        if not 0 < self.lr_gamma <= 1:
            problems.append(f"lr_gamma={self.lr_gamma} must be in (0, 1]")
        if not 0 < self.random_labels_target <= 1:
            problems.append(f"random_labels_target={self.random_labels_target} must be in (0, 1]")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1
               for m in self.lr_milestones) or list(self.lr_milestones) != sorted(
                   self.lr_milestones):
            problems.append(f"lr_milestones={self.lr_milestones} must be increasing epochs >= 1")
        bad_aug = [a for a in self.augment if a not in AUGMENTATIONS]
        if bad_aug:
            problems.append(f"augment {bad_aug} is not a subset of {list(AUGMENTATIONS)}")
        if isinstance(self.init_alpha, str) and self.init_alpha != "barrier":
            problems.append(f"init_alpha={self.init_alpha!r} must be a number or 'barrier'")
        if self.init_from and self.init_result:
            problems.append("init_from and init_result are exclusive: set one of them")
        for i, group in enumerate(self.param_groups):
            if not isinstance(group, Mapping) or "pattern" not in group or set(group) - set(
                    PARAM_GROUP_KEYS):
                problems.append(f"param_groups[{i}]={group!r} must be a table with 'pattern' "
                                f"and any of 'lr', 'weight_decay'")
        for key in ("init_skip", "reset", "random_labels_blocks"):
            problems += _regex_problems(key, getattr(self, key))
        problems += _regex_problems("param_groups", [g.get("pattern", "") for g in
                                                     self.param_groups if isinstance(g, Mapping)])
        unknown = [n for n in self.needs if n not in field_names()]
        if unknown:
            problems.append(f"needs {unknown} names no field")
        if problems:
            raise CkptscopeError(f"recipe {self.name!r}: {'; '.join(problems)}.")

    def to_dict(self) -> dict:
        """Return every field as plain JSON-able values."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_toml(self) -> str:
        """Return the resolved recipe as TOML text (``ckptscope train --show``)."""
        lines, tables = [], []
        for key, value in self.to_dict().items():
            if key == "param_groups":
                for group in value:
                    tables.append("\n[[param_groups]]\n" + "\n".join(
                        f"{k} = {_toml_value(v)}" for k, v in group.items()))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "".join(tables) + "\n"

    def missing_needs(self) -> list[str]:
        """Fields listed in ``needs`` that are still empty."""
        return [n for n in self.needs if getattr(self, n) in ("", None, [], {})]


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
          "list": (list, tuple), "float | str": (int, float, str)}


def _check_type(recipe: str, key: str, value: object, annotation: str) -> None:
    expected = _TYPES[annotation]
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in expected)
    if not ok:
        raise CkptscopeError(
            f"recipe {recipe!r}: {key}={value!r} is a {type(value).__name__}, expected "
            f"{annotation}; e.g. --set {key}={_example(annotation)}."
        )


def _example(annotation: str) -> str:
    return {"str": "text", "int": "3", "float": "0.01", "bool": "true", "dict": "{a=1}",
            "list": "[1,2]", "float | str": "0.5"}[annotation]


def _regex_problems(key: str, patterns: Sequence[str]) -> list[str]:
    problems = []
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            problems.append(f"{key} pattern {pattern!r} is not a regex ({err})")
    return problems


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def field_names() -> list[str]:
    """Every recipe field, in order."""
    return [f.name for f in dataclasses.fields(Recipe)]


def recipe_names() -> list[str]:
    """The recipes shipped with ckptscope, sorted."""
    folder = resources.files(RECIPE_PACKAGE)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_from_mapping(values: Mapping[str, object], *, source: str) -> Recipe:
    """Build a recipe from parsed TOML, naming unknown fields."""
    unknown = sorted(set(values) - set(field_names()))
    if unknown:
        raise CkptscopeError(
            f"{source}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(field_names())}."
        )
    return Recipe(**values)


def load_recipe(name: str | Path) -> Recipe:
    """Return a shipped recipe by name, or one from a ``.toml`` file path.

    Example:
        >>> recipe = load_recipe("resnet18-cifar10")
        >>> fast = dataclasses.replace(recipe, epochs=1)
    """
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        text, source, default_name = path.read_text(), str(path), path.stem
    else:
        names = recipe_names()
        if str(name) not in names:
            raise CkptscopeError(
                f"unknown recipe {str(name)!r}; known: {', '.join(names)} (see `ckptscope train "
                f"--list`), or a path to a .toml file."
            )
        text = resources.files(RECIPE_PACKAGE).joinpath(f"{name}.toml").read_text()
        source, default_name = f"recipe {name}", str(name)
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise CkptscopeError(f"{source} is not valid TOML ({err}); fix the file.") from None
    values.setdefault("name", default_name)
    return recipe_from_mapping(values, source=source)


def parse_value(text: str) -> object:
    """Parse a ``--set`` value: a TOML literal (``0.1``, ``[33, 66]``, ``{a = 1}``, ``true``),
    else JSON, else the text itself (``resnet34``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_assignments(pairs: Sequence[str]) -> dict[str, object]:
    """``["lr=0.01", "adapter_options.num_classes=100"]`` -> ``{"lr": 0.01, ...}``."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CkptscopeError(f"--set {pair!r} is not KEY=VALUE (e.g. --set epochs=10).")
        out[key] = parse_value(value.strip())
    return out


def override(recipe: Recipe, values: Mapping[str, object]) -> Recipe:
    """Return ``recipe`` with fields replaced; ``a.b`` keys update one entry of a table field.

    Raises:
        CkptscopeError: an unknown field (listing the valid ones) or an invalid value.
    """
    names = field_names()
    changes: dict[str, object] = {}
    for key, value in values.items():
        head, dot, sub = key.partition(".")
        if head not in names:
            raise CkptscopeError(
                f"--set {key}: {head!r} is not a recipe field; valid: {', '.join(names)}."
            )
        if dot:
            current = changes.get(head, getattr(recipe, head))
            if not isinstance(current, Mapping):
                raise CkptscopeError(
                    f"--set {key}: {head!r} is not a table; set it whole: --set {head}=VALUE."
                )
            value = {**current, sub: value}
        if head == "name":
            raise CkptscopeError("--set name: a recipe's name is fixed; copy the .toml instead.")
        changes[head] = value
    return dataclasses.replace(recipe, **changes)
