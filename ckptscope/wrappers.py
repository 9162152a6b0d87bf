"""What training wrappers leave in a saved state dict: key prefixes and trainer keys.

A model trained under ``DistributedDataParallel`` / ``DataParallel`` saves its keys under
``module.``, one compiled with ``torch.compile`` under ``_orig_mod.``, and a LightningModule
under the attribute that holds the network (``model.`` by convention), inside a checkpoint
that also holds the trainer's state (``epoch``, ``global_step``, ``optimizer_states``, ...).
These functions work on plain key lists and mappings read from a file; which prefix a pair
finally keeps is :mod:`ckptscope.keys`' decision, made against the other checkpoint and the
model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Prefixes of wrappers that never name a network's own tensors: stripped on reading whenever
# every key has them (put back by ckptscope.keys when the model's own keys do have them).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Lightning's conventional attribute for the network: stripped from a Lightning checkpoint only.
LIGHTNING_PREFIX = "model."
# Top-level keys only Lightning's Trainer writes beside "state_dict".
LIGHTNING_MARKERS = ("pytorch-lightning_version", "global_step", "optimizer_states", "loops")
VERSION_KEY = "pytorch-lightning_version"
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+-]{0,23}")  # shown only when it looks like one
_SHOWN = 3  # names listed in a note before "..."


def is_lightning(obj: Mapping) -> bool:
    """True for a checkpoint written by Lightning's Trainer (a ``state_dict`` and its markers)."""
    return isinstance(obj.get("state_dict"), Mapping) and any(k in obj for k in LIGHTNING_MARKERS)


def shown_names(names: Iterable[object], limit: int = _SHOWN) -> str:
    """Names for a note, sorted, escaped (they come from a file) and cut after ``limit``."""
    names = sorted(str(n) for n in names)
    text = ", ".join(ascii(n)[1:-1][:60] for n in names[:limit])
    return text + (", ..." if len(names) > limit else "")


def trainer_note(obj: Mapping, wrapper: str) -> str:
    """One note on what a wrapped checkpoint holds besides the state dict under ``wrapper``.

    Example: ``"Lightning 2.4.0 checkpoint (epoch 3, global_step 1200): optimizer states and 3
    other trainer keys (callbacks, hyper_parameters, lr_schedulers) ignored"``. A note never
    holds ``"; "``: a result's ``notes`` attribute joins its notes with it.
    """
    others = [k for k in obj if k != wrapper]
    if not is_lightning(obj):
        if not others:
            return f"read the state dict under {wrapper!r}"
        return (f"read the state dict under {wrapper!r}, {len(others)} other key(s) ignored "
                f"({shown_names(others)})")
    where = [f"{name} {obj[name]}" for name in ("epoch", "global_step")
             if isinstance(obj.get(name), int) and not isinstance(obj.get(name), bool)]
    shown = ("epoch", "global_step", "optimizer_states", VERSION_KEY)
    ignored = [k for k in others if k not in shown]
    parts = ["optimizer states"] if "optimizer_states" in obj else []
    if ignored:
        parts.append(f"{len(ignored)} other trainer key(s) ({shown_names(ignored)})")
    version = obj.get(VERSION_KEY)
    version = f" {version}" if isinstance(version, str) and _VERSION.fullmatch(version) else ""
    text = f"Lightning{version} checkpoint" + (f" ({', '.join(where)})" if where else "")
    return text + (f": {' and '.join(parts)} ignored" if parts else "")


def every_key_has(keys: Iterable[str], prefix: str) -> bool:
    """True when there are keys, each starts with ``prefix`` and names something after it."""
    keys = list(keys)
    return bool(keys) and all(k.startswith(prefix) and len(k) > len(prefix) for k in keys)


def common_prefix(keys: Iterable[str]) -> str | None:
    """The first dotted component every key shares, with its dot (``"net."``), or ``None``."""
    firsts = {k.split(".", 1)[0] + "." for k in keys if "." in k}
    if len(firsts) != 1:
        return None
    (first,) = firsts
    return first if every_key_has(keys, first) else None


def strip_prefix(state: Mapping[str, object], prefix: str) -> dict:
    """``state`` with ``prefix`` removed from every key (each must have it)."""
    return {k[len(prefix):]: v for k, v in state.items()}


def add_prefix(state: Mapping[str, object], prefix: str) -> dict:
    """``state`` with ``prefix`` put in front of every key."""
    return {prefix + k: v for k, v in state.items()}


def wrapper_prefixes(keys: Iterable[str], *, lightning: bool = False) -> list[str]:
    """The wrappers' prefixes every key has, outermost first (``["module.", "_orig_mod."]`` for
    a compiled model under DDP): those of :data:`WRAPPER_PREFIXES`, and Lightning's ``model.``
    (once, outermost) for a Lightning checkpoint."""
    keys = list(keys)
    found = []
    if lightning and every_key_has(keys, LIGHTNING_PREFIX):
        found.append(LIGHTNING_PREFIX)
        keys = [k[len(LIGHTNING_PREFIX):] for k in keys]
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if every_key_has(keys, p)), None)
        if prefix is None:
            return found
        found.append(prefix)
        keys = [k[len(prefix):] for k in keys]
