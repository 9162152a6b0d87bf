"""Group presets built from a list of state-dict keys, shared by the adapters.

A preset is ``preset(keys) -> {group name: regex}``; each regex is applied with :func:`re.match`
(anchored at the start), so a regex that must stop at a module boundary ends in ``\\.`` and one
that must select exact keys ends in ``$``.

BatchNorm layers are found from the keys alone: a module prefix ``P`` is a BatchNorm when
``P.running_mean`` is a key; then ``P.weight`` and ``P.bias`` are its affine parameters and
``P.running_mean`` / ``P.running_var`` its running statistics. Integer buffers
(``num_batches_tracked``) belong to no BN group: they never move on a path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from ckptscope.errors import CkptscopeError

STATS = ("running_mean", "running_var")
AFFINE = ("weight", "bias")
COUNTER = "num_batches_tracked"
BN_STATS_PATTERN = r"(?:.+\.)?running_(?:mean|var)$"
Preset = Callable[[Sequence[str]], dict[str, str]]


def alternation(items: Sequence[str], suffix: str = "") -> str:
    """Return a regex matching exactly one of ``items`` (escaped), then ``suffix``.

    Example:
        >>> alternation(["bn1", "layer1.0.bn1"], r"\\.(?:weight|bias)$")
        '(?:bn1|layer1\\\\.0\\\\.bn1)\\\\.(?:weight|bias)$'
    """
    return "(?:" + "|".join(re.escape(i) for i in items) + ")" + suffix


def _split_key(key: str) -> tuple[str, str]:
    prefix, _, leaf = key.rpartition(".")
    return prefix, leaf


def bn_prefixes(keys: Sequence[str]) -> list[str]:
    """Return the module prefixes of BatchNorm layers (those with a ``running_mean``), in order."""
    return [p for p, leaf in map(_split_key, keys) if leaf == "running_mean"]


def _no_bn(keys: Sequence[str], what: str) -> CkptscopeError:
    return CkptscopeError(
        f"{what}: the state has no BatchNorm layer (no key ends in .running_mean; keys start "
        f"with {list(keys)[:5]}); pick a preset without BN, or the adapter's BN variant."
    )


def bn_stats(keys: Sequence[str]) -> dict[str, str]:
    """One group ``bn-stats``: every BatchNorm running mean and running variance."""
    if not bn_prefixes(keys):
        raise _no_bn(keys, "preset 'bn-stats'")
    return {"bn-stats": BN_STATS_PATTERN}


def bn_affine_keys(keys: Sequence[str]) -> list[str]:
    """Return the keys of BatchNorm weights and biases, in state-dict order."""
    prefixes = set(bn_prefixes(keys))
    return [k for k in keys if (s := _split_key(k))[0] in prefixes and s[1] in AFFINE]


def bn_affine(keys: Sequence[str]) -> dict[str, str]:
    """One group ``bn-affine``: every BatchNorm weight and bias (the learned scale and shift)."""
    affine = bn_affine_keys(keys)
    if not affine:
        raise _no_bn(keys, "preset 'bn-affine'")
    prefixes = list(dict.fromkeys(_split_key(k)[0] for k in affine))
    return {"bn-affine": alternation(prefixes, r"\.(?:weight|bias)$")}


def bn_split(keys: Sequence[str], block: str, *, pattern: str | None = None) -> dict[str, str]:
    """Split one block into its non-BN tensors, its BN affine parameters and its BN statistics.

    The groups of the paper's figure A18: ``<block>-conv`` (every tensor of the block outside its
    BatchNorm layers: conv weights, biases, a downsample conv), ``<block>-bn-affine`` (BN weight
    and bias) and ``<block>-bn-stats`` (BN running mean and variance). Together they hold every
    key of the block except ``num_batches_tracked``, which never moves.

    Args:
        keys: the state-dict keys.
        block: the block's name, used to name the groups (``layer3``).
        pattern: the regex selecting the block's keys; default ``re.escape(block) + r"\\."``.

    Raises:
        CkptscopeError: the block matches no key, or has no BatchNorm layer.
    """
    pattern = pattern if pattern is not None else re.escape(block) + r"\."
    regex = re.compile(pattern)
    inside = [k for k in keys if regex.match(k)]
    if not inside:
        raise CkptscopeError(
            f"bn-split: block {block!r} (regex {pattern!r}) matched no key; keys start with "
            f"{list(keys)[:5]}."
        )
    prefixes = set(bn_prefixes(inside))
    if not prefixes:
        raise _no_bn(inside, f"bn-split: block {block!r}")
    bn_modules = list(dict.fromkeys(p for p, _ in map(_split_key, inside) if p in prefixes))
    other = [k for k in inside if _split_key(k)[0] not in prefixes and _split_key(k)[1] != COUNTER]
    affine = bn_affine_keys(inside)
    groups = {}
    if other:
        groups[f"{block}-conv"] = alternation(other, "$")
    if affine:  # BatchNorm(affine=False) has statistics only
        affine_modules = list(dict.fromkeys(_split_key(k)[0] for k in affine))
        groups[f"{block}-bn-affine"] = alternation(affine_modules, r"\.(?:weight|bias)$")
    groups[f"{block}-bn-stats"] = alternation(bn_modules, r"\.running_(?:mean|var)$")
    return groups


def split_preset(block: str, pattern: str | None = None) -> Preset:
    """Return the preset ``keys -> bn_split(keys, block, pattern=pattern)``."""

    def preset(keys: Sequence[str]) -> dict[str, str]:
        return bn_split(keys, block, pattern=pattern)

    preset.__doc__ = f"The {block!r} block split into conv, BN affine and BN statistics."
    return preset
