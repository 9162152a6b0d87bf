"""Match a checkpoint pair's keys to each other and to the model.

Files that other tools wrote name the same tensors differently from the model that reads them:

- **prefixes**: a wrapper's prefix on every key (``module.`` from DDP, ``_orig_mod.`` from
  ``torch.compile``, ``model.`` from Lightning) is stripped on reading
  (:mod:`ckptscope.wrappers`) and put back when the model's own keys have it; any other prefix
  every key of a file shares is stripped when the other checkpoint's or the model's keys lack
  it and more keys match without it; ``strip_prefix`` (``--strip-prefix``) names one outright.
- **tied weights**: a file may store a tensor the model ties under two names once
  (``save_pretrained`` leaves ``lm_head.weight`` out, tied to ``transformer.wte.weight``). The
  missing name then follows its tie: the checkpoint holds the same tensor object under both
  names, so the engine moves it once and distances count it once (:mod:`ckptscope.identity`).
- **BatchNorm counters**: a ``num_batches_tracked`` one file lacks (older torch, some
  exporters) is taken from the other file, or is zero when the model has it and neither file
  does. Counters never interpolate and no evaluation reads them.

Each change is a note on the checkpoint it was made to (:attr:`Checkpoint.notes`). Matching an
already matched pair changes nothing and adds no note.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from ckptscope.checkpoints import Checkpoint, check_pair
from ckptscope.errors import CkptscopeError
from ckptscope.identity import state_aliases
from ckptscope.wrappers import (
    LIGHTNING_PREFIX,
    WRAPPER_PREFIXES,
    add_prefix,
    common_prefix,
    every_key_has,
    shown_names,
    strip_prefix,
)

COUNTER = "num_batches_tracked"
Tensors = Mapping[str, torch.Tensor]


def unwrap_module(module: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel (``.module``) and
    ``torch.compile``'s wrapper (``._orig_mod``), however nested; others as they are."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(module, (DataParallel, DistributedDataParallel)):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state-dict entries as its own tensor objects: a tied tensor is one object
    under each of its names (``state_dict(keep_vars=True)``; meta-device modules too)."""
    return dict(module.state_dict(keep_vars=True))


def ties(tensors: Tensors) -> list[list[str]]:
    """The names of each tensor held under more than one name, in the model's order."""
    names: dict[int, list[str]] = {}
    for key, value in tensors.items():
        names.setdefault(id(value), []).append(key)
    return [group for group in names.values() if len(group) > 1]


def is_counter(key: str) -> bool:
    return key == COUNTER or key.endswith("." + COUNTER)


def _label(ckpt: Checkpoint, default: str) -> str:
    return ckpt.path or default


def file_notes(ckpt: Checkpoint, default: str) -> list[str]:
    """``ckpt``'s notes, each naming its file (``"b.ckpt: stripped prefix 'model.' from 120
    keys"``); an in-memory state is called ``default``."""
    return [f"{_label(ckpt, default)}: {note}" for note in ckpt.notes]


def _noted(ckpt: Checkpoint, state: dict, notes: Iterable[str], **changes) -> Checkpoint:
    notes = tuple(notes)
    if not notes and state is ckpt.state and not changes:
        return ckpt
    return replace(ckpt, state=state, notes=ckpt.notes + notes, **changes)


# --- prefixes --------------------------------------------------------------------------------
def _as_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not prefix.strip("."):
        raise CkptscopeError(
            f"strip prefix {prefix!r} (--strip-prefix, strip_prefix=) is empty; give the text "
            f"every key starts with, e.g. 'model.'."
        )
    return prefix if prefix.endswith(".") else prefix + "."


def prefixes_given(strip: str | Sequence[str] | None) -> tuple[str, ...]:
    """``strip_prefix`` as a tuple of prefixes, each ending in a dot (``"model"`` ->
    ``"model."``)."""
    if strip is None:
        return ()
    return tuple(_as_prefix(p) for p in ([strip] if isinstance(strip, str) else strip))


