"""DMD on the default toy problem: the one-step student's exact FD and mode coverage over generator steps.

    python toy.py build --outdir=toy/default                                  # once (the fitted UNet is the teacher)
    python bench/bench_dmd_toy.py --problem=toy/default --workdir=runs/bench-dmd-toy
    python bench/bench_dmd_toy.py --configs=noreg --extra='--fake-lr=5e-4' --tag=-f5e-4    # a trial

Each configuration is one `train.py --method=dmd` run (a subprocess; its command is recorded) with a snapshot every
tick. Every snapshot's generator is then sampled like generate.py (seeds 0..num-1, uniform classes) and measured
against the exact mixture with toy.py's metrics: pixel FD, mode-coverage TV, precision. The teacher (the fitted
UNet, 18 Heun steps = 35 NFE) and the exact sampler at the same count (the floor) are measured once. CPU time is
the user+system time of the training subprocess (and of make_pairs.py, charged to configurations with regression);
wall time is also given, since the cores are shared. Results: WORKDIR/results.json, a markdown table on stdout and
WORKDIR/curves.png (FD and mode TV against generator steps).
"""

import json
import os
import resource
import shlex
import subprocess
import sys
import time

import click
import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dnnlib  # noqa: E402
import toy as toy_cli  # noqa: E402
from torch_utils import persistence  # noqa: E402

# The tuned recipe (see docs/BENCHMARKS.md) and its ablations, as train.py options on top of COMMON.
COMMON = ['--method=dmd', '--device=cpu', '--seed=0', '--nosubdir', '--dump=1000']
RECIPE = ['--batch=64', '--lr=2e-4', '--fake-lr=2e-3', '--sigma-init=80', '--ema=0.5']  # EMA 0.5 Mimg (capped at 5% of the images seen), the measured recipe's
REG = ['--reg-loss=l2', '--reg-weight=0.25']
CONFIGS = {
    'noreg':       RECIPE + ['--fake-steps=1'],         # the tuned recipe: one fake update per G update
    'reg':         RECIPE + REG + ['--fake-steps=1'],   # the same with DMD's regression (L2) onto the teacher's pairs
    'noreg-ttur5': RECIPE + ['--fake-steps=5'],         # DMD2's two-time-scale rule: five fake updates per G update
    'reg-ttur5':   RECIPE + REG + ['--fake-steps=5'],   # regression and five fake updates per G update
}

# ----------------------------------------------------------------------------

def children_cpu():
    """User + system CPU seconds of all finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_command(args, log_path):
    """Run a python command in the repository root with this process's thread count, output to log_path;
    returns (cpu_s, wall_s)."""
    cpu0, t0 = children_cpu(), time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    with open(log_path, 'w') as log:
        rc = subprocess.call([sys.executable, *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise click.ClickException(f'`python {shlex.join(args)}` failed with exit code {rc}; see {log_path}')
    return children_cpu() - cpu0, time.time() - t0


def measure_network(net, ref, num):
    """toy.py metrics of a network sampled like generate.py (its sampling spec; uniform classes), with the floor."""
    return toy_cli.measure(toy_cli.network_batches(net, ref, num, 'uniform'), ref, 'uniform')


def load_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def save_json(path, data):
    dnnlib.util.atomic_write(path, lambda f: f.write(json.dumps(data, indent=1)), mode='w')

# ----------------------------------------------------------------------------
# The steps: teacher reference, pairs, training, snapshot evaluation.

def teacher_reference(problem, workdir, ref, num, log):
    """The fitted teacher's 35-NFE Heun samples and the floor (cached in WORKDIR/teacher-{num}.json)."""
    path = os.path.join(workdir, f'teacher-{num}.json')
    result = load_json(path)
    if result is None:
        log(f'Measuring the teacher (18 Heun steps, {num} images)...')
        t0 = time.process_time()
        net = persistence.load_network_pkl(os.path.join(problem, 'teacher-unet.pkl')).eval()
        result = measure_network(net, ref, num)
        result['cpu_s'] = time.process_time() - t0
        save_json(path, result)
    return result


def make_pairs(problem, workdir, num_pairs, log):
    """Regression pairs of the teacher (18 Heun steps) for seeds 0..num_pairs-1, made once; returns (dir, cpu, wall)."""
    outdir = os.path.join(workdir, f'pairs-{num_pairs}')
    done = os.path.join(outdir, 'cost.json')
    cost = load_json(done)
    if cost is None:
        args = ['make_pairs.py', f'--teacher={os.path.join(problem, "teacher-unet.pkl")}', f'--seeds=0-{num_pairs - 1}',
                f'--outdir={outdir}', '--device=cpu', '--batch=250']
        log(f'Making {num_pairs} regression pairs: python {shlex.join(args)}')
        os.makedirs(outdir, exist_ok=True)
        cpu, wall = run_command(args, os.path.join(workdir, f'pairs-{num_pairs}.log'))
        cost = dict(command=f'python {shlex.join(args)}', cpu_s=cpu, wall_s=wall)
        save_json(done, cost)
    return outdir, cost


