"""DisBack against DMD on an exact toy problem: pixel FD and mode coverage against generator steps and total compute.

    python bench/bench_disback.py --workdir=/tmp/disback-bench    # builds the problem once, then 3 seeds x 2 methods

The problem: an unconditional 8x8x3 Gaussian mixture of 10 components (training/toy.py) and a small SongUNet fitted
to its exact denoiser, which is the teacher. Both methods start G and the fake score from that teacher with the same
DMD settings; DisBack first records its path (stage 1) and then backtracks along it. Compute is counted in network
passes over images (forward 1, backward 2), measured with forward hooks, and reported in units of one DMD generator
step (8 passes per image), so stage 1 is charged to DisBack. Results go to WORKDIR/results.json and a table.
"""

import copy
import json
import os
import pickle
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from torch_utils import persistence  # noqa: E402
from training import toy  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.distill.disback import DisBack  # noqa: E402
from training.distill.dmd import DMD  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402

PROBLEM = dict(img_resolution=8, img_channels=3, num_components=10, seed=0)
NET = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)

# ----------------------------------------------------------------------------

def build_teacher(workdir, fit_steps, log):
    """The fitted unconditional teacher (cached as WORKDIR/teacher.pkl) and the exact mixture."""
    gmm = toy.GMMDenoiser(**PROBLEM)
    path = os.path.join(workdir, 'teacher.pkl')
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            return persistence.load(f)['ema'], gmm
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=0, **NET).train().requires_grad_(True)
    t0 = time.time()
    for step, loss in toy.fit_denoiser(net, gmm, num_steps=fit_steps, batch_size=128, seed=1):
        if (step + 1) % 100 == 0:
            log(f'  fit step {step + 1}/{fit_steps}  loss {loss:.4f}  {time.time() - t0:.0f} s')
    net.eval().requires_grad_(False)
    os.makedirs(workdir, exist_ok=True)
    dnnlib.util.atomic_write(path, lambda f: pickle.dump(dict(ema=net), f))
    return net, gmm


def metrics(gmm, images):
    """FD against the exact mixture, mode-coverage TV and precision, of float images [N,C,H,W] quantised like PNGs."""
    x = toy.from_uint8(toy.to_uint8(images).numpy())
    return toy.mixture_metrics([x], gmm.means.numpy(), gmm.stds.numpy(), gmm.weights.numpy())