def strip_given(ckpts: Sequence[Checkpoint], strip: str | Sequence[str] | None,
                labels: Sequence[str]) -> list[Checkpoint]:
    """Strip each prefix asked for from every checkpoint whose keys all have it.

    Raises:
        CkptscopeError: a prefix that no checkpoint's keys all have (nor had on reading).
    """
    out = list(ckpts)
    for prefix in prefixes_given(strip):
        hits = 0
        for i, ckpt in enumerate(out):
            if prefix in ckpt.stripped:
                hits += 1
            elif every_key_has(ckpt.state, prefix):
                hits += 1
                state = strip_prefix(ckpt.state, prefix)
                out[i] = _noted(ckpt, state, [f"stripped prefix {prefix!r} from {len(state)} keys "
                                              f"(as asked)"], stripped=ckpt.stripped + (prefix,))
        if not hits:
            starts = sorted({k.split(".", 1)[0] + "." for c in out for k in c.state})
            raise CkptscopeError(
                f"strip prefix {prefix!r} (--strip-prefix, strip_prefix=) is not on every key "
                f"of {' or '.join(repr(x) for x in labels)} (their keys start with "
                f"{shown_names(starts, 5)}); give the prefix every key of a file shares, or "
                f"leave it out: ckptscope strips "
                f"{', '.join(repr(p) for p in WRAPPER_PREFIXES)} and Lightning's "
                f"{LIGHTNING_PREFIX!r} itself."
            )
    return out


def _overlap(keys: Iterable[str], reference: set[str]) -> int:
    return sum(k in reference for k in keys)


def match_prefix(ckpt: Checkpoint, reference: Iterable[str], *, what: str) -> Checkpoint:
    """Make ``ckpt``'s keys carry the prefixes ``reference``'s keys carry.

    A prefix stripped on reading comes back when more keys then match (the model's own keys
    have it); a prefix every key shares is stripped when ``reference``'s keys do not all have
    it and more keys match without it.

    Args:
        ckpt: the checkpoint.
        reference: the keys to match (the model's, or the other checkpoint's).
        what: how to call ``reference`` in notes ("the model", "the other checkpoint").
    """
    reference = set(reference)
    state, notes, stripped = ckpt.state, [], ckpt.stripped
    best = _overlap(state, reference)
    for i in range(len(stripped) - 1, -1, -1):  # put back the innermost first
        again = state
        for prefix in reversed(stripped[i:]):
            again = add_prefix(again, prefix)
        if _overlap(again, reference) > best:
            kept = stripped[i:]
            state, best, stripped = again, _overlap(again, reference), stripped[:i]
            notes.append(f"kept prefix {''.join(kept)!r}: {what}'s keys have it")
            break
    while (prefix := common_prefix(state)) and not every_key_has(reference, prefix):
        shorter = strip_prefix(state, prefix)
        if _overlap(shorter, reference) <= best:
            break
        state, best, stripped = shorter, _overlap(shorter, reference), stripped + (prefix,)
        notes.append(f"stripped prefix {prefix!r} from {len(state)} keys ({what}'s keys lack it)")
    return _noted(ckpt, state, notes, stripped=stripped) if notes else ckpt


# --- tied weights ----------------------------------------------------------------------------
def _tie_note(filled: list[tuple[str, str]], where: str) -> str:
    if len(filled) == 1:
        alias, source = filled[0]
        return f"{alias} follows its tie to {source} (stored once{where})"
    shown = ", ".join(f"{a} -> {s}" for a, s in filled[:3]) + (", ..." if len(filled) > 3 else "")
    return f"{len(filled)} tied names follow their ties (stored once{where}): {shown}"


def follow_model_ties(ckpt: Checkpoint, tensors: Tensors, label: str) -> Checkpoint:
    """Give every name of a tensor the model ties the tensor ``ckpt`` holds under another.

    Raises:
        CkptscopeError: ``ckpt`` holds different values under two names the model ties.
    """
    state, filled = ckpt.state, []
    for names in ties(tensors):
        held = [k for k in names if k in state]
        if not held:
            continue
        first = state[held[0]]
        for other in held[1:]:
            value = state[other]
            if value is not first and (value.shape != first.shape
                                       or not torch.equal(value, first)):
                raise CkptscopeError(
                    f"{other} is tied to {held[0]} in the model, but {label} holds different "
                    f"values under the two names, so it was not saved from this model; pick the "
                    f"adapter and options the checkpoint was saved from (one that does not tie "
                    f"them)."
                )
        missing = [k for k in names if k not in state]
        if missing:
            state = dict(state) if state is ckpt.state else state
            for alias in missing:
                state[alias] = first
                filled.append((alias, held[0]))
    return _noted(ckpt, state, [_tie_note(filled, "")] if filled else [])


