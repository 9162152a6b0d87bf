"""Commands that make path results: ``demo`` (train, then evaluate), ``path`` (evaluate) and
``merge`` (join results computed separately)."""

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
    parse_tolerances,
    strip_prefix_option,
)
from ckptscope.cli.output import ProgressBar, aggregate_table, path_table, save_figure
from ckptscope.errors import CkptscopeError


def _partial_dir(out: str | None) -> str | None:
    """Where finished chunks of paths wait for the final result: ``OUT.partial/`` beside it."""
    return None if out is None else str(Path(out).with_name(Path(out).name + ".partial"))


def _run_dir(run_dir: str) -> tuple[str, str]:
    """The (init, final) checkpoints of a run directory written by ckptscope."""
    folder = Path(run_dir)
    start, end = folder / "init.safetensors", folder / "final.safetensors"
    if not folder.is_dir():
        raise CkptscopeError(f"run directory {run_dir!r} does not exist or is not a folder.")
    missing = [p.name for p in (start, end) if not p.is_file()]
    if missing:
        raise CkptscopeError(
            f"run directory {run_dir!r} lacks {' and '.join(missing)}; pass the files with "
            f"--pair START END instead."
        )
    return str(start), str(end)


def _pairs(start, end, pairs, run_dirs) -> dict[str, tuple[str, str]]:
    """Run label -> (start, end) from the positional pair, ``--pair`` and ``--run-dir``."""
    if (start is None) != (end is None):
        raise CkptscopeError("give both START and END, or use --pair START END.")
    items: list[tuple[str, tuple[str, str]]] = []
    if start is not None:
        items.append(("0", (start, end)))
    items += [(str(len(items) + i), tuple(p)) for i, p in enumerate(pairs)]
    items += [(Path(d).name or d, _run_dir(d)) for d in run_dirs]
    if not items:
        raise CkptscopeError(
            "no checkpoints given: ckptscope path START END (or --pair / --run-dir)."
        )
    labels = [label for label, _ in items]
    if len(set(labels)) != len(labels):
        items = [(str(i), pair) for i, (_, pair) in enumerate(items)]
    return dict(items)


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="ckptscope-demo",
              show_default=True, help="Folder for the checkpoints, result.nc and paths.png.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=0), default=None,
              help="Training epochs (default 600).")
def demo(out, seed, epochs):
    """Train the paper's spiral MLP and show its whole-model and per-layer paths."""
    from ckptscope.demo import DEMO_TRAIN, run_demo
    from ckptscope.shape import summary

    total = epochs if epochs is not None else DEMO_TRAIN.epochs
    bar, evaluating = ProgressBar("training"), ProgressBar("evaluating")
    click.echo(f"training the spiral MLP (2x50 ReLU, Adam 5e-4) for {total} epochs ...", err=True)
    try:
        result = run_demo(out, seed=seed, epochs=epochs,
                          on_epoch=lambda r: bar(r["epoch"], total), progress=evaluating)
    finally:
        bar.close()
        evaluating.close()
    figure = Path(out) / "paths.png"
    save_figure(result.figure, figure)
    if result.history:
        last = result.history[-1]
        click.echo(f"trained: test accuracy {last['test_accuracy']:.3f}, "
                   f"test loss {last['test_loss']:.4f}")
    click.echo(path_table(summary(result.result)))
    click.echo(f"wrote {result.start}, {result.end}, {result.result_path}, {figure}")


@click.command()
@click.argument("start", type=click.Path(), required=False)
@click.argument("end", type=click.Path(), required=False)
@click.option("--pair", "pairs", type=(click.Path(), click.Path()), multiple=True,
              metavar="START END", help="Another checkpoint pair (a run); repeatable.")
@click.option("--run-dir", "run_dirs", multiple=True, metavar="DIR",
              help="A run directory with init.safetensors and final.safetensors; repeatable.")
@group_options
@click.option("--alphas", type=click.IntRange(min=2), default=None,
              help="Points evenly spaced on [0, 1], both ends included (default 51).")
@click.option("--alpha-range", default=None, metavar="START:STOP:N",
              help="Points on [START, STOP] instead (extrapolation allowed).")
@model_options
@click.option("--seq-len", type=click.IntRange(min=1), default=None, metavar="T",
              help="Tokens per window when --data tokens:/text: is a stream.")
@click.option("--split", type=click.Choice(["test", "train", "both"]), default="test",
              show_default=True)
@click.option("--loss", default=None, metavar="NAME|pkg.module:attr",
              help="The loss: cross_entropy, bce, or your own callable (default: the "
                   "adapter's).")
@click.option("--hold", type=click.Choice(["end", "start"]), default="end", show_default=True,
              help="Where the tensors outside a group stay.")
@click.option("--no-full", is_flag=True, help="Leave out the whole-model path.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bf16", "fp16"]),
              default="float32", show_default=True,
              help="Weights and points in float32 or float64 (fp16/bf16 files upcast per "
                   "tensor); bf16/fp16: forward passes under autocast, weights in float32.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--strategy", type=click.Choice(["auto", "loop", "vmap"]), default="auto",
              show_default=True, help="Evaluator strategy.")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Conv nets in channels-last memory layout (default: where it is faster).")
