"""One-step students against their 35-NFE teacher on the exact toy problems (issue 25): dmd, dmd2, sid, sida.

    python toy.py build --outdir=/tmp/q/toy16                                   # the conditional 16x16 default
    OMP_NUM_THREADS=1 python bench/bench_quality.py run --workdir=/tmp/q --problem16=/tmp/q/toy16 \
        --problems=uncond8 --arms=dmd,sid --seeds=0                              # a part; runs already done are skipped
    python bench/bench_quality.py report --workdir=/tmp/q                       # markdown table from results.json

Parallel processes (one thread each) need workdirs of their own (each writes its results.json); `report` merges
them: `report --workdir=/tmp/q --workdir=/tmp/q-seed2`.

Problems (bench_disback.py's): `uncond8`, the unconditional 8x8x3 mixture with its small fitted SongUNet teacher
(cached in WORKDIR), and `cond16`, toy.py's default conditional 16x16 problem and its fitted teacher. Arms, each a
recipe of RECIPES: `dmd` (the best DMD recipe of docs/BENCHMARKS.md for that problem), `dmd2` (the same with DMD2's
GAN head, exact mixture samples as the real data), `sid` (SiD's own settings, the lr of the SiD pilot), `sida` (SiD
with SiDA's encoder classifier on exact samples); trials on uncond8: `sid-ema` (`sid` with an EMA, measured on
the EMA generator), `sid-b64` (`sid` at batch 64); on cond16: `dmd2-decay` (`dmd2` with both learning rates
divided by 10 after 40 G steps). One process, one thread (`--threads`); runs are sequential. DMD2's
GAN head needs an 8x8 bottleneck, which uncond8's two-level 8x8 teacher does not have (4x4): DMD refuses it and the
run is recorded as refused.

Each (problem, arm, seed) run trains from the teacher with the seed's random streams (paired across arms) and is
stopped by the rule of `train`: FD on fixed latents (`--num-eval`, default 2,000) every `--every` generator steps;
the run stops when the best excess FD (over exact samples' FD at the same count) has not improved by more than
`--tol` (relative) for `--patience` evaluations in a row, or at `--max-g-steps`. (The excess, not the FD: at 2,000
images cond16's floor is about 1.3, so 3% of a student's FD of 1.5 was 30% of its excess, and the rule stopped
runs that were still improving.) The generator of the best evaluation is then measured exactly on 10,000 images
(`--num`; seeds 0..num-1 as generate.py draws them, independent of the latents that selected it), with the exact
sampler at the same count (the floor): FD, excess FD over the floor, mode TV, precision, spread. The teacher
(18 Heun steps, 35 NFE) is measured once per problem on the same seeds. CPU minutes: process time of the training
(evaluations excluded; they are reported apart). A run is written to WORKDIR/results.json when it ends: an
interrupted bench continues with the next run not done.
"""

import copy
import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_disback import UNCOND8, bootstrap_ci, load_json, load_problem, save_json  # noqa: E402
import toy as toy_cli  # noqa: E402
from training import toy  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.distill.dmd import DMD  # noqa: E402
from training.distill.sid import SiD  # noqa: E402

# The recipes, per problem: method, batch and the method's keyword arguments. dmd: uncond8's `main8` setting (the
# DisBack bench: ratio 1 diverged there) and cond16's `noreg-ttur5` (bench_dmd_toy.py: 1.14x the teacher's FD in
# 50 G steps), with no EMA (the stop rule picks the snapshot). sid: lr 1e-5 (the SiD pilot), clipping at 10 as the
# DMD arms. SiDA waits g_start_kimg before G steps and gan_start_kimg before G's GAN term (official: 100 and 200
# kimg, from a SiD generator); scaled here to the toy's run length.
DMD_UNCOND8 = dict(sigma_init=80, lr=3e-4, fake_lr=1e-3, fake_steps=3, ema_halflife_kimg=None, max_grad_norm=10)
DMD_COND16 = dict(sigma_init=80, lr=2e-4, fake_lr=2e-3, fake_steps=5, ema_halflife_kimg=None, max_grad_norm=10)
DMD2_GAN = dict(gan_g_weight=3e-3, gan_d_weight=1e-2)  # DMD2's weights (its CIFAR-10/ImageNet-64 values)
SID = dict(sigma_init=2.5, lr=1e-5, fake_lr=1e-5, ema_halflife_kimg=None, max_grad_norm=10)
SIDA = dict(SID, sida=True, alpha=1.0, g_start_kimg=1, gan_start_kimg=2)
SID_EMA = dict(SID, ema_halflife_kimg=1)  # a trial: SiD with an EMA of 1 kimg half-life (the official 500 scaled)
RECIPES = {
    'uncond8': {'dmd': (DMD, 16, DMD_UNCOND8), 'dmd2': (DMD, 16, dict(DMD_UNCOND8, **DMD2_GAN)),
                'sid': (SiD, 16, SID), 'sida': (SiD, 16, SIDA), 'sid-ema': (SiD, 16, SID_EMA),
                'sid-b64': (SiD, 64, SID)},  # a trial: SiD at 4x the batch (less gradient noise)
    'cond16': {'dmd': (DMD, 64, DMD_COND16), 'dmd2': (DMD, 64, dict(DMD_COND16, **DMD2_GAN)),
               'sid': (SiD, 16, SID), 'sida': (SiD, 16, SIDA),
               'dmd2-decay': (DMD, 64, dict(DMD_COND16, **DMD2_GAN))},  # a trial: both lrs / 10 after LR_DROP steps
}
# Trials with a learning-rate drop: G step at which G's and the fake score's lr are divided by 10 (cond16's dmd and
# dmd2 reach their best FD by G step 40 and then wander at that level: is it the step size?).
LR_DROP = {'dmd2-decay': 40}
DATA_SEED = 1 << 24  # the exact "real" images' stream: apart from the training streams

