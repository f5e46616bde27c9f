"""DisBack's faster-convergence claim, tested against DMD on two exact toy problems (issue 18).

    python toy.py build --outdir=/tmp/edb18/toy16                                # the conditional 16x16 default
    OMP_NUM_THREADS=1 python bench/bench_disback.py pilot --workdir=/tmp/edb18 --problem16=/tmp/edb18/toy16
    OMP_NUM_THREADS=1 nohup python bench/bench_disback.py run --workdir=/tmp/edb18 --problem16=/tmp/edb18/toy16 \
        --plan=bench/bench_disback_plan.json &
    python bench/bench_disback.py report --workdir=/tmp/edb18                    # markdown tables from results.json

Problems: `uncond8`, an unconditional 8x8x3 mixture of 10 components whose small SongUNet teacher is fitted here
(cached as WORKDIR/teacher-uncond8.pkl), and `cond16`, toy.py's default conditional 16x16 problem and its fitted
teacher. For each problem, s_init in {80, 2.5} and paired seed, one stage 1 records a path (N = 8, nodes placed by
distance from the teacher, run until the probe's denoising loss plateaus); then five arms train G for the same
number of generator steps with the same optimiser, update ratio, batch, learning rates and random streams:
`dmd`; `init`, DMD whose fake score starts from s'_N (the initialisation effect alone: the path {s'_0, s'_N});
`db2`, `db4`, `db8`, DisBack on the nodes {0, 4, 8}, {0, 2, 4, 6, 8} and all 9 of the recorded path (distance
placement picks the N = 4 and N = 2 nodes at the same targets, i/N of the distance), switching every K2 generator
steps with N*K2 about a third of the steps DMD needs to reach 2x the teacher's FD (the pilot's). SiD arms (issue
19): `sid` and `sid-db4` (DisBack on SiD, on a path recorded by SiD's own stage 1), beside the DMD arms of the same
problem, s_init and seeds.

Measured every few generator steps on fixed latents (balanced classes for cond16): pixel FD against the exact
mixture and mode-coverage TV (training/toy.py). Compute is counted in network evaluations, not seconds (the machine
is shared): images through a network's forward pass, plus two per image for each backward pass (forward hooks; the
evaluations themselves are not counted), in units of one DMD generator step at update ratio 1 (8 passes per image
of the batch). The stage-1 compute is charged to `init` and `db*`. Results are written after every run to
WORKDIR/results.json (a run already there is skipped, so an interrupted bench continues).
"""

import copy
import json
import math
import os
import pickle
import shutil
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import samplers, toy  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.distill.disback import DisBack, SiDDisBack, node_path  # noqa: E402
from training.distill.dmd import DMD  # noqa: E402
from training.distill.sid import SiD  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402

UNCOND8 = dict(img_resolution=8, img_channels=3, num_components=10, seed=0)
UNCOND8_NET = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[],
                   dropout=0)
ARMS = {'dmd': None, 'init': [0, 8], 'db2': [0, 4, 8], 'db4': [0, 2, 4, 6, 8], 'db8': list(range(9)),  # path nodes
        'sid': None, 'sid-db4': [0, 2, 4, 6, 8],  # SiD and DisBack on SiD (issue 19), on a path of SiD's own stage 1
        'official': 'all'}  # DisBack's released schedule (issue 24): every node of its own stage 1 (see official_stage1)
OFFICIAL_EVERY, OFFICIAL_SWITCH = 100, 1000  # official: a node every 100 stage-1 updates; the target moves every 1000 fake updates
STAGE1_SEED = 1 << 20  # stage 1's random streams: step indices apart from stage 2's

# ----------------------------------------------------------------------------
# Problems: teacher, exact metrics, fixed evaluation latents.

