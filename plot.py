"""Plot a training run: loss curves, metric curves and timing from its stats.jsonl and metric-*.jsonl, as one PNG.

    python plot.py --run=training-runs/00003-dmd-...            # writes training-runs/00003-dmd-.../plot.png
    python plot.py --run=training-runs/00003-dmd-... --out=run.png
    python plot.py --run=... --hline=fid2k:teacher=1.8 --hline=fid2k:floor=1.5   # reference values as dashed lines

Needs matplotlib (`pip install matplotlib`), which nothing else here does.
"""

import glob
import importlib.util
import json
import math
import os

import click
import numpy as np

import dnnlib

# ----------------------------------------------------------------------------
# Reading a run directory.

def _read_jsonl(path):
    """The lines of a .jsonl file as dicts. A torn last line (a run killed while writing it) is left out; a bad
    line elsewhere is an error naming it."""
    with open(path) as f:
        lines = [line for line in f.read().split('\n') if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f'"{path}" line {i + 1} is not JSON ({e}); repair or remove that line') from e
    return rows


def read_run(run_dir):
    """{'stats': {name: (kimg, mean) of the ticks that report it, NaN where the mean is null (every value
    non-finite)}, 'metrics': {metric file name: {'kimg': [...], result name: [...]}}} of a run directory."""
    path = os.path.join(run_dir, 'stats.jsonl')
    if not os.path.isfile(path):
        raise ValueError(f'No stats.jsonl in "{run_dir}": pass a run directory of train.py')
    ticks = _read_jsonl(path)
    if not ticks:
        raise ValueError(f'"{path}" has no ticks yet: plot again after the first tick')
    names = sorted({name for tick in ticks for name in tick if isinstance(tick[name], dict)})
    mean = lambda value: math.nan if value['mean'] is None else value['mean']
    run = dict(stats={name: ([t['Progress/kimg']['mean'] for t in ticks if name in t], [mean(t[name]) for t in ticks if name in t])
                      for name in names}, metrics={})
    for metric_path in sorted(glob.glob(os.path.join(run_dir, 'metric-*.jsonl'))):
        lines = _read_jsonl(metric_path)
        if any('results' not in line for line in lines):
            raise ValueError(f'"{metric_path}" has lines without "results": not a metric file of train.py')
        keys = sorted({key for line in lines for key in line['results']})
        name = os.path.basename(metric_path)[len('metric-'):-len('.jsonl')]
        run['metrics'][name] = dict(kimg=[line['kimg'] for line in lines],
                                    **{key: [line['results'].get(key, math.nan) for line in lines] for key in keys})
    return run

# ----------------------------------------------------------------------------
# Drawing.

# Line styles of the reference lines, one per label in the order first given (e.g. teacher dashed, floor dotted).
_HLINE_STYLES = ['--', ':', '-.']


def parse_hline(text):
    """'NAME:LABEL=VALUE' (e.g. 'fid2k:teacher=1.81') -> (NAME, LABEL, VALUE): a reference value of curve NAME."""
    name, _, rest = text.partition(':')
    label, _, value = rest.partition('=')
    try:
        value = float(value)
    except ValueError:
        value = math.nan
    if not (name and label and math.isfinite(value)):
        raise ValueError(f'--hline="{text}" is not NAME:LABEL=VALUE with a finite VALUE, e.g. --hline=fid2k:teacher=1.81')
    return name, label, value


def _panel(ax, title, series, log_y=False, hlines=()):
    """Curves {label: (x, y)}; NaN makes a gap. hlines: (NAME, LABEL, VALUE, style) drawn in NAME's colour."""
    colours = {}
    for label, (x, y) in series.items():
        colours[label] = ax.plot(x, y, marker='.' if len(x) < 30 else None, label=label)[0].get_color()
    for name, label, value, style in hlines:
        if name in colours:
            ax.axhline(value, color=colours[name], linestyle=style, linewidth=1, label=f'{label} {value:g}')
    ax.set_title(title)
    ax.set_xlabel('kimg')
    ax.grid(alpha=0.3)
    values = np.array([v for _, y in series.values() for v in y], dtype=np.float64)
    if log_y and values[np.isfinite(values)].size and (values[np.isfinite(values)] > 0).all():
        ax.set_yscale('log')
    if series:
        ax.legend(fontsize='small')


def plot_run(run, out, title=None, hlines=()):
    """One PNG: the Loss/* means, one panel per metric file, and the seconds per kimg (and maintenance) per tick;
    hlines (parse_hline's triples) are drawn in the panel of their curve, an unknown curve name is a ValueError."""
    import matplotlib
    matplotlib.use('Agg')  # files only, no display
    import matplotlib.pyplot as plt
    losses = {name[5:]: xy for name, xy in run['stats'].items() if name.startswith('Loss/')}
    timing = {name[7:]: xy for name, xy in run['stats'].items() if name in ('Timing/sec_per_kimg', 'Timing/maintenance_sec')}
    panels = [('losses', losses, True)]
    panels += [(name, {k: (m['kimg'], v) for k, v in m.items() if k != 'kimg'}) for name, m in run['metrics'].items()]
    panels += [('timing (seconds)', timing)]
    names = sorted({name for panel in panels for name in panel[1]})
    unknown = [name for name, _, _ in hlines if name not in names]
    if unknown:
        raise ValueError(f'--hline names "{unknown[0]}", which this run does not plot; its curves are {", ".join(names)}')
    labels = list(dict.fromkeys(label for _, label, _ in hlines))
    styled = [(name, label, value, _HLINE_STYLES[labels.index(label) % len(_HLINE_STYLES)]) for name, label, value in hlines]
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (panel_title, series, *log_y) in zip(axes.flat, panels):
        _panel(ax, panel_title, series, *log_y, hlines=[h for h in styled if h[0] in series])
    for ax in axes.flat[len(panels):]:
        ax.axis('off')
    if title:
        fig.suptitle(title, fontsize='medium')
    fig.tight_layout()
    dnnlib.util.atomic_write(out, lambda f: fig.savefig(f, format='png', dpi=80))
    plt.close(fig)

# ----------------------------------------------------------------------------

@click.command()
@click.option('--run', 'run_dir', help='Run directory (train.py)', metavar='DIR', type=str, required=True)
@click.option('--out', help='PNG to write  [default: DIR/plot.png]', metavar='PNG', type=str)
@click.option('--hline', 'hlines', help='A reference value of a curve as a horizontal line (repeatable), e.g. fid2k:teacher=1.81', metavar='NAME:LABEL=VALUE', multiple=True)
def main(run_dir, out, hlines):
    """Plot a run's loss curves, metric curves and timing as one PNG."""
    if importlib.util.find_spec('matplotlib') is None:  # an optional dependency: say so before reading anything
        raise click.ClickException('plot.py needs matplotlib: pip install matplotlib')
    out = out or os.path.join(run_dir, 'plot.png')
    try:
        hlines = [parse_hline(text) for text in hlines]
        plot_run(read_run(run_dir), out, title=os.path.basename(os.path.normpath(run_dir)), hlines=hlines)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:  # unreadable run files, an unwritable --out
        raise click.ClickException(dnnlib.util.os_error_message(e)) from e
    click.echo(f'Wrote "{out}"')


if __name__ == '__main__':
    main()