# ----------------------------------------------------------------------------
# Training one arm.

def make_method(problem, arm, gmm):
    """The arm's method on a copy of the problem's teacher; `gmm` stands for the dataset where the recipe needs one."""
    cls, batch, kwargs = RECIPES[problem.name][arm]
    needs_data = kwargs.get('gan_g_weight', 0) > 0 or kwargs.get('sida', False)
    return cls(copy.deepcopy(problem.teacher), 'cpu', batch, dataset=gmm if needs_data else None, **kwargs), needs_data


def real_round(gmm, label_dim, seed, step, batch, with_data):
    """One step's round: exact mixture samples (and their one-hot components) as the real data when the recipe
    takes data, from a stream of their own."""
    rand = StepRandom(seed, step, batch, 'cpu')
    if not with_data:
        return Round(None, None, rand, 0, batch)
    g = torch.Generator().manual_seed(DATA_SEED + seed * 1_000_003 + step)
    x, k = gmm.sample(batch, generator=g)
    labels = torch.nn.functional.one_hot(k, gmm.num_components).to(torch.float32) if label_dim else None
    return Round(x.to(torch.float32), labels, rand, 0, batch)


def train(problem, arm, seed, gmm, every=10, patience=10, tol=0.03, max_g_steps=2000, log=print):
    """Train until FD on the fixed latents stops improving (see the module docstring); returns the FD curve (with
    training CPU seconds at each point), the best generator and its G step."""
    torch.manual_seed(seed)
    method, with_data = make_method(problem, arm, gmm)
    B = RECIPES[problem.name][arm][1]

    def fd_now():
        with torch.no_grad():
            x = torch.cat([method.generate(method.generator(), z, c) for z, c in  # the EMA where there is one
                           zip(problem.z.split(500), problem.c.split(500) if problem.c is not None else [None] * 99)])
        return problem.metrics(x)

    floor = problem.exact()['fd']

    def evaluate(g_steps, cpu_s):
        m = fd_now()
        return dict(g_steps=g_steps, cpu_s=cpu_s, excess_fd=m['fd'] - floor, **m)

    cpu, step = 0.0, 0
    rows = [evaluate(0, 0.0)]
    best, best_G, stale = rows[0], copy.deepcopy(method.generator()), 0
    while stale < patience and method.num_g_steps < max_g_steps:
        g_before, t0 = method.num_g_steps, time.process_time()
        if method.num_g_steps == LR_DROP.get(arm) and method.lr == RECIPES[problem.name][arm][2]['lr']:
            method.lr, method.fake_lr = method.lr / 10, method.fake_lr / 10
        method.step([real_round(gmm, problem.label_dim, seed, step, B, with_data)], step * B)
        cpu += time.process_time() - t0
        step += 1
        if method.num_g_steps > g_before and method.num_g_steps % every == 0:
            rows.append(evaluate(method.num_g_steps, cpu))
            if rows[-1]['excess_fd'] < best['excess_fd'] * (1 - tol):
                best, best_G, stale = rows[-1], copy.deepcopy(method.generator()), 0
            else:
                stale += 1
            if len(rows) % 5 == 0:
                log(f'  {arm} seed {seed}: G step {method.num_g_steps}, FD {rows[-1]["fd"]:.3f} (best {best["fd"]:.3f} '
                    f'at {best["g_steps"]}), {cpu / 60:.1f} CPU min')
    return rows, best_G.eval().requires_grad_(False), best['g_steps']


