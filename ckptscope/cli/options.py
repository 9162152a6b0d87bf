"""Command-line values turned into library arguments: suffixes, KEY=VALUE pairs, tolerances,
groups and presets."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ckptscope.errors import CkptscopeError

strip_prefix_option = click.option(
    "--strip-prefix", "strip_prefixes", multiple=True, metavar="PREFIX",
    help="Strip PREFIX (e.g. model.) from the keys of each checkpoint whose keys all start "
         "with it; repeatable. DDP's module., torch.compile's _orig_mod. and Lightning's "
         "model. are found without it.")



def stacked(*decorators):
    """One decorator applying ``decorators`` as if written in this order above a command (the
    first is the first option in ``--help``)."""

    def apply(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


# The options every evaluating command (path, trajectory, plane, surface) shares.
group_options = stacked(
    click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX",
                 help="A group of tensors (re.match on the key); repeatable."),
    click.option("--preset", "presets", multiple=True, metavar="NAME",
                 help="An adapter's group preset (blocks, layers, bn-stats, ...; see "
                      "`ckptscope list`); repeatable."),
)
model_options = stacked(
    click.option("--adapter", default=None, metavar="NAME|pkg.module:attr",
                 help="The architecture (default: from the checkpoint's metadata)."),
    click.option("--adapter-opt", "adapter_opts", multiple=True, metavar="KEY=VALUE",
                 help="An adapter option, e.g. widths=[2,50,50,1]; repeatable."),
    click.option("--data", default=None, metavar="NAME[:ARG]|pkg.module:attr",
                 help="The evaluation data (default: from the metadata or the adapter)."),
)


def check_suffix(path: str | None, suffixes: tuple[str, ...], option: str) -> None:
    """Refuse an output file whose suffix is not one of ``suffixes`` (``None`` passes)."""
    if path is not None and Path(path).suffix.lower() not in suffixes:
        raise CkptscopeError(f"{option} {path!r} should end in {' or '.join(suffixes)}.")


def key_values(pairs: tuple[str, ...], what: str) -> dict | None:
    """``key=value`` pairs; values are JSON where they parse (``widths=[2,50,1]``), else text."""
    if not pairs:
        return None
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CkptscopeError(f"{what} {pair!r} is not KEY=VALUE.")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def parse_tolerances(pairs: tuple[str, ...]) -> dict:
    """``--tolerance`` pairs as shape tolerances: rtol, atol or plateau_alpha, each a number."""
    options = key_values(pairs, "--tolerance") or {}
    known = ("rtol", "atol", "plateau_alpha")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise CkptscopeError(f"--tolerance {unknown[0]!r} is not one of {known}.")
    for key, value in options.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CkptscopeError(f"--tolerance {key}={value!r} is not a number.")
    return options


def group_specs(adapter_spec: str | None, presets: tuple[str, ...], groups: tuple[str, ...],
                ckpt) -> dict[str, str]:
    """Group specs from ``--preset`` (through the adapter) and ``--group``, in that order."""
    from ckptscope.groups import normalise_groups
    from ckptscope.inputs import preset_adapter

    out: dict[str, str] = {}
    keys = list(ckpt.state)
    if presets:
        adapter = preset_adapter(adapter_spec, ckpt)
        for name in presets:
            if name not in adapter.presets:
                raise CkptscopeError(
                    f"adapter {adapter.name!r} has no preset {name!r}; known: "
                    f"{', '.join(sorted(adapter.presets)) or 'none'}."
                )
            out.update(adapter.presets[name](keys))
    out.update(normalise_groups(list(groups)))
    return out
