"""The ``ckptscope`` command: thin click shells over the library.

Each command parses its options, makes one library call, writes and prints. Bad input is one
line on stderr (``error: ...``) and exit status 2, without a traceback; ``check`` and
``compare`` exit 1 when an expectation fails.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

from ckptscope.errors import CkptscopeError
from ckptscope.files import replacing, write_text

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


# --- output helpers ------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar on stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str, *, enabled: bool | None = None):
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / max(total, 1))
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} {elapsed:5.1f}s eta {eta:5.1f}s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _table(headers: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _path_table(rows: list[dict]) -> str:
    many = len({r["run"] for r in rows}) > 1
    headers = ["run"] * many + ["group", "split", "L(0)", "L(max)", "at alpha", "L(1)",
                                "acc(0)", "acc(1)", "distance", "shape", "barrier"]
    cells = [
        [r["run"]] * many + [
            r["group"], r["split"], f"{r['loss_start']:.4g}", f"{r['loss_max']:.4g}",
            f"{r['alpha_max']:.2f}", f"{r['loss_end']:.4g}", f"{r['acc_start']:.3f}",
            f"{r['acc_end']:.3f}", f"{r['distance']:.4g}", r["shape"],
            f"{r['barrier_height']:.3g}",
        ]
        for r in rows
    ]
    return _table(headers, cells)


def _aggregate_table(ds) -> str:
    """Per group and split over runs: barrier fraction, barrier height and L(1) mean +- std."""
    from ckptscope.shape import aggregate

    agg = aggregate(ds)
    cells = []
    for group in ds["group"].values:
        for split in ds["split"].values:
            at = {"group": group, "split": split}
            heights = ds["barrier_height"].sel(at).values
            ends = ds["loss"].sel(at).sel(alpha=1.0, method="nearest").values
            cells.append([
                str(group), str(split), f"{float(agg['barrier_fraction'].sel(at)):.2f}",
                f"{np.nanmean(heights):.3g} +- {np.nanstd(heights, ddof=1):.2g}",
                f"{np.nanmean(ends):.4g} +- {np.nanstd(ends, ddof=1):.2g}",
                str(int(agg["n_valid"].sel(at))),
            ])
    return _table(["group", "split", "barrier fraction", "barrier height", "L(1)", "valid runs"],
                  cells)


def _save_figure(fig, path: Path) -> None:
    """Save a figure atomically (the format follows the suffix)."""
    with replacing(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=120)


def _check_suffix(path: str | None, suffixes: tuple[str, ...], option: str) -> None:
    if path is not None and Path(path).suffix.lower() not in suffixes:
        raise CkptscopeError(f"{option} {path!r} should end in {' or '.join(suffixes)}.")


def _key_values(pairs: tuple[str, ...], what: str) -> dict | None:
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


def _tolerances(pairs: tuple[str, ...]) -> dict:
    options = _key_values(pairs, "--tolerance") or {}
    known = ("rtol", "atol", "plateau_alpha")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise CkptscopeError(f"--tolerance {unknown[0]!r} is not one of {known}.")
    for key, value in options.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CkptscopeError(f"--tolerance {key}={value!r} is not a number.")
    return options


def _groups(adapter_spec: str | None, presets: tuple[str, ...], groups: tuple[str, ...],
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


def _partial_dir(out: str | None) -> str | None:
    """Where finished chunks of paths wait for the final result: ``OUT.partial/`` beside it."""
    return None if out is None else str(Path(out).with_name(Path(out).name + ".partial"))


def _run_dir(path: str) -> tuple[str, str]:
    """The (init, final) checkpoints of a run directory written by ckptscope."""
    folder = Path(path)
    start, end = folder / "init.safetensors", folder / "final.safetensors"
    if not (start.is_file() and end.is_file()):
        raise CkptscopeError(
            f"run directory {path!r} lacks init.safetensors and final.safetensors; pass the "
            f"files with --pair START END instead."
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


# --- commands ------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptscope")
def cli():
    """The loss landscape on the straight line between two checkpoints."""


@cli.command()
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
    bar = ProgressBar("training  ")
    click.echo(f"training the spiral MLP (2x50 ReLU, Adam 5e-4) for {total} epochs ...", err=True)
    result = run_demo(out, seed=seed, epochs=epochs, on_epoch=lambda r: bar(r["epoch"], total),
                      progress=ProgressBar("evaluating"))
    figure = Path(out) / "paths.png"
    _save_figure(result.figure, figure)
    if result.history:
        last = result.history[-1]
        click.echo(f"trained: test accuracy {last['test_accuracy']:.3f}, "
                   f"test loss {last['test_loss']:.4f}")
    click.echo(_path_table(summary(result.result)))
    click.echo(f"wrote {result.start}, {result.end}, {result.result_path}, {figure}")


@cli.command()
@click.argument("start", type=click.Path(), required=False)
@click.argument("end", type=click.Path(), required=False)
@click.option("--pair", "pairs", type=(click.Path(), click.Path()), multiple=True,
              metavar="START END", help="Another checkpoint pair (a run); repeatable.")
@click.option("--run-dir", "run_dirs", multiple=True, metavar="DIR",
              help="A run directory with init.safetensors and final.safetensors; repeatable.")
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX",
              help="A group of tensors (re.match on the key); repeatable.")
@click.option("--preset", "presets", multiple=True, metavar="NAME",
              help="An adapter's group preset (blocks, layers, bn-stats, ...; see "
                   "`ckptscope list`); repeatable.")
@click.option("--alphas", type=click.IntRange(min=2), default=None,
              help="Points evenly spaced on [0, 1], both ends included (default 51).")
@click.option("--alpha-range", default=None, metavar="START:STOP:N",
              help="Points on [START, STOP] instead (extrapolation allowed).")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr",
              help="The architecture (default: from the checkpoint's metadata).")
@click.option("--adapter-opt", "adapter_opts", multiple=True, metavar="KEY=VALUE",
              help="An adapter option, e.g. widths=[2,50,50,1]; repeatable.")
@click.option("--data", default=None, metavar="NAME[:ARG]|pkg.module:attr",
              help="The evaluation data (default: from the metadata or the adapter).")
@click.option("--split", type=click.Choice(["test", "train", "both"]), default="test",
              show_default=True)
@click.option("--hold", type=click.Choice(["end", "start"]), default="end", show_default=True,
              help="Where the tensors outside a group stay.")
@click.option("--no-full", is_flag=True, help="Leave out the whole-model path.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:i].")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bf16", "fp16"]),
              default="float32", show_default=True,
              help="bf16/fp16: forward passes under autocast, weights in float32.")
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
def path(start, end, pairs, run_dirs, groups, presets, alphas, alpha_range, adapter,
         adapter_opts, data, split, hold, no_full, device, dtype, batch_size, strategy,
         channels_last, bn, bn_batches, data_size, seed, tolerances, out, plot):
    """Evaluate loss and accuracy on the straight line from START to END."""
    from ckptscope.cache import remove_partial
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.engine import EvalConfig
    from ckptscope.linear import linear_paths
    from ckptscope.points import parse_alpha_range
    from ckptscope.results import save_result
    from ckptscope.shape import summary

    if alphas is not None and alpha_range is not None:
        raise CkptscopeError("give --alphas or --alpha-range, not both.")
    _check_suffix(out, (".nc",), "--out")
    _check_suffix(plot, (".png", ".pdf", ".svg"), "--plot")
    grid = parse_alpha_range(alpha_range) if alpha_range else (alphas or 51)
    runs = {label: (load_checkpoint(a), load_checkpoint(b))
            for label, (a, b) in _pairs(start, end, pairs, run_dirs).items()}
    first = next(iter(runs.values()))[0]
    group_specs = _groups(adapter, presets, groups, first)
    bars = {label: ProgressBar(f"run {label}" if len(runs) > 1 else "evaluating")
            for label in runs}
    ds = linear_paths(
        runs, adapter, data, groups=group_specs, alphas=grid, full=not no_full, hold=hold,
        device=device, split=split,
        adapter_options=_key_values(adapter_opts, "--adapter-opt"), dtype=dtype, bn=bn,
        config=EvalConfig(batch_size=batch_size, strategy=strategy, channels_last=channels_last,
                          bn_batches=bn_batches, data_size=data_size, seed=seed),
        tolerances=_tolerances(tolerances),
        progress=lambda label, done, total: bars[label](done, total),
        resume_dir=_partial_dir(out),
    )
    from ckptscope.distributed import is_main

    if not is_main():  # under torchrun, rank 0 writes and prints
        return
    for note in ds.attrs.get("notes", "").split("; "):
        if "resumed" in note:  # e.g. "resumed 35 of 51 points from r.nc.partial/"
            click.echo(note, err=True)
    if out:
        save_result(ds, out)
        remove_partial(_partial_dir(out))
    if plot:
        from ckptscope.plots import plot_result

        _save_figure(plot_result(ds), Path(plot))
    click.echo(_path_table(summary(ds)))
    if ds.sizes["run"] > 1:
        click.echo("")
        click.echo(_aggregate_table(ds))
    for target in (out, plot):
        if target:
            click.echo(f"wrote {target}")


@cli.command()
@click.argument("start", type=click.Path())
@click.argument("end", type=click.Path(), required=False)
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX")
@click.option("--preset", "presets", multiple=True, metavar="NAME")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr")
@click.option("--keys/--no-keys", default=True, show_default=True, help="List every tensor.")
def inspect(start, end, groups, presets, adapter, keys):
    """Show a checkpoint's tensors, how groups resolve, and distances to END."""
    from ckptscope.checkpoints import describe_dtypes, load_checkpoint
    from ckptscope.distance import distances
    from ckptscope.identity import parameter_keys
    from ckptscope.metadata import describe_metadata

    a = load_checkpoint(start)
    b = load_checkpoint(end) if end else None
    specs = _groups(adapter, presets, groups, a)
    # Against itself when there is no END: the per-group counts without a distance.
    moved = distances(a, b if b is not None else a, groups=specs, adapter=adapter)
    params = parameter_keys(a.state)
    n_params = sum(a.state[k].numel() for k in params)
    click.echo(f"{a.path}  sha256 {a.sha256[:16]}  {len(a.state)} tensors, {n_params:,} "
               f"parameters ({describe_dtypes(a.state)})")
    if a.metadata:  # a file's strings, escaped: they never drive the terminal
        click.echo(f"metadata: {describe_metadata(a.metadata)}")
    for note in a.notes:
        click.echo(f"note: {note}")
    if keys:
        width = max(len(k) for k in a.state)
        for k, v in a.state.items():
            kind = "param" if k in params else "buffer"
            click.echo(f"  {k.ljust(width)}  {str(tuple(v.shape)):>18}  "
                       f"{str(v.dtype).replace('torch.', ''):>8}  {kind}")
    click.echo("groups:")
    for row in moved.to_dataframe().itertuples():
        line = (f"  {row.Index:<16} {row.pattern:<24} {row.n_tensors:>4} tensors "
                f"{int(row.n_params):>12,} params")
        click.echo(line + (f"  distance {row.relative:.4g}" if b is not None else ""))