class Problem:
    def __init__(self, name, teacher, means, stds, weights, num_eval):
        self.name, self.teacher = name, teacher
        self.label_dim = teacher.label_dim
        K = len(weights)
        self.means, self.stds = means, stds
        self.weights = np.full(K, 1 / K) if self.label_dim else weights  # balanced labels for conditional problems
        self.shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
        self.z = torch.randn([num_eval, *self.shape], generator=torch.Generator().manual_seed(123))
        self.c = torch.eye(K)[torch.arange(num_eval) % K] if self.label_dim else None

    def metrics(self, images):
        """FD against the exact mixture and mode TV of float images quantised like PNGs."""
        x = toy.from_uint8(toy.to_uint8(images).numpy())
        m = toy.mixture_metrics([x], self.means, self.stds, self.weights)
        return dict(fd=m['fd'], mode_tv=m['mode_tv'])

    def teacher_reference(self):
        """The teacher's 18-step Heun samples (35 NFE) and exact samples, on the evaluation count."""
        with torch.no_grad():
            x = torch.cat([samplers.sample(self.teacher, z, c, num_steps=18)
                           for z, c in zip(self.z.split(250), self.c.split(250) if self.c is not None else [None] * 99)])
        return dict(teacher=self.metrics(x), exact=self.exact())

    def exact(self):
        """The metrics of exact samples on the evaluation count (FD's floor there: its finite-sample bias)."""
        g = torch.Generator().manual_seed(1 << 31)
        n = len(self.z)
        k = torch.arange(n) % len(self.weights) if self.label_dim else None
        exact, _ = toy.sample_mixture(torch.as_tensor(self.means), torch.as_tensor(self.stds),
                                      torch.as_tensor(self.weights), n, generator=g, class_idx=k)
        return self.metrics(exact)


def fit_uncond8_teacher(gmm, num_steps=400, batch_size=128):
    """uncond8's teacher: a small SongUNet regressed onto the mixture's exact denoiser (deterministic on CPU)."""
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, **UNCOND8_NET).train().requires_grad_(True)
    for _ in toy.fit_denoiser(net, gmm, num_steps=num_steps, batch_size=batch_size, seed=1):
        pass
    return net.eval().requires_grad_(False)


def load_problem(name, workdir, problem16, num_eval):
    if name == 'uncond8':
        path = os.path.join(workdir, 'teacher-uncond8.pkl')
        gmm = toy.GMMDenoiser(**UNCOND8)
        if not os.path.isfile(path):
            net = fit_uncond8_teacher(gmm)
            dnnlib.util.atomic_write(path, lambda f: pickle.dump(dict(ema=net), f))
        with open(path, 'rb') as f:
            teacher = persistence.load(f)['ema']
        return Problem(name, teacher, gmm.means.numpy(), gmm.stds.numpy(), gmm.weights.numpy(), num_eval)
    teacher = persistence.load_network_pkl(os.path.join(problem16, 'teacher-unet.pkl')).eval().requires_grad_(False)
    with np.load(os.path.join(problem16, 'reference.npz')) as ref:
        return Problem(name, teacher, ref['means'], ref['stds'], ref['weights'], num_eval)

# ----------------------------------------------------------------------------
# Compute: network evaluations, from forward hooks.

class PassCounter:
    """Images through every hooked network's forward pass, plus 2 per image for the backward of passes that build a
    graph (grad enabled, and the network's parameters or its input require grad: SiD differentiates through both
    score networks' inputs)."""

    def __init__(self, nets):
        self.passes, self.on = 0, True
        for net in nets:
            net.register_forward_hook(self._hook)

    def _hook(self, module, inputs, _output):
        if self.on:
            grad = torch.is_grad_enabled() and (inputs[0].requires_grad or any(p.requires_grad for p in module.parameters()))
            self.passes += inputs[0].shape[0] * (3 if grad else 1)


def method_nets(method):
    nets = [method.G, method.fake, method.real]
    return nets + [method.target_net] if hasattr(method, 'target_net') else nets

# ----------------------------------------------------------------------------
# Stage 1 (shared by the arms of a seed) and the arms.

def dmd_kwargs(setting, sigma_init):
    return dict(sigma_init=sigma_init, lr=setting['lr'], fake_lr=setting['fake_lr'], fake_steps=setting['fake_steps'],
                ema_halflife_kimg=None, max_grad_norm=10)


def sid_kwargs(setting, sigma_init):
    """SiD's own settings (equal G and fake lr, Adam betas (0, 0.999), one fake update per G update), with the DMD
    arms' batch, clipping and no EMA."""
    return dict(sigma_init=sigma_init, lr=setting['sid_lr'], fake_lr=setting['sid_lr'], ema_halflife_kimg=None,
                max_grad_norm=10)


