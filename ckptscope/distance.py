"""Distances in weight space (the paper's appendix E, eq. 4).

d(theta_b, theta_a) = ||theta_b - theta_a||_F / ||theta_a||_F over a group's parameters,
in float64, from the tensors as stored (a block of each upcast at a time). Buffers (BatchNorm
running statistics, ``num_batches_tracked``) are not parameters and are left out; tied tensors
(two keys, one storage) count once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ckptscope.identity import parameter_keys, state_aliases, unique, unique_keys

# Elements of one tensor upcast to float64 at a time: a big tensor (an embedding, a memory-
# mapped checkpoint's) costs three blocks of temporaries, not three float64 copies of itself.
MOMENT_BLOCK = 1 << 20  # 8 MiB per float64 block


def _moments(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], key: str):
    """(||b - a||², ||a||², ||b||², <a, b>) of one tensor, in float64, in one pass over it
    (a block of :data:`MOMENT_BLOCK` elements at a time; the tensors stay in their dtype)."""
    x_all, y_all = a[key].reshape(-1), b[key].reshape(-1)
    sums = [0.0, 0.0, 0.0, 0.0]
    for lo in range(0, max(1, x_all.numel()), MOMENT_BLOCK):
        x = x_all[lo : lo + MOMENT_BLOCK].double()
        y = y_all[lo : lo + MOMENT_BLOCK].double()
        d = y - x
        for i, value in enumerate((d @ d, x @ x, y @ y, x @ y)):
            sums[i] += float(value)
    return tuple(sums)


def _summed(moments: Iterable[tuple[float, float, float, float]]) -> tuple[float, ...]:
    return tuple(map(sum, zip(*moments, strict=True))) or (0.0, 0.0, 0.0, 0.0)


def _relative(d2: float, x2: float) -> float:
    if x2 == 0.0:
        return math.inf if d2 > 0 else math.nan
    return math.sqrt(d2) / math.sqrt(x2)


def _cosine(x2: float, y2: float, xy: float) -> float:
    if x2 == 0.0 or y2 == 0.0:
        return math.nan
    return xy / math.sqrt(x2 * y2)


def relative_distance(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> float:
    """Return ||b - a||_F / ||a||_F over ``keys`` (eq. 4); NaN for no keys or ||a|| = 0 = ||b - a||.

    Returns ``inf`` when ``a`` is zero over the keys but ``b`` is not.
    """
    d2, x2, _, _ = _summed(_moments(a, b, k) for k in keys)
    return _relative(d2, x2)


def l2_distance(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> float:
    """Return ||b - a||_F over ``keys``, in float64."""
    return math.sqrt(_summed(_moments(a, b, k) for k in keys)[0])


def cosine_similarity(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> float:
    """Return <a, b> / (||a|| ||b||) over ``keys`` flattened into one vector; NaN if either is 0."""
    _, x2, y2, xy = _summed(_moments(a, b, k) for k in keys)
    return _cosine(x2, y2, xy)


def distances(
    a,
    b,
    *,
    groups: Mapping[str, str] | None = None,
    adapter=None,
    module: nn.Module | None = None,
    full: bool = True,
):
    """Return a dataset of distances per group (the whole model ``all`` first unless not
    ``full``).

    Args:
        a, b: checkpoints, state dicts or paths (see :func:`ckptscope.checkpoints.as_checkpoint`).
        groups: name -> regex.
        adapter: an adapter (name) whose module decides which tensors are parameters; without
            one (or ``module``), names decide (BatchNorm running statistics are buffers).
        module: a module that decides which tensors are parameters.
        full: include the whole model as group ``all``.

    Returns:
        ``relative`` (eq. 4), ``l2`` and ``cosine`` over ``group``, with ``n_tensors`` and
        ``n_params``.
    """
    from ckptscope.checkpoints import as_checkpoint
    from ckptscope.results import build_distances

    a, b = as_checkpoint(a), as_checkpoint(b)
    table = distance_table(a, b, groups=groups, adapter=adapter, module=module, full=full)
    return build_distances(
        **table,
        attrs={
            "start_path": a.path,
            "end_path": b.path,
            "start_sha256": a.sha256,
            "end_sha256": b.sha256,
        },
    )


def distance_table(
    a,
    b,
    *,
    groups: Mapping[str, str] | None = None,
    adapter=None,
    module: nn.Module | None = None,
    full: bool = True,
) -> dict[str, list]:
    """What :func:`distances` returns, as plain lists per group (no dataset): ``groups``,
    ``patterns``, ``relative``, ``l2``, ``cosine``, ``n_tensors``, ``n_params``."""
    from ckptscope.checkpoints import as_checkpoint, check_pair
    from ckptscope.groups import normalise_groups, resolve_groups
    from ckptscope.keys import match_keys

    a, b = as_checkpoint(a), as_checkpoint(b)
    if module is None and adapter is not None:
        from ckptscope.inputs import choose_adapter

        adapter, options, _ = choose_adapter(adapter, a, b, None)  # the metadata's options too
        module = adapter.make(options)
    a, b = match_keys(a, b, module=module)  # tied names, counters (a no-op on a matched pair)
    check_pair(a.state, b.state, names=(a.path or "A", b.path or "B"))
    params = parameter_keys(a.state, module)
    resolved = resolve_groups(
        list(a.state), normalise_groups(groups), full=full, source=a.path or "A"
    )
    if module is None:  # a tied alias (one storage, two names) counts where a group holds it
        alias = state_aliases(a.state)
        params = {k for k in a.state if alias[k] in params}
        keys = [unique((k for k in g.keys if k in params), alias) for g in resolved]
    else:
        keys = [unique_keys(g.keys, params, module) for g in resolved]
    # One pass over each tensor, however many groups (and ``all``) hold it.
    every = dict.fromkeys(k for ks in keys for k in ks)
    moments = {k: _moments(a.state, b.state, k) for k in every}
    sums = [_summed(moments[k] for k in ks) for ks in keys]
    return {
        "groups": [g.name for g in resolved],
        "patterns": [g.pattern for g in resolved],
        "relative": [_relative(d2, x2) for d2, x2, _, _ in sums],
        "l2": [math.sqrt(d2) for d2, _, _, _ in sums],
        "cosine": [_cosine(x2, y2, xy) for _, x2, y2, xy in sums],
        "n_tensors": [len(g.keys) for g in resolved],
        "n_params": [sum(a.state[x].numel() for x in k) for k in keys],
    }