@cli.command()
@click.argument("start", type=click.Path())
@click.argument("end", type=click.Path())
@click.option("--group", "groups", multiple=True, metavar="[NAME=]REGEX")
@click.option("--preset", "presets", multiple=True, metavar="NAME")
@click.option("--adapter", default=None, metavar="NAME|pkg.module:attr",
              help="Decides which tensors are parameters (default: names ending in "
                   "running_mean/var are buffers).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the distances (.nc).")
def distance(start, end, groups, presets, adapter, out):
    """Distances between two checkpoints per group (relative as eq. 4, L2, cosine)."""
    from ckptscope.checkpoints import load_checkpoint
    from ckptscope.distance import distances
    from ckptscope.results import write_netcdf

    _check_suffix(out, (".nc",), "--out")
    a, b = load_checkpoint(start), load_checkpoint(end)
    specs = _groups(adapter, presets, groups, a)
    ds = distances(a, b, groups=specs, adapter=adapter)
    if out:
        write_netcdf(ds, out)
    cells = [[str(g), str(p), f"{int(n):,}", f"{r:.4g}", f"{l2:.4g}", f"{c:.4f}"]
             for g, p, n, r, l2, c in zip(ds.group.values, ds.pattern.values,
                                          ds.n_params.values, ds.relative.values, ds.l2.values,
                                          ds.cosine.values, strict=True)]
    click.echo(_table(["group", "pattern", "params", "relative (eq. 4)", "L2", "cosine"], cells))
    if out:
        click.echo(f"wrote {out}")


