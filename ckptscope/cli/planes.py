"""Commands that make grid results: ``plane`` (through three checkpoints) and ``surface``
(around one)."""

from __future__ import annotations

from pathlib import Path

import click

from ckptscope.cli.notes import NotePrinter
from ckptscope.cli.options import (
    check_suffix,
    group_options,
    group_specs,
    key_values,
    model_options,
    strip_prefix_option,
)
from ckptscope.cli.output import ProgressBar, save_figure, table
from ckptscope.errors import CkptscopeError


def _evaluation_options(command):
    """The options every grid command shares with ``path``: model, data, engine, output."""
    options = [
        group_options,
        click.option("--no-full", is_flag=True, help="Leave out the whole-model grid."),
        click.option("--grid", type=click.IntRange(min=2), default=21, show_default=True,
                     help="Points along each axis."),
        click.option("--x-range", default=None, metavar="LO:HI:N",
                     help="The x axis instead of the default range and --grid."),
        click.option("--y-range", default=None, metavar="LO:HI:N",
                     help="The y axis instead of the default range and --grid."),
        model_options,
        strip_prefix_option,
        click.option("--split", type=click.Choice(["test", "train", "both"]), default="test",
                     show_default=True),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu or cuda[:i]."),
        click.option("--dtype", type=click.Choice(["float32", "float64", "bf16", "fp16"]),
                     default="float32", show_default=True),
        click.option("--batch-size", type=click.IntRange(min=1), default=None),
        click.option("--strategy", type=click.Choice(["auto", "loop", "vmap"]), default="auto",
                     show_default=True, help="Evaluator strategy."),
        click.option("--bn", type=click.Choice(["interpolate", "recompute", "batch"]),
                     default="interpolate", show_default=True,
                     help="BatchNorm running stats (as for `ckptscope path`)."),
        click.option("--bn-batches", type=click.IntRange(min=1), default=20, show_default=True),
        click.option("--data-size", type=click.IntRange(min=1), default=None, metavar="N",
                     help="Evaluate on N examples of each split (a seeded subset)."),
        click.option("--data-seed", type=int, default=None,
                     help="Seed of generated data and subsets (default: the checkpoint's)."),
        click.option("--log/--no-log", "log", default=None,
                     help="Log-scaled loss colours (default: on when the loss is positive)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help="Write the result (.nc)."),
        click.option("--plot", type=click.Path(dir_okay=False), default=None,
                     help="Write a figure (.png, .pdf, .svg) of one group and split."),
        click.option("--plot-group", default=None, metavar="NAME",
                     help="The group the figure shows (default: the first, `all`)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _axis(text: str | None, name: str):
    from ckptscope.points import parse_axis_range

    return None if text is None else parse_axis_range(text, name=name)


def _common(o: dict, first) -> dict:
    """The library keywords that ``plane`` and ``surface`` share, from the parsed options."""
    from ckptscope.engine import EvalConfig

    return {
        "groups": group_specs(o["adapter"], o["presets"], o["groups"], first),
        "full": not o["no_full"],
        "grid": o["grid"],
        "x_range": _axis(o["x_range"], "x"),
        "y_range": _axis(o["y_range"], "y"),
        "split": o["split"],
        "device": o["device"],
        "dtype": o["dtype"],
        "bn": o["bn"],
        "adapter_options": key_values(o["adapter_opts"], "--adapter-opt"),
        "strip_prefix": o["strip_prefixes"] or None,
        "config": EvalConfig(batch_size=o["batch_size"], strategy=o["strategy"],
                             bn_batches=o["bn_batches"], data_size=o["data_size"],
                             seed=o["data_seed"]),
        "progress": ProgressBar("evaluating"),
    }


def _check_outputs(o: dict) -> None:
    check_suffix(o["out"], (".nc",), "--out")
    check_suffix(o["plot"], (".png", ".pdf", ".svg"), "--plot")
    if o["plot_group"] is not None and o["plot"] is None:
        raise CkptscopeError("--plot-group names the group of the figure; add --plot FILE.")


def _check_plot_group(o: dict, groups: dict) -> None:
    """Refuse a --plot-group that is not a group of this call before any work."""
    name = o["plot_group"]
    known = (["all"] if not o["no_full"] else []) + list(groups)
    if name is not None and name not in known:
        raise CkptscopeError(f"--plot-group {name!r} is not one of the groups {known}.")


def _finish(ds, o: dict) -> None:
    """Write the result and the figure, and print one line per group and split."""
    from ckptscope.grids import save_grid

    if o["out"]:
        save_grid(ds, o["out"])
    if o["plot"]:
        from ckptscope.grid_plots import plot_grid_result

        save_figure(plot_grid_result(ds, group=o["plot_group"], log=o["log"]), Path(o["plot"]))
    click.echo(grid_table(ds))
    for target in (o["out"], o["plot"]):
        if target:
            click.echo(f"wrote {target}")


def grid_table(ds) -> str:
    """One line per (group, split): the loss at each checkpoint, the lowest and highest loss on
    the grid and where the lowest is."""
    import numpy as np

    names = [str(a) for a in ds["anchor"].values]
    cells = []
    for group in ds["group"].values:
        for split in ds["split"].values:
            z = ds["loss"].sel(group=group, split=split).values[0]
            at = []
            for name in names:
                px = float(ds["anchor_x"].sel(group=group, anchor=name).values[0])
                py = float(ds["anchor_y"].sel(group=group, anchor=name).values[0])
                ix = np.flatnonzero(ds["x"].values == px)
                iy = np.flatnonzero(ds["y"].values == py)
                at.append(f"{z[iy[0], ix[0]]:.4g}" if ix.size and iy.size else "-")
            if np.isfinite(z).any():
                iy, ix = np.unravel_index(np.nanargmin(z), z.shape)
                low = (f"{np.nanmin(z):.4g} at ({ds['x'].values[ix]:.3g}, "
                       f"{ds['y'].values[iy]:.3g})")
                high = f"{np.nanmax(z):.4g}"
            else:
                low, high = "nan", "nan"
            cells.append([str(group), str(split), *at, low, high])
    return table(["group", "split", *[f"L({n})" for n in names], "lowest", "highest"], cells)


@click.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.argument("c", type=click.Path())
@click.option("--hold", type=click.Choice(["a", "b", "c"]), default="b", show_default=True,
              help="Where the tensors outside a group stay.")
@_evaluation_options
def plane(a, b, c, hold, **o):
    """Evaluate the plane through checkpoints A, B and C (A at (0, 0), B at (1, 0), C at (c, 1))."""
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.planes import plane as plane_

    _check_outputs(o)
    ck = [load_checkpoint(p) for p in (a, b, c)]
    notes = NotePrinter()
    for checkpoint, name in zip(ck, "ABC", strict=True):
        notes.checkpoint(checkpoint, name)
    common = _common(o, ck[0])
    _check_plot_group(o, common["groups"])
    ds = plane_(*ck, o["adapter"], o["data"], hold=hold, **common)
    notes.result(ds)  # those made while matching the keys to the model
    _finish(ds, o)


@click.command()
@click.argument("center", type=click.Path())
@click.option("--directions", default="random", show_default=True, metavar="random|FILE|A,B",
              help="Random directions, a .safetensors file of them, or two checkpoints whose "
                   "differences from CENTER are the directions.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random directions.")
@click.option("--norm", type=click.Choice(["filter", "layer", "none"]), default=None,
              help="Direction normalisation (default: filter for random directions, none for a "
                   "file or checkpoints).")
@click.option("--span", type=float, default=1.0, show_default=True,
              help="The grid covers [-span, span] on both axes.")
@click.option("--include-1d", is_flag=True,
              help="Give biases and BatchNorm weights a direction too (default: zero).")
@click.option("--save-directions", type=click.Path(dir_okay=False), default=None,
              help="Write the directions used (.safetensors).")
@_evaluation_options
def surface(center, directions, seed, norm, span, include_1d, save_directions, **o):
    """Evaluate the surface CENTER + x d_x + y d_y around one checkpoint."""
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.surfaces import surface as surface_

    _check_outputs(o)
    check_suffix(save_directions, (".safetensors",), "--save-directions")
    if not span > 0:
        raise CkptscopeError(f"--span {span} must be positive.")
    spec: object = directions
    if directions != "random" and not Path(directions).is_file() and (
            "," in directions or not directions.lower().endswith(".safetensors")):
        parts = directions.split(",")
        if len(parts) != 2 or not all(parts):
            raise CkptscopeError(
                f"--directions {directions!r} is not random, a .safetensors file or A,B (two "
                f"checkpoints)."
            )
        spec = tuple(load_checkpoint(p) for p in parts)
    ck = load_checkpoint(center)
    notes = NotePrinter()
    notes.checkpoint(ck, "CENTER")
    for checkpoint, name in zip(spec if isinstance(spec, tuple) else (), "AB", strict=False):
        notes.checkpoint(checkpoint, name)
    common = _common(o, ck)
    _check_plot_group(o, common["groups"])
    ds = surface_(ck, o["adapter"], o["data"], directions=spec, norm=norm, seed=seed,
                  span=span, include_1d=include_1d, save_directions=save_directions,
                  **common)
    notes.result(ds)  # those made while matching the keys to the model
    _finish(ds, o)
    if save_directions:
        click.echo(f"wrote {save_directions}")