def snapshots(run_dir):
    """(path, loop steps) of the run's network snapshots, in order: one per tick, so the i-th snapshot was written at
    the i-th stats.jsonl line, whose Progress/kimg is exact (snapshot names round it down)."""
    names = sorted(n for n in os.listdir(run_dir) if n.startswith('network-snapshot-') and n.endswith('.pkl'))
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        nimg = [round(json.loads(line)['Progress/kimg']['mean'] * 1000) for line in f if line.strip()]
    opts = load_json(os.path.join(run_dir, 'training_options.json'))
    return [(os.path.join(run_dir, n), n_img // opts['batch_size']) for n, n_img in zip(names, nimg)]


def initial_generator(problem, sigma_init):
    """G before training: the teacher as a one-step generator at s_init (what DMD copies), for the point at step 0."""
    G = persistence.load_network_pkl(os.path.join(problem, 'teacher-unet.pkl')).eval()
    G.sampling_spec = dict(solver='euler', grid='nested', num_steps=1, sigma_min=0.002, sigma_max=sigma_init, rho=7)
    return G


def run_config(name, options, problem, workdir, kimg, tick, num, num_pairs, ref, log):
    """Train one configuration (unless its run is complete) and measure every snapshot; returns its record."""
    run_dir = os.path.join(workdir, name)
    record_path = os.path.join(run_dir, 'bench.json')
    record = load_json(record_path)
    pairs = None
    if '--reg-loss=l2' in options or '--reg-loss=pseudo_huber' in options:
        pairs, pairs_cost = make_pairs(problem, workdir, num_pairs, log)
    args = ['train.py', *COMMON, f'--teacher={os.path.join(problem, "teacher-unet.pkl")}', f'--outdir={run_dir}',
            f'--duration={kimg / 1000}', f'--tick={tick}', '--snap=1', *options]
    if pairs is not None:
        args.append(f'--pairs={pairs}')
    if record is None or record['command'] != f'python {shlex.join(args)}':
        log(f'[{name}] python {shlex.join(args)}')
        os.makedirs(run_dir, exist_ok=True)
        for n in os.listdir(run_dir):  # a fresh run: the loop appends to stats.jsonl
            os.remove(os.path.join(run_dir, n))
        cpu, wall = run_command(args, os.path.join(workdir, f'{name}.log'))
        record = dict(name=name, command=f'python {shlex.join(args)}', train_cpu_s=cpu, train_wall_s=wall, points=[])
        if pairs is not None:
            record.update(pairs_command=pairs_cost['command'], pairs_cpu_s=pairs_cost['cpu_s'],
                          pairs_wall_s=pairs_cost['wall_s'])
    opts = load_json(os.path.join(run_dir, 'training_options.json'))
    fake_steps, sigma_init = opts['method_kwargs']['fake_steps'], opts['method_kwargs']['sigma_init']
    measured = {p['loop_steps'] for p in record['points']}
    for path, steps in [(None, 0)] + snapshots(run_dir):
        if steps in measured:
            continue
        G = initial_generator(problem, sigma_init) if path is None else persistence.load_network_pkl(path).eval()
        m = measure_network(G, ref, num)
        point = dict(loop_steps=steps, g_steps=-(-steps // fake_steps), fd=m['images']['fd'],  # G moves at steps 0, F, 2F...
                     mode_tv=m['images']['mode_tv'], precision=m['images']['precision'], spread=m['images'].get('spread'))
        record['points'].append(point)
        log(f'[{name}] G steps {point["g_steps"]:5d}  FD {point["fd"]:8.4f}  mode TV {point["mode_tv"]:.4f}  '
            f'precision {point["precision"]:.3f}')
        save_json(record_path, record)
    record['points'].sort(key=lambda p: p['loop_steps'])
    save_json(record_path, record)
    return record

# ----------------------------------------------------------------------------
# Output: a markdown table and a PNG plot (PIL only).

def table(results):
    t, floor = results['teacher']['images'], results['teacher']['floor']
    lines = [f'Teacher (18 Heun steps, 35 NFE): FD {t["fd"]:.4f}, mode TV {t["mode_tv"]:.4f}, precision '
             f'{t["precision"]:.3f}. Exact sampler (floor): FD {floor["fd"]:.4f}, mode TV {floor["mode_tv"]:.4f}, '
             f'precision {floor["precision"]:.3f}. {results["num"]} images each.', '']
    for rec in results['runs']:
        cpu = rec['train_cpu_s'] + rec.get('pairs_cpu_s', 0)
        lines += [f'`{rec["name"]}`: train {rec["train_cpu_s"] / 60:.1f} CPU min ({rec["train_wall_s"] / 60:.1f} min wall)'
                  + (f' + pairs {rec["pairs_cpu_s"] / 60:.1f} CPU min ({rec["pairs_wall_s"] / 60:.1f} min wall)'
                     if 'pairs_cpu_s' in rec else '') + f' = {cpu / 60:.1f} CPU min', '',
                  '| G steps | fake steps | FD | FD / teacher | mode TV | precision |', '|---|---|---|---|---|---|']
        for p in rec['points']:
            lines.append(f'| {p["g_steps"]} | {p["loop_steps"]} | {p["fd"]:.4f} | {p["fd"] / t["fd"]:.2f} | '
                         f'{p["mode_tv"]:.4f} | {p["precision"]:.3f} |')
        lines.append('')
    return '\n'.join(lines)


def plot(results, path, size=(900, 380)):
    """FD (log scale) and mode TV against generator steps, one colour per run; teacher and floor dashed."""
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
    W, H = size
    img = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(img)
    runs = results['runs']
    max_g = max(max(p['g_steps'] for p in r['points']) for r in runs) or 1
    panels = [('FD (log)', 'fd', True), ('mode TV', 'mode_tv', False)]
    for i, (title, key, log) in enumerate(panels):
        x0, x1, y0, y1 = 50 + i * W // 2, (i + 1) * W // 2 - 20, 30, H - 60
        draw.rectangle([x0, y0, x1, y1], outline='black')
        draw.text((x0, 10), f'{title} vs generator steps (0-{max_g})', fill='black')
        refs = [results['teacher']['images'][key], results['teacher']['floor'][key]]
        values = [p[key] for r in runs for p in r['points']] + refs
        f = (lambda v: np.log10(max(v, 1e-4))) if log else (lambda v: v)
        lo, hi = min(map(f, values)), max(map(f, values))
        hi = hi if hi > lo else lo + 1
        to_xy = lambda g, v: (x0 + (x1 - x0) * g / max_g, y1 - (y1 - y0) * (f(v) - lo) / (hi - lo))
        draw.text((x0 - 45, y0), f'{10 ** hi if log else hi:.3g}', fill='black')
        draw.text((x0 - 45, y1 - 10), f'{10 ** lo if log else lo:.3g}', fill='black')
        for v, name in zip(refs, ['teacher', 'floor']):
            y = to_xy(0, v)[1]
            for xs in range(x0, x1, 12):
                draw.line([xs, y, xs + 6, y], fill=(120, 120, 120))
            draw.text((x1 - 50, y - 12), name, fill=(90, 90, 90))
        for j, r in enumerate(runs):
            xy = [to_xy(p['g_steps'], p[key]) for p in r['points']]
            if len(xy) > 1:
                draw.line(xy, fill=colours[j % len(colours)], width=2)
    for j, r in enumerate(runs):
        draw.text((50 + j * 170, H - 30), f'- {r["name"]}', fill=colours[j % len(colours)])
    dnnlib.util.atomic_write(path, lambda fp: img.save(fp, format='PNG'))

# ----------------------------------------------------------------------------

@click.command()
@click.option('--problem',   help='Toy problem directory (toy.py build)', metavar='DIR', type=str, default='toy/default', show_default=True)
@click.option('--workdir',   help='Where runs, pairs and results go', metavar='DIR', type=str, default='runs/bench-dmd-toy', show_default=True)
@click.option('--configs',   help=f'Comma list of {", ".join(CONFIGS)}', metavar='LIST', type=str, default='reg,noreg,noreg-ttur5,reg-ttur5', show_default=True)
@click.option('--kimg',      help='Training duration of each run', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=16, show_default=True)
@click.option('--tick',      help='Snapshot interval', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=2, show_default=True)
@click.option('--num',       help='Images per measurement', metavar='INT', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--pairs',     'num_pairs', help='Regression pairs (seeds 0..N-1)', metavar='INT', type=click.IntRange(min=1), default=4000, show_default=True)
@click.option('--extra',     help='Extra train.py options appended to every configuration (trials)', metavar='STR', type=str, default='')
@click.option('--threads',   help='CPU threads of every process (on shared cores, 2 threads waste time spinning)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--tag',       help='Suffix of the run directories (trials)', metavar='STR', type=str, default='')
def main(problem, workdir, configs, kimg, tick, num, num_pairs, extra, threads, tag):
    """Train DMD configurations on a toy problem and measure their one-step students against the teacher."""
    names = [n.strip() for n in configs.split(',') if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise click.BadParameter(f'unknown configuration "{unknown[0]}"; pick from {", ".join(CONFIGS)}', param_hint='--configs')
    if not os.path.isfile(os.path.join(problem, 'teacher-unet.pkl')):
        raise click.ClickException(f'No teacher-unet.pkl in "{problem}"; build it with: python toy.py build --outdir={problem}')
    problem, workdir = os.path.abspath(problem), os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(threads)
    ref = toy_cli.load_reference(problem)
    results = dict(problem=problem, num=num, threads=threads, date=time.strftime('%Y-%m-%d'), teacher=teacher_reference(problem, workdir, ref, num, click.echo),
                   runs=[])
    for name in names:
        options = CONFIGS[name] + shlex.split(extra)
        results['runs'].append(run_config(name + tag, options, problem, workdir, kimg, tick, num, num_pairs, ref, click.echo))
    save_json(os.path.join(workdir, f'results{tag}.json'), results)
    plot(results, os.path.join(workdir, f'curves{tag}.png'))
    click.echo(table(results))

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
