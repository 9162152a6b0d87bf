"""Interventions on the initial state theta_i (section 4 of the paper), composed in one order.

1. a fresh random init (PyTorch's default, from the run's seed);
2. ``init_from``: a given state dict (pre-trained, or trained: figures 2A and 4);
3. ``init_result``: theta_alpha = lerp(theta_i, theta_f, alpha) of an earlier run (figure 3);
4. ``random_labels``: pre-train on random labels, for the whole net or some blocks (2B, 5);
5. ``reset``: some tensors back to the fresh init (partial (pre-)training, figure 4).

Each step is a function of plain state dicts; :func:`initial_state` composes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ckptscope.checkpoints import check_pair, load_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.points import path_state
from ckptscope.train.loop import evaluate, make_optimizer, train_epoch
from ckptscope.train.recipe import Recipe

State = dict[str, torch.Tensor]


def clone_state(module: nn.Module) -> State:
    """A detached copy of the module's state dict, on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def matching(keys: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The keys that ``re.match`` any of ``patterns``."""
    return [k for k in keys if any(re.match(p, k) for p in patterns)]


def _require_match(keys: Sequence[str], patterns: Sequence[str], field: str) -> None:
    for pattern in patterns:
        if not any(re.match(pattern, k) for k in keys):
            raise CkptscopeError(
                f"{field} pattern {pattern!r} matches no tensor; keys start with "
                f"{list(keys)[:5]} (list them with `ckptscope inspect`)."
            )


def load_into(fresh: Mapping[str, torch.Tensor], path: str, *, skip: Sequence[str] = ()
              ) -> tuple[State, list[str]]:
    """Return ``fresh`` with every tensor of the file at ``path`` whose key and shape match.

    Keys matching ``skip``, and those whose shape differs (an ImageNet model's 7x7 stem or
    1000-class head on a CIFAR model), keep their fresh value; they are returned, sorted.

    Raises:
        CkptscopeError: the file shares no tensor with the model.
    """
    source = load_checkpoint(path).state
    state, kept = dict(fresh), []
    for key, value in fresh.items():
        other = source.get(key)
        if other is None or other.shape != value.shape or any(re.match(p, key) for p in skip):
            kept.append(key)
        else:
            state[key] = other.to(value.dtype)
    if len(kept) == len(fresh):
        raise CkptscopeError(
            f"init_from {path!r} shares no tensor (key and shape) with the model; its keys start "
            f"with {sorted(source)[:5]}, the model's with {sorted(fresh)[:5]}."
        )
    return state, sorted(kept)


def path_point(result_path: str, *, run: str = "", alpha: float | str = "barrier",
               group: str = "all") -> tuple[State, float, str]:
    """Return (theta_alpha, alpha, run) on the whole-model line of one run of a result.

    Args:
        result_path: a result file (``ckptscope path --out``, ``sweep``) whose ``start_path``
            and ``end_path`` still exist.
        run: the run label (default: the first run).
        alpha: a number, or ``"barrier"``: the alpha of the largest test loss of ``group``.
        group: the group whose curve locates the barrier.
    """
    from ckptscope.results import open_result
    from ckptscope.shape import classify

    ds = open_result(result_path)
    runs = [str(r) for r in ds["run"].values]
    run = run or runs[0]
    if run not in runs:
        raise CkptscopeError(f"init_run {run!r} is not a run of {result_path}; runs: {runs}.")
    if alpha == "barrier":
        if "peak_alpha" not in ds:
            ds = classify(ds)
        groups = [str(g) for g in ds["group"].values]
        if group not in groups:
            raise CkptscopeError(f"init_group {group!r} is not a group of {result_path}; "
                                 f"groups: {groups}.")
        splits = [str(s) for s in ds["split"].values]
        split = "test" if "test" in splits else splits[0]
        alpha = float(ds["peak_alpha"].sel(run=run, group=group, split=split))
    start = str(ds["start_path"].sel(run=run).values)
    end = str(ds["end_path"].sel(run=run).values)
    a, b = load_checkpoint(start).state, load_checkpoint(end).state
    check_pair(a, b, names=(start, end))
    return path_state(a, b, float(alpha)), float(alpha), run


