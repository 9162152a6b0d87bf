"""The ``trajectory`` command: the linear paths between a training run's checkpoints."""

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


def to_final_table(ds, *, group: str = "all") -> str:
    """One line per checkpoint: the metrics of its path to the last checkpoint."""
    split = str(ds["split"].values[0])
    final = str(ds["end"].values[-1])
    at = {"end": final, "group": group, "split": split}
    cells = []
    for s, epoch in zip(ds["start"].values, ds["start_epoch"].values, strict=True):
        if str(s) == final:
            continue
        row = {k: float(ds[k].sel(at).sel(start=s)) for k in (
            "barrier_height", "chord_barrier", "error_chord_barrier", "midpoint_loss")}
        distance = float(ds["distance"].sel(start=s, end=final, group=group))
        cells.append([str(s), str(int(epoch)), f"{row['barrier_height']:.3g}",
                      f"{row['chord_barrier']:.3g}", f"{100 * row['error_chord_barrier']:.2f}",
                      f"{row['midpoint_loss']:.4g}", f"{distance:.4g}"])
    return table(["start", "epoch", "barrier height", "chord barrier", "error chord %",
                  "L(0.5)", "distance"], cells)


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--alphas", type=click.IntRange(min=2), default=11, show_default=True,
              help="Points per path, evenly spaced on [0, 1].")
@click.option("--to-final", is_flag=True,
              help="Only each checkpoint's path to the final (else every pair).")
@group_options
@click.option("--no-full", is_flag=True, help="Leave out the whole-model path.")
@click.option("--hold", type=click.Choice(["end", "start"]), default="end", show_default=True,
              help="Where the tensors outside a group stay.")
@model_options
@click.option("--split", type=click.Choice(["test", "train", "both"]), default="test",
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bf16", "fp16"]),
              default="float32", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--bn", type=click.Choice(["interpolate", "recompute", "batch"]),
              default="interpolate", show_default=True, help="BatchNorm running stats.")
@click.option("--data-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate on N examples of each split (a seeded subset).")
@click.option("--seed", type=int, default=None,
              help="Seed of generated data and subsets (default: the checkpoint's, else 0).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the result (.nc).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write the heatmaps and the to-final view (.png, .pdf, .svg).")
@strip_prefix_option
def trajectory(run_dir, alphas, to_final, groups, presets, no_full, hold, adapter, adapter_opts,
               data, split, device, dtype, batch_size, bn, data_size, seed, out, plot,
               strip_prefixes):
    """Evaluate the paths between RUN_DIR's init, epoch_XXX and final checkpoints."""
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.engine import EvalConfig
    from ckptscope.matrix_results import save_matrix
    from ckptscope.trajectories import checkpoint_files
    from ckptscope.trajectories import trajectory as run_trajectory

    check_suffix(out, (".nc",), "--out")
    check_suffix(plot, (".png", ".pdf", ".svg"), "--plot")
    files = checkpoint_files(run_dir)  # refused here, before any file is read
    specs = (group_specs(adapter, presets, groups, load_checkpoint(files[0])) if presets
             else list(groups) or None)
    bar = ProgressBar("evaluating")
    ds = run_trajectory(
        run_dir, adapter, data, alphas=alphas, to_final=to_final, groups=specs,
        full=not no_full, hold=hold, split=split, device=device, dtype=dtype, bn=bn,
        adapter_options=key_values(adapter_opts, "--adapter-opt"),
        config=EvalConfig(batch_size=batch_size, data_size=data_size, seed=seed),
        progress=bar, strip_prefix=strip_prefixes or None)
    notes = NotePrinter()
    notes.files(files)
    notes.result(ds)  # what was done to read each file, once per file
    if out:
        save_matrix(ds, out)
    if plot:
        from ckptscope.trajectory_plots import plot_trajectory

        group = "all" if not no_full else str(ds["group"].values[0])
        save_figure(plot_trajectory(ds, group=group, title=str(run_dir)), Path(plot))
    n = ds.sizes["start"]
    paths = n - 1 if to_final else n * (n - 1) // 2
    click.echo(f"{n} checkpoints, {paths} paths of {ds.sizes['alpha']} points")
    if not no_full:
        click.echo(to_final_table(ds))
    for target in (out, plot):
        if target:
            click.echo(f"wrote {target}")