@click.option("--bn", type=click.Choice(["interpolate", "recompute", "batch"]),
              default="interpolate", show_default=True,
              help="BatchNorm running stats: move with their group, re-estimate at every alpha "
                   "on training batches, or use each evaluation batch's statistics.")
@click.option("--bn-batches", type=click.IntRange(min=1), default=20, show_default=True,
              help="Training batches per alpha for --bn recompute.")
@click.option("--data-size", type=click.IntRange(min=1), default=None, metavar="N",
              help="Evaluate on N examples of each split (a seeded subset).")
@click.option("--seed", type=int, default=None,
              help="Seed of generated data and subsets (default: the checkpoint's, else 0).")
@click.option("--tolerance", "tolerances", multiple=True, metavar="KEY=VALUE",
              help="Shape tolerance: rtol, atol or plateau_alpha; repeatable.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the result (.nc).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a figure (.png, .pdf, .svg).")
@strip_prefix_option
@click.option("--align", "align", type=click.Choice(["weights", "activations"]), default=None,
              help="Permute END's hidden units to match START's first (docs/alignment.md).")
@click.option("--repair", is_flag=True,
              help="Rescale each point: BatchNorm statistics recomputed, or REPAIR without BN.")
def path(start, end, pairs, run_dirs, groups, presets, alphas, alpha_range, adapter,
         adapter_opts, data, split, hold, no_full, device, dtype, batch_size, strategy,
         channels_last, bn, bn_batches, data_size, seed, tolerances, out, plot, loss,
         strip_prefixes, seq_len, align, repair):
    """Evaluate loss and accuracy on the straight line from START to END."""
    from ckptscope.cache import remove_partial
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.data.tokens import with_seq_len
    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths
    from ckptscope.losses import resolve_loss
    from ckptscope.points import parse_alpha_range
    from ckptscope.results import save_result
    from ckptscope.shape import summary

    if alphas is not None and alpha_range is not None:
        raise CkptscopeError("give --alphas or --alpha-range, not both.")
    check_suffix(out, (".nc",), "--out")
    check_suffix(plot, (".png", ".pdf", ".svg"), "--plot")
    grid = parse_alpha_range(alpha_range) if alpha_range else (alphas or 51)
    loss = resolve_loss(loss)  # imported here, from the command line only, before any work
    data = with_seq_len(data, seq_len)
    from ckptscope.distributed import is_main
    from ckptscope.keys import match_keys

    runs = {label: match_keys(load_checkpoint(a), load_checkpoint(b),
                              strip_prefix=strip_prefixes)
            for label, (a, b) in _pairs(start, end, pairs, run_dirs).items()}
    notes = NotePrinter()
    for a, b in runs.values():
        notes.checkpoint(a, "start")
        notes.checkpoint(b, "end")
    first = next(iter(runs.values()))[0]
    specs = group_specs(adapter, presets, groups, first)
    bars = {label: ProgressBar(f"run {label}" if len(runs) > 1 else "evaluating")
            for label in runs}
    try:
        ds = linear_paths(
            runs, adapter, data, groups=specs, alphas=grid, full=not no_full, hold=hold,
            device=device, split=split, loss=loss,
            adapter_options=key_values(adapter_opts, "--adapter-opt"), dtype=dtype, bn=bn,
            config=EvalConfig(batch_size=batch_size, strategy=strategy,
                              channels_last=channels_last, bn_batches=bn_batches,
                              data_size=data_size, seed=seed),
            tolerances=parse_tolerances(tolerances),
            progress=lambda label, done, total: bars[label](done, total),
            resume_dir=_partial_dir(out),
            strip_prefix=strip_prefixes, align=align, repair=repair,
        )
    finally:  # an error's line starts on a line of its own
        for bar in bars.values():
            bar.close()
    if not is_main():  # under torchrun, rank 0 writes and prints
        return
    notes.result(ds)  # those made while matching the keys to the model
    if align:  # the first run's alignment; every run's is in its result's attrs
        click.echo(f"aligned END to START by {align} matching: objective "
                   f"{ds.attrs['align_objective_before']:.6g} -> "
                   f"{ds.attrs['align_objective_after']:.6g}", err=True)
    for note in ds.attrs.get("notes", "").split("; "):
        if "resumed" in note:  # e.g. "resumed 35 of 51 points from r.nc.partial/"
            click.echo(note, err=True)
    if out:
        save_result(ds, out)
        remove_partial(_partial_dir(out))
    if plot:
        from ckptscope.plots import plot_result

        save_figure(plot_result(ds), Path(plot))
    click.echo(path_table(summary(ds)))
    if ds.sizes["run"] > 1:
        click.echo("")
        click.echo(aggregate_table(ds))
    for target in (out, plot):
        if target:
            click.echo(f"wrote {target}")


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True)
def merge(results, out):
    """Join results computed separately into one, along the run dim."""
    from ckptscope.results import merge_results, open_result, save_result
    from ckptscope.shape import classify, shape_options

    check_suffix(out, (".nc",), "--out")
    datasets = [open_result(r) for r in results]
    # The first input's recorded tolerances (validated), else the defaults.
    options = shape_options(datasets[0], source=repr(results[0]))
    merged = classify(merge_results(datasets, sources=list(results)), **options)
    save_result(merged, out)
    click.echo(f"wrote {out}: {merged.sizes['run']} runs, {merged.sizes['group']} groups")