def follow_pair_ties(ckpt: Checkpoint, other: Checkpoint) -> Checkpoint:
    """Give ``ckpt`` the names it lacks that ``other`` holds as one tensor (one storage) with a
    name ``ckpt`` has."""
    missing = [k for k in other.state if k not in ckpt.state]
    if not missing:
        return ckpt
    alias = state_aliases(other.state)
    names: dict[str, list[str]] = {}
    for key, first in alias.items():
        names.setdefault(first, []).append(key)
    state, filled = ckpt.state, []
    for key in missing:
        held = [k for k in names[alias[key]] if k in ckpt.state]
        if held and ckpt.state[held[0]].shape == other.state[key].shape:
            state = dict(state) if state is ckpt.state else state
            state[key] = ckpt.state[held[0]]
            filled.append((key, held[0]))
    note = _tie_note(filled, " here, tied in the other checkpoint") if filled else None
    return _noted(ckpt, state, [note] if note else [])


def hidden_aliases(module: nn.Module) -> dict[str, str]:
    """The names the module holds a tensor under that its state dict leaves out -> the name it
    keeps (the Hugging Face adapter's models drop tied aliases as ``save_pretrained`` does:
    ``lm_head.weight`` -> ``transformer.wte.weight``); empty for a plain module."""
    tensors = model_tensors(module)
    kept: dict[int, str] = {}
    for key, tensor in tensors.items():
        kept.setdefault(id(tensor), key)
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    return {name: kept[id(t)] for name, t in named if name not in tensors and id(t) in kept}