def make_method(arm, teacher, setting, sigma_init, **kwargs):
    """The method of an arm: DMD or SiD, with DisBack's walk on top when given a path or a stage-1 run dir."""
    sid = arm.startswith('sid')
    walk = 'path' in kwargs or 'run_dir' in kwargs
    cls = (SiDDisBack if walk else SiD) if sid else (DisBack if walk else DMD)
    return cls(teacher, 'cpu', setting['batch'], **(sid_kwargs if sid else dmd_kwargs)(setting, sigma_init), **kwargs)


def one_step(method, seed, step, batch):
    method.step([Round(None, None, StepRandom(seed, step, batch, 'cpu'), 0, batch)], step * batch)


def official_stage1(stage1, setting):
    """The official arm's stage 1 (train.py --path-place=official): the plan's length, at the generator lr, a node
    every 100 updates (placed by update count, fixed length)."""
    return dict(stage1, lr=setting['lr'], place='even', stop='fixed', nodes=stage1['max_updates'] // OFFICIAL_EVERY)


def run_stage1(problem, setting, sigma_init, seed, stage1, run_dir, log, arm='dmd'):
    """Record a path of N nodes (stage1['nodes'], default 8; the plan's placement and stop) in run_dir with the base
    method of `arm` (its fake-score noise levels and optimizer); returns compute and path.json."""
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    torch.manual_seed(seed)
    B = setting['batch']
    method = make_method(arm, copy.deepcopy(problem.teacher), setting, sigma_init, run_dir=run_dir,
                         path_nodes=stage1.get('nodes', 8),
                         path_steps=stage1['max_updates'], path_place=stage1['place'], stage1_lr=stage1['lr'],
                         stage1_stop=stage1['stop'], stage1_window=stage1['window'], stage1_tol=stage1['tol'])
    counter = PassCounter(method_nets(method))
    step = 0
    while method.stage == 1:
        one_step(method, STAGE1_SEED + seed, step, B)
        step += 1
    with open(os.path.join(run_dir, 'path.json')) as f:
        table = json.load(f)
    dists = ', '.join(f'{n["to_teacher"]:.3f}' for n in table['nodes'])
    log(f'  stage 1: {step} updates, {counter.passes / (8 * B):.1f} units, to teacher {dists}; first interval '
        f'{table["first_interval_share"]:.0%}')
    return dict(updates=step, compute=counter.passes / (8 * B), path=table)


def subset_path(stage1_dir, nodes, out_dir):
    """A recorded path made of some nodes of another (hard links): path-000 ... path-00M."""
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    for i, node in enumerate(nodes):
        os.link(node_path(stage1_dir, node), node_path(out_dir, i))


def run_arm(problem, arm, setting, sigma_init, seed, path_dir, switch_every, g_steps, at, log):
    """Train one arm for g_steps generator steps; FD and mode TV at the generator steps `at` (and 0), with the
    compute so far."""
    torch.manual_seed(seed)
    B = setting['batch']
    teacher = copy.deepcopy(problem.teacher)
    walk = dict(path=path_dir, switch_every=switch_every) if path_dir is not None else {}
    method = make_method(arm, teacher, setting, sigma_init, **walk)
    counter = PassCounter(method_nets(method))
    rows, step = [], 0

    def evaluate():
        counter.on = False
        with torch.no_grad():
            x = torch.cat([method.generate(method.G, z, c) for z, c in
                           zip(problem.z.split(500), problem.c.split(500) if problem.c is not None else [None] * 99)])
        counter.on = True
        rows.append(dict(g_steps=method.num_g_steps, compute=counter.passes / (8 * B), node=getattr(method, 'node', 0),
                         **problem.metrics(x)))

    evaluate()
    while method.num_g_steps < g_steps:
        g_before = method.num_g_steps
        one_step(method, seed, step, B)
        step += 1
        if method.num_g_steps > g_before and method.num_g_steps in at:
            evaluate()
    r = rows[-1]
    fds = ' '.join(f'{x["fd"]:.2f}' for x in rows[::max(len(rows) // 8, 1)])
    log(f'  {arm:5s} seed {seed}: FD {fds} ... {r["fd"]:.3f}  mode TV {r["mode_tv"]:.3f}  '
        f'switches {getattr(method, "switches", [])}')
    return rows

# ----------------------------------------------------------------------------
# Analysis: steps to reach a threshold, bootstrap confidence intervals.

def crossing(rows, limit, key='g_steps'):
    """The first point where FD <= limit, interpolated linearly in log FD between evaluations (None: never)."""
    for a, b in zip(rows, rows[1:]):
        if b['fd'] <= limit:
            if a['fd'] <= limit:
                return a[key]
            t = (math.log(a['fd']) - math.log(limit)) / (math.log(a['fd']) - math.log(b['fd']))
            return a[key] + t * (b[key] - a[key])
    return rows[0][key] if rows[0]['fd'] <= limit else None


def run_log_fd(rows, key='g_steps', offset=0.0, end=None):
    """Mean log FD over the run (trapezoids along G steps, or along compute shifted by the stage-1 compute, FD
    being G0's until then, up to `end`): its difference between two arms is the log of their geometric-mean FD
    ratio, a convergence summary that no threshold censors."""
    x = np.array([0.0] + [r[key] + offset for r in rows])
    f = np.log([rows[0]['fd']] + [r['fd'] for r in rows])
    end = x[-1] if end is None else end
    grid = np.union1d(x[x <= end], [end])
    y = np.interp(grid, x, f)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(grid)).sum() / end)


def threshold(reference):
    """FD at which the excess FD over exact samples (the finite-count floor, same count) is 2x the teacher's:
    2 FD_teacher - FD_exact. Raw FD at 1,000 images is mostly floor on the 16x16 problem (teacher 3.31, exact 2.83,
    G0 at s_init 80 5.79), so 2x the raw FD would be met before training."""
    return 2 * reference['teacher']['fd'] - reference['exact']['fd']


def bootstrap_ci(values, reps=10000, seed=0):
    """Mean and 95% percentile bootstrap interval of the mean, resampling seeds."""
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=[reps, len(v)])
    means = v[idx].mean(axis=1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))