def exact_metrics(net, ref, num, labels):
    """toy.py's metrics of a network on seeds 0..num-1 (its sampling spec; generate.py's label draw) and the floor,
    with the excess FD over the floor."""
    m = toy_cli.measure(toy_cli.network_batches(net, ref, num, labels), ref, labels)
    keys = ('fd', 'mode_tv', 'precision', 'spread')
    return dict({k: m['images'][k] for k in keys}, excess_fd=m['images']['fd'] - m['floor']['fd'],
                floor={k: m['floor'][k] for k in keys})


def exact_problem(name, problem16):
    """The exact mixture of a problem (its metrics' reference and the source of the "real" images) and the label
    rule of its measurement (generate.py's uniform classes, or unconditional)."""
    if name == 'uncond8':
        return toy.GMMDenoiser(**UNCOND8), 'none'
    with open(os.path.join(problem16, 'problem.json')) as f:
        kwargs = json.load(f)['problem']
    return toy.GMMDenoiser(**kwargs, label_dim=kwargs['num_components']), 'uniform'


# ----------------------------------------------------------------------------

@click.group()
def cli():
    """One-step students (dmd, dmd2, sid, sida) against the teacher on exact toy problems."""


@cli.command()
@click.option('--workdir',     help='Where teachers and results.json go', metavar='DIR', type=str, required=True)
@click.option('--problem16',   help='toy.py build directory of the conditional 16x16 problem', metavar='DIR', type=str, required=True)
@click.option('--problems',    help='Comma list of uncond8, cond16', metavar='LIST', type=str, default='uncond8,cond16', show_default=True)
@click.option('--arms',        help='Comma list of dmd, dmd2, sid, sida', metavar='LIST', type=str, default='dmd,dmd2,sid,sida', show_default=True)
@click.option('--seeds',       help='Comma list of training seeds (paired across arms)', metavar='LIST', type=str, default='0,1,2', show_default=True)
@click.option('--num',         help='Images of the exact measurement', metavar='INT', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--num-eval',    help='Fixed latents of the stop rule\'s FD', metavar='INT', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--every',       help='G steps between stop-rule evaluations', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--patience',    help='Evaluations without improvement before stopping', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--tol',         help='Relative excess-FD improvement that counts', metavar='FLOAT', type=click.FloatRange(min=0), default=0.03, show_default=True)
@click.option('--max-g-steps', help='Cap on G steps', metavar='INT', type=click.IntRange(min=1), default=2000, show_default=True)
@click.option('--threads',     help='Torch threads (the cores are shared)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
def run(workdir, problem16, problems, arms, seeds, num, num_eval, every, patience, tol, max_g_steps, threads):
    """Train and measure every (problem, seed, arm) not yet in results.json."""
    torch.set_num_threads(threads)
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, 'results.json')
    rule = dict(num_eval=num_eval, every=every, patience=patience, tol=tol, max_g_steps=max_g_steps, num=num,
                criterion='excess_fd')
    results = load_json(out, dict(rule=rule, teacher={}, runs={}))
    if results['rule'] != rule:
        raise click.ClickException(f'{out} was measured with {results["rule"]}, not {rule}: use another --workdir')
    for name in problems.split(','):
        if name not in RECIPES:
            raise click.BadParameter(f'unknown problem "{name}"; pick from {", ".join(RECIPES)}', param_hint='--problems')
        problem = load_problem(name, workdir, problem16, num_eval)
        gmm, labels = exact_problem(name, problem16)
        ref = dict(means=gmm.means.numpy(), stds=gmm.stds.numpy(), weights=gmm.weights.numpy())
        if name not in results['teacher']:
            click.echo(f'{name}: measuring the teacher (18 Heun steps) on {num} images...')
            results['teacher'][name] = exact_metrics(problem.teacher, ref, num, labels)
            save_json(out, results)
        for seed in [int(s) for s in seeds.split(',')]:
            for arm in arms.split(','):
                key = f'{name}/{arm}/seed{seed}'
                if key in results['runs']:
                    continue
                if arm not in RECIPES[name]:
                    raise click.BadParameter(f'unknown arm "{arm}"; pick from {", ".join(RECIPES[name])}', param_hint='--arms')
                click.echo(f'{key}:')
                try:
                    rows, G, best_step = train(problem, arm, seed, gmm, every, patience, tol, max_g_steps, click.echo)
                except ValueError as e:  # a recipe this problem's teacher cannot run (e.g. the GAN head's 8x8 bottleneck)
                    results['runs'][key] = dict(refused=str(e))
                    click.echo(f'  refused: {e}')
                    save_json(out, results)
                    continue
                t0 = time.process_time()
                m = exact_metrics(G, ref, num, labels)
                results['runs'][key] = dict(rows=rows, best_g_steps=best_step, train_cpu_s=rows[-1]['cpu_s'],
                                            best_cpu_s=next(r['cpu_s'] for r in rows if r['g_steps'] == best_step),
                                            measure_cpu_s=time.process_time() - t0, **m)
                save_json(out, results)
                click.echo(f'  stopped at G step {rows[-1]["g_steps"]}, best {best_step}: FD {m["fd"]:.4f}, excess '
                           f'{m["excess_fd"]:.4f} (teacher {results["teacher"][name]["excess_fd"]:.4f})')


@cli.command()
@click.option('--workdir', help='Where results.json is (repeat to merge the workdirs of parallel processes)', metavar='DIR', type=str, required=True, multiple=True)
def report(workdir):
    """Markdown table: per problem and arm, mean and 95% bootstrap interval over seeds."""
    merged = None
    for path in workdir:
        results = load_json(os.path.join(path, 'results.json'), None)
        if results is None:
            raise click.ClickException(f'No results.json in "{path}"; run the bench first')
        if merged is None:
            merged = results
            continue
        for name, t in results['teacher'].items():  # the same rule and teacher, so that the seeds are comparable
            if results['rule'] != merged['rule'] or merged['teacher'].setdefault(name, t) != t:
                raise click.ClickException(f'"{path}" was measured with another rule or teacher than "{workdir[0]}"')
        merged['runs'].update(results['runs'])
    click.echo(table(merged))


def table(results):
    rule = results['rule']
    measure = 'excess FD (over exact samples\' FD at that count)' if rule.get('criterion') == 'excess_fd' else 'FD'
    lines = [f'Stop rule: {measure} on {rule["num_eval"]} fixed latents every {rule["every"]} G steps; stop after '
             f'{rule["patience"]} evaluations without a {rule["tol"]:.0%} improvement (cap {rule["max_g_steps"]}); the '
             f'best evaluation\'s generator measured on {rule["num"]} images. Mean [95% bootstrap interval over seeds].', '']
    cell = lambda v, f='{:.4f}': (f + ' [' + f + ', ' + f + ']').format(*bootstrap_ci(v)) if len(v) > 1 else f.format(v[0])
    for name, t in results['teacher'].items():
        lines += [f'**{name}**: teacher (35 NFE) FD {t["fd"]:.4f}, excess {t["excess_fd"]:.4f}, mode TV {t["mode_tv"]:.4f}, '
                  f'precision {t["precision"]:.3f}, spread {t["spread"]:.3f}; floor FD {t["floor"]["fd"]:.4f}.', '',
                  '| arm | seeds | FD | excess FD | excess / teacher\'s | mode TV | precision | spread | best G step | '
                  'stopped at | CPU min to best | CPU min total |', '|---' * 12 + '|']
        arms = {}
        for key, run in results['runs'].items():
            problem, arm, _seed = key.split('/')
            if problem == name:
                arms.setdefault(arm, []).append(run)
        for arm, runs in arms.items():
            done = [r for r in runs if 'refused' not in r]
            if not done:
                lines.append(f'| {arm} | refused: {runs[0]["refused"]} |' + ' |' * 10)
                continue
            get = lambda k: [r[k] for r in done]
            lines.append('| ' + ' | '.join([
                arm, str(len(done)), cell(get('fd')), cell(get('excess_fd')),
                cell([r['excess_fd'] / t['excess_fd'] for r in done], '{:.2f}'), cell(get('mode_tv')),
                cell(get('precision'), '{:.3f}'), cell(get('spread'), '{:.3f}'), cell(get('best_g_steps'), '{:.0f}'),
                cell([r['rows'][-1]['g_steps'] for r in done], '{:.0f}'),
                cell([r['best_cpu_s'] / 60 for r in done], '{:.1f}'), cell([r['train_cpu_s'] / 60 for r in done], '{:.1f}')]) + ' |')
        lines += ['', 'Curves (stop-rule FD on the fixed latents, every 50 G steps; CPU min in brackets):', '']
        for key, run in results['runs'].items():
            if key.startswith(name + '/') and 'rows' in run:
                lines.append(f'- {key}: ' + ', '.join(f'{r["g_steps"]}: {r["fd"]:.2f} ({r["cpu_s"] / 60:.1f})'
                                                      for r in run['rows'] if r['g_steps'] % 50 == 0))
        lines.append('')
    return '\n'.join(lines)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    cli()