@cli.command()
@click.argument("result", type=click.Path())
@click.option("--expect", "expects", multiple=True, required=True, metavar="FILE|EXPR",
              help="An expectations TOML file, or GROUP[@SPLIT]:METRIC OP VALUE; repeatable.")
@click.option("--tolerance", "tolerances", multiple=True, metavar="KEY=VALUE",
              help="Re-classify with these shape tolerances first.")
@click.option("--junit", type=click.Path(dir_okay=False), default=None,
              help="Write a JUnit XML report.")
def check(result, expects, tolerances, junit):
    """Hold a result against expectations; exit 0 if all pass, 1 if any fails."""
    from ckptscope.check import check as run_check
    from ckptscope.check import load_expectations, parse_expectation
    from ckptscope.results import open_result

    ds = open_result(result)
    expectations = []
    for item in expects:
        if Path(item).suffix.lower() == ".toml" or Path(item).is_file():
            expectations += load_expectations(item)
        else:
            expectations.append(parse_expectation(item))
    rows = run_check(ds, expectations, **_tolerances(tolerances))
    _verdict(rows, ["expectation", "run", "group", "split", "actual", "note"],
             [[str(r.expectation), r.run, r.group, r.split, _fmt(r.actual), r.message]
              for r in rows], junit)


@cli.command()
@click.argument("baseline", type=click.Path())
@click.argument("new", type=click.Path())
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Relative drift allowed (default 0.05).")
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Absolute drift allowed (default 1e-3).")
@click.option("--junit", type=click.Path(dir_okay=False), default=None)
def compare(baseline, new, rtol, atol, junit):
    """Verdict changes and metric drifts from BASELINE to NEW; exit 1 on any."""
    from ckptscope.check import compare as run_compare
    from ckptscope.results import open_result

    tol = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
    rows = run_compare(open_result(baseline), open_result(new), **tol)
    _verdict(rows, ["group", "split", "metric", "baseline", "new", "note"],
             [[r.group, r.split, r.metric, _fmt(r.baseline), _fmt(r.new), r.message]
              for r in rows], junit)


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True)
def merge(results, out):
    """Join results computed separately into one, along the run dim."""
    from ckptscope.results import merge_results, open_result, save_result
    from ckptscope.shape import classify, shape_options

    _check_suffix(out, (".nc",), "--out")
    datasets = [open_result(r) for r in results]
    # The first input's recorded tolerances (validated), else the defaults.
    options = shape_options(datasets[0], source=repr(results[0]))
    merged = classify(merge_results(datasets, sources=list(results)), **options)
    save_result(merged, out)
    click.echo(f"wrote {out}: {merged.sizes['run']} runs, {merged.sizes['group']} groups")