# ----------------------------------------------------------------------------

def save_json(path, data):
    dnnlib.util.atomic_write(path, lambda f: f.write(json.dumps(data, indent=1)), mode='w')


def load_json(path, default):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


@click.group()
def cli():
    """DisBack against DMD on exact toy problems."""


COMMON = [
    click.option('--workdir',   help='Where teachers, paths and results go', metavar='DIR', type=str, required=True),
    click.option('--problem16', help='toy.py build directory of the conditional 16x16 problem', metavar='DIR', type=str, required=True),
    click.option('--threads',   help='Torch threads (the cores are shared)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True),
]


def common(f):
    for option in reversed(COMMON):
        f = option(f)
    return f


SID_LR = 1e-5  # SiD's G and fake lr on uncond8 (its arms only), from the pilot in docs/BENCHMARKS.md
SETTINGS = {  # G lr, fake lr, fake updates per G update, batch: identical for every arm of a setting
    'main8': dict(lr=3e-4, fake_lr=1e-3, fake_steps=3, batch=16, sid_lr=SID_LR),  # uncond8: DMD diverged at ratio 1 in the pilot
    'equal8': dict(lr=3e-4, fake_lr=3e-4, fake_steps=3, batch=16),  # equal G and fake lr (DMD2, official code)
    'main16': dict(lr=2e-4, fake_lr=2e-3, fake_steps=1, batch=16),  # cond16: bench_dmd_toy.py's recipe, batch 16
}


@cli.command()
@common
@click.option('--problems',   help='Problems', metavar='LIST', type=str, default='uncond8,cond16', show_default=True)
@click.option('--sigmas',     help='s_init values', metavar='LIST', type=str, default='80,2.5', show_default=True)
@click.option('--lrs',        help='Stage-1 learning rates to compare', metavar='LIST', type=str, default='2e-3,2e-4,5e-5', show_default=True)
@click.option('--max-updates', help='Stage-1 cap', metavar='INT', type=click.IntRange(min=8), default=300, show_default=True)
@click.option('--dmd-steps',  help='DMD pilot length (G steps)', metavar='INT', type=click.IntRange(min=1), default=300, show_default=True)
@click.option('--num-eval',   help='Images per evaluation', metavar='INT', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--what',       help='stage1, dmd or both', type=click.Choice(['stage1', 'dmd', 'both']), default='both', show_default=True)
@click.option('--setting',    help='Setting of the DMD pilot and of stage 1 (its batch)', type=click.Choice(sorted(SETTINGS)), default='main16', show_default=True)
def pilot(workdir, problem16, threads, problems, sigmas, lrs, max_updates, dmd_steps, num_eval, what, setting):
    """Stage-1 paths at several learning rates, and DMD's steps to 2x the teacher's excess FD (seed 0)."""
    torch.set_num_threads(threads)
    out = os.path.join(workdir, 'pilot.json')
    result = load_json(out, {})
    for name in problems.split(','):
        problem = load_problem(name, workdir, problem16, num_eval)
        ref = result.setdefault(name, {}).setdefault('reference', problem.teacher_reference())
        click.echo(f'{name}: teacher FD {ref["teacher"]["fd"]:.3f}, exact {ref["exact"]["fd"]:.3f}')
        for sigma in [float(s) for s in sigmas.split(',')]:
            if what in ('stage1', 'both'):
                for lr in [float(v) for v in lrs.split(',')]:
                    key = f'stage1/s{sigma:g}/lr{lr:g}'
                    if key in result[name]:
                        continue
                    click.echo(f'{name} s_init {sigma:g} stage-1 lr {lr:g}:')
                    t0 = time.time()
                    stage1 = dict(lr=lr, max_updates=max_updates, place='distance', stop='fixed', window=25, tol=0.01)
                    r = run_stage1(problem, SETTINGS[setting], sigma, 0, stage1, os.path.join(workdir, 'pilot-stage1'), click.echo)
                    r['seconds'] = time.time() - t0
                    result[name][key] = r
                    save_json(out, result)
            if what in ('dmd', 'both'):
                key = f'dmd/s{sigma:g}'
                if key not in result[name]:
                    click.echo(f'{name} s_init {sigma:g} DMD:')
                    t0 = time.time()
                    rows = run_arm(problem, 'dmd', SETTINGS[setting], sigma, 0, None, None, dmd_steps,
                                   range(10, dmd_steps + 1, 10), click.echo)
                    result[name][key] = dict(rows=rows, seconds=time.time() - t0,
                                             steps_2x=crossing(rows, threshold(ref)))
                    save_json(out, result)
                click.echo(f'  steps to 2x teacher FD: {result[name][key]["steps_2x"]}, '
                           f'{result[name][key]["seconds"]:.0f} s')


@cli.command()
@common
@click.option('--plan',       help='JSON file of the design (see docs/BENCHMARKS.md)', metavar='JSON', type=str, required=True)
def run(workdir, problem16, threads, plan):
    """The benchmark: every (problem, setting, s_init, seed) of the plan, stage 1 then the arms."""
    torch.set_num_threads(threads)
    with open(plan) as f:
        plan = json.load(f)
    out = os.path.join(workdir, 'results.json')
    results = load_json(out, dict(plan=plan, reference={}, stage1={}, runs={}))
    t_start = time.time()
    for block in plan['blocks']:
        problem = load_problem(block['problem'], workdir, problem16, plan['num_eval'][block['problem']])
        if block['problem'] not in results['reference']:
            results['reference'][block['problem']] = problem.teacher_reference()
            save_json(out, results)
        setting = SETTINGS[block['setting']]
        for seed in block['seeds']:  # seed-major: an interrupted bench has fewer seeds of every s_init
            for sigma in block['sigmas']:
                base = f'{block["problem"]}/{block["setting"]}/s{sigma:g}/seed{seed}'
                for arm in block['arms']:
                    key = f'{base}/{arm}'
                    if key in results['runs']:
                        continue
                    # Stage 1 depends on the base method, batch, s_init and its own lr only: one per (problem, base
                    # method, s_init, seed), shared by that base's arms.
                    base_key = 'sid/' if arm.startswith('sid') else 'official/' if arm == 'official' else ''
                    stage1_key = f'{block["problem"]}/{base_key}s{sigma:g}/seed{seed}'
                    stage1_dir = os.path.join(workdir, 'paths', stage1_key.replace('/', '-'))
                    stage1 = plan['stage1'][block['problem']]
                    if arm == 'official':
                        stage1 = official_stage1(stage1, setting)
                    nodes = ARMS[arm] if ARMS[arm] != 'all' else list(range(stage1['nodes'] + 1))
                    if ARMS[arm] is not None and (stage1_key not in results['stage1']
                                                  or not os.path.isfile(node_path(stage1_dir, stage1.get('nodes', 8)))):
                        click.echo(f'{stage1_key}: stage 1 ({time.time() - t_start:.0f} s)')
                        r = run_stage1(problem, setting, sigma, seed, stage1, stage1_dir, click.echo, arm)
                        results['stage1'][stage1_key] = r
                        save_json(out, results)
                    click.echo(f'{key} ({time.time() - t_start:.0f} s)')
                    path_dir = None
                    if ARMS[arm] is not None:
                        path_dir = os.path.join(workdir, 'subsets', f'{stage1_key.replace("/", "-")}-{arm}')
                        subset_path(stage1_dir, nodes, path_dir)
                    n = len(nodes) - 1 if ARMS[arm] else 0
                    k2 = max(round(block['backtrack_steps'][f'{sigma:g}'] / n), 1) if n > 1 else None
                    if arm == 'official':  # the official switch: every 1000 fake-score updates
                        k2 = max(OFFICIAL_SWITCH // setting['fake_steps'], 1)
                    t0 = time.time()
                    rows = run_arm(problem, arm, setting, sigma, seed, path_dir, k2, plan['g_steps'], plan['eval_at'],
                                   click.echo)
                    results['runs'][key] = dict(rows=rows, switch_every=k2, seconds=time.time() - t0,
                                                stage1_compute=results['stage1'][stage1_key]['compute'] if path_dir else 0.0)
                    save_json(out, results)
    click.echo(f'Done in {time.time() - t_start:.0f} s')


@cli.command()
@click.option('--workdir', help='Where results.json is', metavar='DIR', type=str, required=True)
def report(workdir):
    """Markdown tables: steps and compute to 2x the teacher's FD (bootstrap CIs), FD and mode TV curves."""
    results = load_json(os.path.join(workdir, 'results.json'), None)
    if results is None:
        raise click.ClickException(f'No results.json in "{workdir}"; run the bench first')
    click.echo(tables(results))


def threshold_cells(runs, dmd, limit):
    """Table cells of one arm for one threshold: G steps to reach it, the paired difference to DMD, and the compute
    to reach it including stage 1 (means and 95% bootstrap intervals over the seeds that reached it)."""
    seeds = sorted(runs)
    fmt = lambda v, sign='': ('{:' + sign + '.0f} [{:' + sign + '.0f}, {:' + sign + '.0f}]').format(*bootstrap_ci(v))
    note = lambda v: '' if len(v) == len(seeds) else f' ({len(v)} of {len(seeds)})'
    steps = {k: crossing(runs[k]['rows'], limit) for k in seeds}
    reached = [v for v in steps.values() if v is not None]
    comp = [crossing(runs[k]['rows'], limit, 'compute') + runs[k]['stage1_compute'] for k in seeds if steps[k] is not None]
    d = [steps[k] - crossing(dmd[k]['rows'], limit) for k in seeds if k in dmd and steps[k] is not None
         and crossing(dmd[k]['rows'], limit) is not None]
    return [fmt(reached) + note(reached) if reached else 'not reached',
            fmt(d, '+') + note(d) if d and runs is not dmd else '-',
            fmt(comp) + note(comp) if comp else '-']


def stage1_note(results, prefix, label):
    """One sentence on the stage-1 runs whose key starts with prefix ('' when there are none)."""
    stage1 = [v for k, v in results['stage1'].items() if k.startswith(prefix)]
    if not stage1:
        return ''
    updates = [v['updates'] for v in stage1]
    return (f' {label} ({len(stage1)} seeds): {np.mean(updates):.0f} updates ({min(updates)}-{max(updates)}), '
            f'{np.mean([v["compute"] for v in stage1]):.1f} units of compute; s\'_N '
            f'{np.mean([v["path"]["nodes"][-1]["to_teacher"] for v in stage1]):.4f} from the teacher, s\'_1 at '
            f'{np.mean([v["path"]["first_interval_share"] for v in stage1]):.0%} of that.')


def tables(results):
    """Per (problem, setting, s_init): stage 1; steps and compute to two FD thresholds, the FD ratio to DMD over the
    run, the final FD; then the FD and mode TV curves."""
    groups = {}
    for key, run in results['runs'].items():
        problem, setting, sigma, seed, arm = key.split('/')
        groups.setdefault((problem, setting, sigma), {}).setdefault(arm, {})[seed] = run
    lines = []
    for (problem, setting, sigma), arms in groups.items():
        ref = results['reference'][problem]
        dmd = arms['dmd']
        fd0 = next(iter(dmd.values()))['rows'][0]['fd']  # G0: the same for every arm and seed
        limits = [threshold(ref), ref['exact']['fd'] + (fd0 - ref['exact']['fd']) / 2]
        s = SETTINGS[setting]
        notes = [stage1_note(results, f'{problem}/{base}{sigma}/', label) for base, label in [
            ('', 'Stage 1'), ('sid/', 'SiD\'s stage 1'), ('official/', 'The official arm\'s stage 1')]]
        lines += [f'### {problem}, s_init {sigma[1:]}, setting {setting}: G lr {s["lr"]:g}, fake lr {s["fake_lr"]:g}, '
                  f'{s["fake_steps"]} fake updates per G update, batch {s["batch"]}'
                  + (f'; SiD arms: G and fake lr {s["sid_lr"]:g}, one fake update per G update' if 'sid' in arms else ''), '',
                  f'Teacher FD {ref["teacher"]["fd"]:.3f}, exact samples {ref["exact"]["fd"]:.3f}, G0 {fd0:.3f} '
                  f'({results["plan"]["num_eval"][problem]} images). Thresholds: T2, 2x the teacher\'s excess FD over '
                  f'exact samples (FD <= {limits[0]:.3f}); Th, half of G0\'s excess FD (FD <= {limits[1]:.3f}).'
                  + ''.join(notes), '',
                  '| arm | seeds | K2 | G steps to T2 | minus DMD | compute to T2 | G steps to Th | minus DMD | compute to '
                  'Th | FD over the run / DMD\'s: along G steps; along compute | final FD (min-max) | final mode TV |',
                  '|---' * 12 + '|']
        for arm, runs in arms.items():
            seeds = sorted(runs)
            ratio = '-'
            if arm != 'dmd':
                d = [run_log_fd(runs[k]['rows']) - run_log_fd(dmd[k]['rows']) for k in seeds if k in dmd]
                c = [run_log_fd(runs[k]['rows'], 'compute', runs[k]['stage1_compute'], dmd[k]['rows'][-1]['compute'])
                     - run_log_fd(dmd[k]['rows'], 'compute') for k in seeds if k in dmd]
                ratio = '{:.2f} [{:.2f}, {:.2f}]; {:.2f} [{:.2f}, {:.2f}]'.format(*np.exp(bootstrap_ci(d)),
                                                                                  *np.exp(bootstrap_ci(c)))
            final = [np.mean([r['fd'] for r in runs[k]['rows'][-3:]]) for k in seeds]
            tv = [np.mean([r['mode_tv'] for r in runs[k]['rows'][-3:]]) for k in seeds]
            cells = [arm, len(seeds), runs[seeds[0]]['switch_every'] or '-', *threshold_cells(runs, dmd, limits[0]),
                     *threshold_cells(runs, dmd, limits[1]), ratio, f'{np.mean(final):.2f} ({min(final):.2f}-{max(final):.2f})',
                     f'{np.mean(tv):.3f}']
            lines.append('| ' + ' | '.join(map(str, cells)) + ' |')
        steps = [r['g_steps'] for r in next(iter(dmd.values()))['rows']]
        lines += ['', '| FD (mode TV), mean over seeds, at G steps | ' + ' | '.join(map(str, steps)) + ' |',
                  '|---' * (len(steps) + 1) + '|']
        for arm, runs in arms.items():
            fd = np.mean([[r['fd'] for r in runs[k]['rows']] for k in runs], axis=0)
            tv = np.mean([[r['mode_tv'] for r in runs[k]['rows']] for k in runs], axis=0)
            lines.append(f'| {arm} | ' + ' | '.join(f'{a:.2f} ({b:.2f})' for a, b in zip(fd, tv)) + ' |')
        lines.append('')
    return '\n'.join(lines)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    cli()