def teacher_heun(teacher, gmm, num):
    """The teacher's own 18-step Heun samples: the quality a one-step student could reach at best."""
    from training import samplers
    z = torch.randn([num, 3, 8, 8], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x = torch.cat([samplers.sample(teacher, zb, None, num_steps=18) for zb in z.split(250)])
    return metrics(gmm, x)


def exact_floor(gmm, num):
    """The same metrics for exact samples at the same count: the best any generator can score here."""
    x, _ = gmm.sample(num, generator=torch.Generator().manual_seed(1 << 31))
    return metrics(gmm, x)


class PassCounter:
    """Images through each network's forward pass, from forward hooks."""

    def __init__(self, nets):
        self.forward = 0
        for net in nets:
            net.register_forward_hook(self._hook)

    def _hook(self, _module, inputs, _output):
        self.forward += inputs[0].shape[0]


def run_arm(method_name, teacher, gmm, seed, opts, workdir, log):
    """Train one method; evaluate G every `eval_every` generator steps. Returns the list of evaluation rows."""
    torch.manual_seed(seed)
    kwargs = dict(sigma_init=80, lr=opts['lr'], fake_lr=opts['fake_lr'], fake_steps=opts['fake_steps'],
                  ema_halflife_kimg=None, max_grad_norm=10)
    teacher = copy.deepcopy(teacher)
    if method_name == 'dmd':
        method = DMD(teacher, 'cpu', opts['batch'], **kwargs)
        nets = [method.G, method.fake, method.real]
    else:
        run_dir = os.path.join(workdir, f'{method_name}-seed{seed}')
        os.makedirs(run_dir, exist_ok=True)
        nodes = 1 if method_name == 'disback-n1' else opts['nodes']  # ablation: fake from s'_1 ~ p_G0, target the teacher
        method = DisBack(teacher, 'cpu', opts['batch'], run_dir=run_dir, path_nodes=nodes,
                         path_steps=opts['stage1_steps'], switch_every=opts['switch_every'], **kwargs)
        nets = [method.G, method.fake, method.real, method.target_net]
    counter = PassCounter(nets)
    z = torch.randn([opts['num'], 3, 8, 8], generator=torch.Generator().manual_seed(123))
    B = opts['batch']
    backward = 0
    rows = []
    step = 0
    t_train = 0.0

    def evaluate():
        passes = counter.forward
        with torch.no_grad():
            x = torch.cat([method.generate(method.G, zb, None) for zb in z.split(500)])
        counter.forward = passes  # evaluation is not training compute
        m = metrics(gmm, x)
        rows.append(dict(g_steps=method.num_g_steps, loop_steps=step, compute=(counter.forward + 2 * backward) / (8 * B),
                         seconds=t_train, fd=m['fd'], mode_tv=m['mode_tv'], precision=m['precision'],
                         node=getattr(method, 'node', 0), stage=getattr(method, 'stage', 2)))

    evaluate()
    while method.num_g_steps < opts['g_steps']:
        g_before, stage_before = method.num_g_steps, getattr(method, 'stage', 2)
        t0 = time.time()
        method.step([Round(None, None, StepRandom(seed, step, B, 'cpu'), 0, B)], step * B)
        t_train += time.time() - t0
        step += 1
        backward += B * (1 + (method.num_g_steps > g_before))  # fake-score update, plus G's when it was updated
        if stage_before == 1:
            if method.stage == 2:  # stage 1 done: G is still G0, but the compute is spent
                evaluate()
            continue
        if method.num_g_steps > g_before and method.num_g_steps % opts['eval_every'] == 0:
            evaluate()
            r = rows[-1]
            log(f'  {method_name:7s} seed {seed}  G steps {r["g_steps"]:4d}  compute {r["compute"]:7.1f}  '
                f'FD {r["fd"]:8.4f}  mode TV {r["mode_tv"]:.3f}  node {r["node"]}  {t_train:.0f} s')
    return rows

# ----------------------------------------------------------------------------

@click.command()
@click.option('--workdir',      help='Where the teacher, paths and results go', metavar='DIR', type=str, required=True)
@click.option('--seeds',        help='Training seeds', metavar='LIST', type=str, default='0,1,2', show_default=True)
@click.option('--g-steps',      help='Generator steps per run', metavar='INT', type=click.IntRange(min=1), default=120, show_default=True)
@click.option('--batch',        help='Batch size', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--lr',           help='Generator learning rate', metavar='FLOAT', type=float, default=3e-4, show_default=True)
@click.option('--fake-lr',      help='Fake-score (and stage-1) learning rate', metavar='FLOAT', type=float, default=1e-3, show_default=True)
@click.option('--fake-steps',   help='DMD2 two-time-scale rule (both methods)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--stage1-steps', help='DisBack: K1', metavar='INT', type=click.IntRange(min=1), default=12, show_default=True)
@click.option('--nodes',        help='DisBack: N', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--switch-every', help='DisBack: K2 (generator steps)', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--eval-every',   help='Evaluate every this many generator steps', metavar='INT', type=click.IntRange(min=1), default=20, show_default=True)
@click.option('--num',          help='Samples per evaluation', metavar='INT', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--fit-steps',    help='Teacher fit (batch 128) when WORKDIR has none', metavar='INT', type=click.IntRange(min=1), default=400, show_default=True)
@click.option('--methods',      help='dmd, disback, disback-n1 (N = 1: no intermediate targets)', metavar='LIST', type=str, default='dmd,disback,disback-n1', show_default=True)
def main(workdir, seeds, methods, **opts):
    """DisBack against DMD on the exact toy problem."""
    torch.set_num_threads(1)  # the machine's cores are shared: one thread each avoids oversubscription
    log = lambda s: click.echo(s)
    teacher, gmm = build_teacher(workdir, opts['fit_steps'], log)
    floor = exact_floor(gmm, opts['num'])
    heun = teacher_heun(teacher, gmm, opts['num'])
    log(f'Exact samples at {opts["num"]}: FD {floor["fd"]:.4f}, mode TV {floor["mode_tv"]:.3f}; '
        f'teacher Heun-18: FD {heun["fd"]:.4f}, mode TV {heun["mode_tv"]:.3f}')
    results = dict(options=opts, floor=floor, teacher_heun=heun, runs={})
    for seed in [int(s) for s in seeds.split(',')]:
        for name in methods.split(','):
            results['runs'][f'{name}-{seed}'] = run_arm(name, teacher, gmm, seed, opts, workdir, log)
            dnnlib.util.atomic_write(os.path.join(workdir, 'results.json'),
                                     lambda f: f.write(json.dumps(results, indent=1)), mode='w')
    log(table(results))


def table(results):
    """Mean (min-max over seeds) FD and mode TV at each evaluated generator step, per method."""
    by_method = {}
    for key, rows in results['runs'].items():
        by_method.setdefault(key.rsplit('-', 1)[0], []).append(rows)
    lines = ['| method | G steps | compute (DMD G-steps) | seconds | FD mean (min-max) | mode TV mean (min-max) |',
             '|---|---|---|---|---|---|']
    for name, runs in by_method.items():
        for i in range(min(len(r) for r in runs)):
            fd = [r[i]['fd'] for r in runs]
            tv = [r[i]['mode_tv'] for r in runs]
            lines.append(f'| {name} | {runs[0][i]["g_steps"]} | {np.mean([r[i]["compute"] for r in runs]):.1f} | '
                         f'{np.mean([r[i]["seconds"] for r in runs]):.0f} | '
                         f'{np.mean(fd):.3f} ({min(fd):.3f}-{max(fd):.3f}) | {np.mean(tv):.3f} ({min(tv):.3f}-{max(tv):.3f}) |')
    return '\n'.join(lines)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