@cli.command()
@click.argument("result", type=click.Path())
@click.option("-o", "--out", type=click.Path(dir_okay=False), required=True,
              help="The figure (.png, .pdf, .svg).")
@click.option("--variable", type=click.Choice(["loss", "accuracy", "both"]), default="loss",
              show_default=True)
@click.option("--layout", type=click.Choice(["split", "run"]), default="split",
              show_default=True, help="One panel per split, or per run (conditions).")
@click.option("--title", default=None)
def plot(result, out, variable, layout, title):
    """Draw a result in the paper's style."""
    from ckptscope.plots import plot_result
    from ckptscope.results import open_result

    _check_suffix(out, (".png", ".pdf", ".svg"), "--out")
    ds = open_result(result)
    variables = ("loss", "accuracy") if variable == "both" else (variable,)
    _save_figure(plot_result(ds, variables=variables, layout=layout, title=title), Path(out))
    click.echo(f"wrote {out}")


@cli.command(name="list")
def list_():
    """List the adapters (with their presets) and the datasets."""
    from ckptscope.adapters import ADAPTERS
    from ckptscope.data import DATASETS

    click.echo("adapters (--adapter NAME, or pkg.module:attr):")
    for name in ADAPTERS:
        adapter = ADAPTERS.get(name)
        click.echo(f"  {name:<10} {adapter.description}")
        if adapter.presets:
            click.echo(f"  {'':<10} presets: {', '.join(sorted(adapter.presets))}")
    click.echo("datasets (--data NAME[:ARG], or pkg.module:attr):")
    for name in DATASETS:
        click.echo(f"  {name:<14} {DATASETS.get(name).description}")


def _verdict(rows, headers: list[str], cells: list[list[str]], junit: str | None) -> None:
    """Print a PASS/FAIL table and the counts, write the JUnit report, exit 1 on a failure."""
    from ckptscope.check import to_junit

    # Everything is rendered before the report is written: a failure leaves no file behind.
    marks = [["PASS" if r.passed else "FAIL", *cell] for r, cell in zip(rows, cells, strict=True)]
    table = _table(["", *headers], marks)
    _write_text(junit, to_junit(rows))
    click.echo(table)
    failed = sum(not r.passed for r in rows)
    click.echo(f"{len(rows) - failed} passed, {failed} failed")
    sys.exit(EXIT_FAILED if failed else 0)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _write_text(path: str | None, text: str) -> None:
    """Write a text file atomically (nothing for ``None``)."""
    if path is not None:
        write_text(path, text)


def _register_trainer() -> None:
    """The trainer's commands (train, sweep, reproduce) live with the trainer."""
    from ckptscope.train.cli import reproduce, sweep, train

    for command in (train, sweep, reproduce):
        cli.add_command(command)


_register_trainer()


# --- entry point ---------------------------------------------------------------------------
def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input is one line on stderr and exit status 2."""
    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="ckptscope", standalone_mode=False)
    except CkptscopeError as err:
        click.echo(f"error: {err}", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        click.echo(f"error: {err.strerror or err}{where}; check the path, its permissions and "
                   f"the free space on its disk.", err=True)
        return EXIT_BAD_INPUT
    except SystemExit as err:  # check/compare give their verdict as the exit status
        return int(err.code or 0)
    return 0


def run() -> int:
    """The ``ckptscope`` program: :func:`main` in a process of its own, whose C allocator it
    tunes first (:func:`ckptscope.allocator.keep_freed_memory`; ``CKPTSCOPE_MALLOC=default``
    leaves it alone)."""
    from ckptscope.allocator import keep_freed_memory

    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(run())
