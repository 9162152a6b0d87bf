"""Spawning: a child run that continues a parent run from its state at epoch K.

Frankle et al. (2020)'s instability analysis trains copies of one network from one state,
differing only in their SGD noise (data order and augmentation). A parent run trained with
``--save-every`` writes, beside each ``epoch_XXX.safetensors``, ``epoch_XXX.state.pt``: the
optimizer state, the random streams at that epoch boundary, the recipe and seed (plain tensors,
numbers and strings, read with ``torch.load(weights_only=True)``; no pickled objects). A child
(``ckptscope train --spawn-from RUN/epoch_XXX.safetensors --seed S'``) restores the model, the
optimizer and the schedule (the learning rate follows the epoch) and trains on to the recipe's
last epoch:

- with a seed of its own, it draws its data order and augmentations from fresh streams of that
  seed (its epoch K + 1 takes the seed's first permutation);
- with the parent's seed, it continues the parent's streams, so it reproduces the parent's
  final bit for bit: the control that the restore is exact.

Spawning from ``init.safetensors`` (K = 0) needs no state file: the optimizer starts fresh.
The child's folder holds ``init.safetensors`` (the state it started from, epoch K), its own
``epoch_XXX`` and ``final``, and the parent's first K lines of ``metrics.jsonl``/``train.log``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from pathlib import Path

import torch

from ckptscope.checkpoints import load_checkpoint
from ckptscope.errors import CkptscopeError
from ckptscope.files import write_text
from ckptscope.train.recipe import Recipe

STATE_SUFFIX = ".state.pt"
_EPOCH = re.compile(r"epoch_(\d+)\.safetensors")


def state_path(checkpoint: str | os.PathLike) -> Path:
    """The spawn state beside an epoch checkpoint: ``epoch_XXX.state.pt``."""
    path = Path(checkpoint)
    return path.with_name(path.name.removesuffix(".safetensors") + STATE_SUFFIX)


def is_save_epoch(epoch: int, save_every: int | Collection[int]) -> bool:
    """Whether a run writes ``epoch_XXX`` at ``epoch``: every ``save_every`` epochs (an int;
    0: never), or at the listed epochs."""
    if isinstance(save_every, int):
        return bool(save_every) and epoch % save_every == 0
    return epoch in save_every


def save_spawn_state(path: Path, optimizer: torch.optim.Optimizer, order: torch.Generator,
                     augment: torch.Generator, dev: torch.device, *, epoch: int, seed: int,
                     config: str, notes: dict, channels_last: bool) -> None:
    """Write what a child needs besides the weights, as plain tensors, numbers and strings."""
    from ckptscope.train.run import _atomic_torch_save

    state = {
        "epoch": epoch, "seed": seed, "recipe": config, "notes": json.dumps(notes),
        "channels_last": channels_last, "optimizer": optimizer.state_dict(),
        "rng_order": order.get_state(), "rng_augment": augment.get_state(),
        "rng_global": torch.get_rng_state(),
    }
    if dev.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(dev)
    _atomic_torch_save(state, path)


def spawn_state(source: str | os.PathLike, recipe: Recipe, *, seed: int,
                out: str | os.PathLike) -> dict:
    """Return the state a child of ``seed`` starts from, in the layout of ``resume.pt``.

    Also writes the parent's metrics and log lines up to epoch K into ``out``.

    Args:
        source: the parent's ``init.safetensors`` or ``epoch_XXX.safetensors``.
        recipe: the child's recipe: the parent's (any change is refused).
        seed: the child's seed; the parent's own continues the parent's streams.
        out: the child's run directory.

    Raises:
        CkptscopeError: the file is a final or unknown checkpoint, its state file is missing,
            the recipe differs from the parent's, or K is not before the recipe's last epoch.
    """
    from ckptscope.train.run import LOG, METRICS, recipe_changes, stream_seed

    source = Path(source)
    match = _EPOCH.fullmatch(source.name)
    if source.name != "init.safetensors" and not match:
        raise CkptscopeError(
            f"--spawn-from {str(source)!r} is not a run's init.safetensors or "
            f"epoch_XXX.safetensors; spawn from the state a child should start at.")
    ckpt = load_checkpoint(source)
    parent = ckpt.metadata
    epoch = int(match.group(1)) if match else 0
    changes = recipe_changes(parent.get("config"), recipe) if "config" in parent else []
    if changes:
        raise CkptscopeError(
            f"{source} was trained with another recipe ({'; '.join(changes[:4])}); a child "
            f"differs from its parent only in its seed: use the parent's --recipe and --set.")
    if epoch >= recipe.epochs:
        raise CkptscopeError(f"{source} is at epoch {epoch}, not before the recipe's last "
                             f"({recipe.epochs}); spawn from an earlier epoch.")
    notes = json.loads(parent.get("init", "{}") or "{}")
    state: dict = {"epoch": epoch, "model": ckpt.state, "optimizer": None}
    parent_seed = parent.get("seed")
    if epoch:
        saved = _load_state(state_path(source), epoch)
        state |= {"optimizer": saved["optimizer"], "channels_last": saved["channels_last"]}
        notes = json.loads(saved.get("notes", "{}"))
        parent_seed = str(saved["seed"])
        if saved.get("recipe") is not None and recipe_changes(saved["recipe"], recipe):
            raise CkptscopeError(f"{state_path(source)} was written by a run of another "
                                 f"recipe; spawn with the parent's --recipe and --set.")
    elif "channels_last" in parent:
        state["channels_last"] = parent["channels_last"] == "true"
    if epoch and parent_seed == str(seed):  # the parent's own streams: its exact continuation
        state |= {k: saved[k] for k in ("rng_order", "rng_augment", "rng_global", "rng_cuda")
                  if k in saved}
    else:
        state |= {
            "rng_order": torch.Generator().manual_seed(stream_seed(seed, "order")).get_state(),
            "rng_augment": torch.Generator().manual_seed(
                stream_seed(seed, "augment")).get_state(),
            "rng_global": torch.get_rng_state(),  # as this seed's init left it
        }
    notes |= {"spawned_from": str(source), "spawn_epoch": epoch,
              "spawn_sha256": ckpt.sha256, "parent_seed": parent_seed}
    state["notes"] = json.dumps(notes)
    _copy_lines(source.parent, Path(out), epoch, METRICS, LOG)
    return state


def _load_state(path: Path, epoch: int) -> dict:
    if not path.is_file():
        raise CkptscopeError(
            f"{path} is missing: the optimizer state and random streams of epoch {epoch}. "
            f"Train the parent again with --save-every (this version writes it beside each "
            f"epoch_XXX.safetensors).")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: its first line says why
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CkptscopeError(f"{path} is not a readable spawn state ({reason}); train the "
                             f"parent again with --save-every.") from None
    if not isinstance(saved, dict) or saved.get("epoch") != epoch or "optimizer" not in saved:
        raise CkptscopeError(f"{path} does not hold the spawn state of epoch {epoch}; train "
                             f"the parent again with --save-every.")
    return saved


def _copy_lines(parent: Path, child: Path, epoch: int, metrics: str, log: str) -> None:
    """The parent's records of epochs 1..K, so the child's history is whole."""
    from ckptscope.train.run import read_metrics

    records = [r for r in read_metrics(parent / metrics) if r.get("epoch", 0) <= epoch]
    child.mkdir(parents=True, exist_ok=True)
    write_text(child / metrics, "".join(json.dumps(r) + "\n" for r in records))
    lines = []
    if (parent / log).is_file():
        lines = [line for line in (parent / log).read_text().split("\n")
                 if line.startswith("epoch ") and int(line.split()[1].split("/")[0]) <= epoch]
    write_text(child / log, "".join(line + "\n" for line in lines))