def random_label_state(module: nn.Module, splits: Mapping[str, tuple], *, recipe: Recipe,
                       loss_fn: Callable, binary: bool, generator: torch.Generator,
                       device: torch.device, on_epoch: Callable[[dict], None] | None = None
                       ) -> tuple[State, dict]:
    """Train ``module`` (in place) on the training inputs with uniformly random labels.

    Stops once the epoch's running training accuracy reaches ``recipe.random_labels_target``
    or after ``recipe.random_labels_epochs`` epochs. Fixed lr ``random_labels_lr``, the
    recipe's optimizer and weight decay, no augmentation. Returns the state and a record of
    how far it got.
    """
    x, y = splits["train"]
    classes = 2 if binary else int(y.max()) + 1
    labels = torch.randint(0, classes, (len(y),), generator=generator)
    labels = labels.to(device=device, dtype=torch.float32 if binary else torch.long)
    x = x.to(device)
    optimizer = make_optimizer(module, optimizer=recipe.optimizer, lr=recipe.random_labels_lr,
                               weight_decay=recipe.weight_decay, momentum=recipe.momentum)
    record: dict = {"epoch": 0, "accuracy": 0.0}
    for epoch in range(1, recipe.random_labels_epochs + 1):
        stats = train_epoch(module, x, labels, optimizer=optimizer, loss_fn=loss_fn,
                            batch_size=recipe.batch_size, order=generator,
                            max_steps=recipe.steps_per_epoch)
        record = {"epoch": epoch, "loss": stats.loss, "accuracy": stats.accuracy}
        if on_epoch:
            on_epoch({"phase": "random_labels", **record})
        if stats.accuracy >= recipe.random_labels_target:
            break
    # Also the accuracy as measured in eval mode, for the record.
    record["eval_accuracy"] = evaluate(module, x, labels, loss_fn=loss_fn,
                                       batch_size=recipe.eval_batch_size)[1]
    return clone_state(module), record


def initial_state(module: nn.Module, recipe: Recipe, *, splits: Mapping[str, tuple],
                  loss_fn: Callable, binary: bool, generator: torch.Generator,
                  device: torch.device,
                  on_epoch: Callable[[dict], None] | None = None) -> tuple[State, dict]:
    """Return theta_i for ``recipe`` and notes on what was done (for the metadata).

    ``module`` holds the fresh random init on entry and theta_i on return.
    """
    fresh = clone_state(module)
    keys = list(fresh)
    state = dict(fresh)
    notes: dict = {}
    if recipe.init_from:
        state, kept = load_into(fresh, recipe.init_from, skip=recipe.init_skip)
        notes["init_from"] = recipe.init_from
        notes["init_fresh_keys"] = kept
    if recipe.init_result:
        point, alpha, run = path_point(recipe.init_result, run=recipe.init_run,
                                       alpha=recipe.init_alpha, group=recipe.init_group)
        check_pair(fresh, point, names=("the model", recipe.init_result),
                   fix="train with the adapter and options of that result's runs")
        state = {k: point[k].to(v.dtype) for k, v in fresh.items()}
        notes.update(init_result=recipe.init_result, init_run=run, init_alpha=alpha)
    if recipe.random_labels:
        _require_match(keys, recipe.random_labels_blocks, "random_labels_blocks")
        module.load_state_dict(state)
        module.to(device)
        trained, record = random_label_state(module, splits, recipe=recipe, loss_fn=loss_fn,
                                             binary=binary, generator=generator, device=device,
                                             on_epoch=on_epoch)
        blocks = matching(keys, recipe.random_labels_blocks) if recipe.random_labels_blocks \
            else keys
        state = {k: trained[k] if k in blocks else fresh[k] for k in keys}
        notes["random_labels"] = {**record, "tensors": len(blocks)}
    if recipe.reset:
        _require_match(keys, recipe.reset, "reset")
        reset = matching(keys, recipe.reset)
        state.update({k: fresh[k] for k in reset})
        notes["reset_tensors"] = len(reset)
    module.load_state_dict(state)
    return state, notes