def drop_hidden_aliases(state: Tensors, hidden: Mapping[str, str], label: str
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` without the tied names the model's state dict leaves out (a ``torch.save``'d
    state dict, or an older ``save_pretrained``'s ``pytorch_model.bin``, holds both names), and
    the names dropped that held a copy (not one storage) of the kept tensor.

    Raises:
        CkptscopeError: ``state`` holds different values under the two names.
    """
    extra = [k for k in state if k in hidden and hidden[k] in state]
    if not extra:
        return dict(state), []
    out, copies = dict(state), []
    for alias in extra:
        value, first = out.pop(alias), state[hidden[alias]]
        if value is first or (value.shape == first.shape and value.stride() == first.stride()
                              and value.data_ptr() == first.data_ptr()):
            continue  # one storage under two names: nothing to say
        if value.shape != first.shape or not torch.equal(value, first):
            raise CkptscopeError(
                f"{alias} is tied to {hidden[alias]} in the model, but {label} holds different "
                f"values under the two names, so it was not saved from this model; pick the "
                f"adapter and options the checkpoint was saved from (one that does not tie "
                f"them)."
            )
        copies.append(alias)
    return out, copies


def leave_out_hidden_aliases(ckpt: Checkpoint, hidden: Mapping[str, str], label: str
                             ) -> Checkpoint:
    """:func:`drop_hidden_aliases` on a checkpoint, with a note for the copies dropped."""
    state, copies = drop_hidden_aliases(ckpt.state, hidden, label)
    if len(state) == len(ckpt.state):
        return ckpt
    notes = [f"left out {', '.join(copies)}: equal to the tensor{'s' if len(copies) > 1 else ''} "
             f"the model ties {'them' if len(copies) > 1 else 'it'} to, which it stores once"
             ] if copies else []
    return replace(ckpt, state=state, notes=ckpt.notes + tuple(notes))


def tie_hint(tensors: Tensors, missing: Iterable[str]) -> str:
    """A sentence naming the model's ties among ``missing`` keys ("" when none)."""
    missing = set(missing)
    found = [names for names in ties(tensors) if missing & set(names)]
    if not found:
        return ""
    said = "; ".join(f"{names[-1]} is tied to {', '.join(names[:-1])} in the model"
                     for names in found[:3])
    return f" {said}: a checkpoint must hold at least one name of each tie."


# --- BatchNorm counters ----------------------------------------------------------------------
def fill_counters(ckpts: Sequence[Checkpoint], tensors: Tensors | None,
                  labels: Sequence[str]) -> list[Checkpoint]:
    """Give each checkpoint the ``num_batches_tracked`` counters it lacks: the model's (when
    given) or the other checkpoint's, from a checkpoint that holds them, else zero."""
    if tensors is not None:
        wanted = [k for k in tensors if is_counter(k)]
    else:
        wanted = list(dict.fromkeys(k for c in ckpts for k in c.state if is_counter(k)))
    out = []
    for ckpt in ckpts:
        missing = [k for k in wanted if k not in ckpt.state]
        if not missing:
            out.append(ckpt)
            continue
        state, sources = dict(ckpt.state), set()
        for key in missing:
            donor = next((j for j, c in enumerate(ckpts) if key in c.state), None)
            if donor is not None:
                state[key] = ckpts[donor].state[key].clone()
                sources.add(labels[donor])
            else:
                like = tensors[key]
                state[key] = torch.zeros(like.shape, dtype=like.dtype)
        if sources:
            note = (f"filled {len(missing)} missing {COUNTER} counter(s) from "
                    f"{', '.join(sorted(sources))} (BatchNorm counters never move)")
        else:
            note = (f"set {len(missing)} missing {COUNTER} counter(s) to 0: the model has them "
                    f"and no checkpoint does (BatchNorm counters never move)")
        out.append(_noted(ckpt, state, [note]))
    return out


# --- a pair --------------------------------------------------------------------------------
def match_keys(a: Checkpoint, b: Checkpoint | None = None, *, module: nn.Module | None = None,
               strip_prefix: str | Sequence[str] | None = None
               ) -> tuple[Checkpoint, Checkpoint | None]:
    """Match ``a``'s (and ``b``'s) keys to the model, or to each other without one.

    The prefixes asked for are stripped first; then prefixes, tied names and BatchNorm counters
    are matched (see the module docstring). Key checks are the caller's
    (:func:`ckptscope.checkpoints.check_pair`, :func:`check_model_keys`).

    Args:
        a, b: the checkpoints (``b`` may be ``None``: one checkpoint against the model).
        module: the model, whose keys and ties decide; ``None``: each checkpoint is matched to
            the other.
        strip_prefix: prefixes to strip from every checkpoint whose keys all have them.

    Returns:
        The two checkpoints, with a note on each for what was changed in it.
    """
    ckpts = [a] if b is None else [a, b]
    labels = [_label(c, d) for c, d in zip(ckpts, ("start", "end"), strict=False)]
    ckpts = strip_given(ckpts, strip_prefix, labels)
    tensors = model_tensors(unwrap_module(module)) if module is not None else None
    if tensors is not None:
        ckpts = [match_prefix(c, tensors, what="the model") for c in ckpts]
        ckpts = [follow_model_ties(c, tensors, label) for c, label in zip(ckpts, labels,
                                                                            strict=True)]
        hidden = hidden_aliases(unwrap_module(module))
        if hidden:
            ckpts = [leave_out_hidden_aliases(c, hidden, label)
                     for c, label in zip(ckpts, labels, strict=True)]
    elif len(ckpts) == 2:
        first, second = ckpts
        ckpts = [match_prefix(first, second.state, what="the other checkpoint"),
                 match_prefix(second, first.state, what="the other checkpoint")]
        ckpts = [follow_pair_ties(ckpts[0], ckpts[1]), follow_pair_ties(ckpts[1], ckpts[0])]
    ckpts = fill_counters(ckpts, tensors, labels)
    return ckpts[0], (ckpts[1] if len(ckpts) == 2 else None)


def complete(state: Tensors, tensors: Tensors) -> dict[str, torch.Tensor]:
    """``state`` with the model's tied names and counters it lacks filled in, without notes
    (what :func:`match_keys` would fill): for checks made before a pair is matched."""
    ckpt = follow_model_ties(Checkpoint(dict(state)), tensors, "the checkpoint")
    return dict(fill_counters([ckpt], tensors, ["the checkpoint"])[0].state)


def check_model_keys(tensors: Tensors, state: Tensors, *, names: tuple[str, str],
                     fix: str) -> None:
    """:func:`ckptscope.checkpoints.check_pair` of the model's entries against a checkpoint,
    its error naming the model's ties among the missing keys."""
    try:
        check_pair(tensors, state, names=names, fix=fix)
    except CkptscopeError as err:
        hint = tie_hint(tensors, set(tensors) - set(state))
        if not hint:
            raise
        raise CkptscopeError(f"{err}{hint}") from None
