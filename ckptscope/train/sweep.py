"""``sweep``: train one recipe for several seeds, then evaluate every run's linear path into one
result with a ``run`` dim (``DIR/seed_S/`` per run, ``DIR/result.nc``).

Finished runs (``final.safetensors`` present) are skipped and unfinished ones resumed, so an
interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import xarray as xr

from ckptscope.errors import CkptscopeError
from ckptscope.train.recipe import Recipe
from ckptscope.train.run import RunOutput, data_spec, run

RESULT = "result.nc"


@dataclass(frozen=True)
class SweepOutput:
    """The runs of a sweep and the result over them."""

    runs: dict[int, RunOutput]
    result: xr.Dataset
    result_path: Path


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"0-9"``, ``"0,3,5"``, ``"0-2,7"``, a count ``3`` (seeds 0..2) or a list of seeds."""
    if isinstance(text, int):
        return list(range(text))
    if not isinstance(text, str):
        return [int(s) for s in text]
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, dash, hi = part.strip().partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    except ValueError:
        raise CkptscopeError(
            f"seeds {text!r} are not a list like 0-9 or 0,3,5 (non-negative integers)."
        ) from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise CkptscopeError(f"seeds {text!r} must be distinct non-negative integers, e.g. 0-9.")
    return seeds


def run_dir(out: str | os.PathLike, seed: int) -> Path:
    """Where a sweep keeps the run of ``seed``."""
    return Path(out) / f"seed_{seed}"


def group_specs(recipe: Recipe, presets: Sequence[str], groups: Mapping[str, str] | Sequence[str],
                keys: Sequence[str]) -> dict[str, str]:
    """Groups from the recipe's adapter presets, then explicit ``[name=]regex`` groups."""
    from ckptscope.adapters import get_adapter
    from ckptscope.groups import normalise_groups

    adapter = get_adapter(recipe.adapter)
    out: dict[str, str] = {}
    for name in presets:
        if name not in adapter.presets:
            raise CkptscopeError(f"adapter {adapter.name!r} has no preset {name!r}; known: "
                                 f"{', '.join(sorted(adapter.presets)) or 'none'}.")
        out.update(adapter.presets[name](list(keys)))
    out.update(normalise_groups(groups if groups else None))
    return out


def sweep(recipe: Recipe, *, seeds: Sequence[int], out: str | os.PathLike,
          data_dir: str | os.PathLike | None = None, device: str | None = "cpu",
          presets: Sequence[str] = (), groups: Sequence[str] | Mapping[str, str] = (),
          alphas: int | Sequence[float] = 51, split: str = "test",
          train_options: Mapping[str, object] | None = None,
          on_run: Callable[[int, RunOutput], None] | None = None,
          on_epoch: Callable[[int, dict], None] | None = None,
          progress: Callable[[str, int, int], None] | None = None) -> SweepOutput:
    """Train ``recipe`` for each seed into ``out/seed_S`` and evaluate the theta_i -> theta_f
    paths into ``out/result.nc`` (runs labelled ``seed_S``).

    Args:
        recipe: what to train.
        seeds: the seeds (:func:`parse_seeds`).
        out: the sweep folder.
        data_dir, device: as for :func:`ckptscope.train.run`; the paths are evaluated on
            ``device`` too.
        presets, groups: the groups to evaluate besides the whole model.
        alphas, split: the alpha grid and split of the evaluation.
        train_options: more :func:`ckptscope.train.run` keywords (amp, save_every, ...).
        on_run, on_epoch, progress: callbacks for finished runs, epochs and the evaluation.
    """
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths
    from ckptscope.results import save_result

    if not seeds:
        raise CkptscopeError("no seeds given; pass e.g. --seeds 0-9.")
    runs: dict[int, RunOutput] = {}
    for seed in seeds:
        result = run(recipe, seed=seed, out=run_dir(out, seed), data_dir=data_dir,
                     device=device, resume=True, **dict(train_options or {}),
                     on_epoch=(lambda record, seed=seed: on_epoch(seed, record))
                     if on_epoch else None)
        runs[seed] = result
        if on_run:
            on_run(seed, result)
    keys = list(load_checkpoint(runs[seeds[0]].init).state)
    specs = group_specs(recipe, presets, groups, keys)
    pairs = {f"seed_{s}": (str(r.init), str(r.final)) for s, r in runs.items()}
    # The recipe's adapter and data, not the checkpoints' metadata: the metadata may name only
    # built-in ones, and the recipe may name the user's own (pkg.module:attr).
    ds = linear_paths(pairs, recipe.adapter, data_spec(recipe, data_dir), groups=specs,
                      adapter_options=dict(recipe.adapter_options), alphas=alphas, split=split,
                      device=device, config=EvalConfig(seed=recipe.data_seed),
                      progress=progress)
    ds.attrs["recipe"] = recipe.name
    path = save_result(ds, Path(out) / RESULT)
    return SweepOutput(runs, ds, path)
