"""Progressive and guided distillation on an exact toy problem: pixel FD and mode coverage per step count, and the
guided student's error to the exact guided denoiser.

    python bench/bench_progressive.py --workdir=/tmp/pd-bench    # fits the teacher once (cached), then both benches

The problem: a class-conditional 8x8x3 Gaussian mixture of 10 components (training/toy.py) and a small SongUNet
fitted to its exact denoiser D* (10% all-zero labels, so its zero label is the unconditional model); that network
is the teacher. Training images are exact mixture samples with their component as the label.

PD: the chain 16 -> 8 -> 4 -> 2 -> 1 (Euler steps on the nested grid). For each student N: the student's samples,
the teacher's own N- and 2N-step samples (2N is what the round distils), the exact denoiser's N-step samples (the
discretisation error alone) and the exact sampler at the same count (the floor), all with generate.py's seeds and
uniform random classes, quantised like PNGs.

Guided stage one: the w-conditioned student (guide: the teacher's zero label; EMA), measured on held-out noisy exact
samples against the exact guided mixture denoiser D*_c + w (D*_c - D*_u), beside the teacher's unguided D_c (the
student's starting point) and the teacher's own guided combination (the stage-one target, two evaluations).
"""

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
import toy as toy_cli  # noqa: E402  (the command-line module: sampling with generate.py's seeds, measuring)
from torch_utils import persistence  # noqa: E402
from training import toy  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.distill.guided import GuidedDistillation, cfg_target  # noqa: E402
from training.distill.progressive import ProgressiveDistillation  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402

PROBLEM = dict(img_resolution=8, img_channels=3, num_components=10, seed=0)
NET = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)
DATASET = dnnlib.EasyDict(resolution=8, num_channels=3, label_dim=10)

# ----------------------------------------------------------------------------

def build_teacher(workdir, fit_steps, log):
    """The fitted conditional teacher (cached as WORKDIR/teacher.pkl) and the exact mixture."""
    gmm = toy.GMMDenoiser(**PROBLEM, label_dim=10)
    path = os.path.join(workdir, 'teacher.pkl')
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            return persistence.load(f)['ema'], gmm
    torch.manual_seed(0)
    net = EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, label_dropout=0.1, **NET).requires_grad_(True)
    t0 = time.time()
    for step, loss in toy.fit_denoiser(net, gmm, num_steps=fit_steps, batch_size=128, p_uncond=0.1, seed=1):
        if (step + 1) % 250 == 0:
            log(f'  fit step {step + 1}/{fit_steps}  loss {loss:.4f}  {time.time() - t0:.0f} s')
    net.eval().requires_grad_(False)
    os.makedirs(workdir, exist_ok=True)
    dnnlib.util.atomic_write(path, lambda f: pickle.dump(dict(ema=net), f))
    return net, gmm


def train(method, gmm, num_steps, batch, seed, first_step=0):
    """num_steps updates on exact mixture samples, labelled with their component."""
    g = torch.Generator().manual_seed(seed + first_step)
    for step in range(first_step, first_step + num_steps):
        x, k = gmm.sample(batch, generator=g)
        labels = torch.eye(10)[k]
        method.step([Round(x.to(torch.float32), labels, StepRandom(seed, step, batch, 'cpu'), 0, batch)], step * batch)


def measure(net, ref, num, **sampler_kwargs):
    """FD, mode TV and precision of num samples (seeds 0..num-1, uniform classes) beside the exact floor."""
    result = toy_cli.measure(toy_cli.network_batches(net, ref, num, 'uniform', **sampler_kwargs), ref, 'uniform')
    pick = lambda m: {key: m[key] for key in ('fd', 'mode_tv', 'precision')}
    return dict(images=pick(result['images']), floor=pick(result['floor']))

# ----------------------------------------------------------------------------

def bench_pd(teacher, gmm, ref, opts, log):
    final_steps = opts.final_round_steps or opts.round_steps  # as the official configs: every round equally long
    rounds = dict(round_kimg=opts.round_steps * opts.batch / 1000, final_round_kimg=final_steps * opts.batch / 1000)
    method = ProgressiveDistillation(teacher, torch.device('cpu'), opts.batch, DATASET, start_steps=16, end_steps=1,
                                     optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=opts.lr), weight=opts.pd_weight,
                                     **rounds)
    euler = lambda N: dict(solver='euler', grid='nested', num_steps=N)
    rows = []
    step = 0
    for N, updates in method.schedule:
        t0 = time.time()
        train(method, gmm, updates, opts.batch, opts.seed, step)
        step += updates
        seconds = time.time() - t0
        student = method.snapshot()['ema']
        row = dict(N=N, updates=updates, train_seconds=round(seconds, 1), student=measure(student, ref, opts.num),
                   teacher_N=measure(teacher, ref, opts.num, **euler(N)),
                   teacher_2N=measure(teacher, ref, opts.num, **euler(2 * N)),
                   exact_N=measure(gmm, ref, opts.num, **euler(N)))
        rows.append(row)
        log(f'N={N}: {updates} updates in {seconds:.0f} s; FD student {row["student"]["images"]["fd"]:.4f}, teacher N '
            f'{row["teacher_N"]["images"]["fd"]:.4f}, teacher 2N {row["teacher_2N"]["images"]["fd"]:.4f}, exact D* N '
            f'{row["exact_N"]["images"]["fd"]:.4f}, floor {row["student"]["floor"]["fd"]:.4f}')
    return rows


def bench_guided(teacher, gmm, opts, log):
    method = GuidedDistillation(teacher, torch.device('cpu'), opts.batch, DATASET, guide='null', guidance_range=[0, 4],
                                optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=opts.lr),
                                ema_halflife_kimg=opts.guided_ema or None)
    t0 = time.time()
    train(method, gmm, opts.guided_steps, opts.batch, opts.seed + 1)
    seconds = time.time() - t0
    student = method.snapshot()['ema']

    # Held-out noisy exact samples at fixed noise levels; RMS error (pixel units) per w, averaged over the levels.
    g = torch.Generator().manual_seed(12345)
    sigmas = [0.05, 0.2, 0.5, 1, 2, 5, 20]
    x0, k = gmm.sample(256, generator=g)
    c = torch.eye(10)[k]
    rows = []
    for w in opts.eval_w:
        errors = dict(teacher_cond=[], teacher_cfg=[], student=[])
        for sigma in sigmas:
            x = (x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)).to(torch.float32)
            exact = toy.guided_denoiser(gmm, x, sigma, c, w)
            ws = torch.full([len(x)], float(w))
            with torch.no_grad():
                outputs = dict(teacher_cond=teacher(x, sigma, c), teacher_cfg=cfg_target(teacher, None, x, sigma, c, ws),
                               student=student(x, sigma, c, guidance=ws))
            for name, D in outputs.items():
                errors[name].append(float((D - exact).square().mean().sqrt()))
        rows.append(dict(w=w, **{name: float(np.mean(e)) for name, e in errors.items()}, per_sigma=dict(sigmas=sigmas, **errors)))
        log(f'w={w}: RMS vs exact guided D*: teacher D_c {rows[-1]["teacher_cond"]:.4f}, teacher CFG '
            f'{rows[-1]["teacher_cfg"]:.4f}, student {rows[-1]["student"]:.4f}')
    return dict(updates=opts.guided_steps, train_seconds=round(seconds, 1), rows=rows)

# ----------------------------------------------------------------------------

@click.command()
@click.option('--workdir',           help='Where the teacher and results go', metavar='DIR', type=str, required=True)
@click.option('--fit-steps',         help='Teacher fitting steps (batch 128)', metavar='INT', type=click.IntRange(min=1), default=1500, show_default=True)
@click.option('--batch',             help='Distillation batch', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--lr',                help='Adam learning rate (PD: decays linearly to 0 each round)', metavar='FLOAT', type=float, default=1e-3, show_default=True)
@click.option('--round-steps',       help='PD updates per round', metavar='INT', type=click.IntRange(min=1), default=300, show_default=True)
@click.option('--final-round-steps', help='PD updates of the rounds to 2 and 1 steps  [default: --round-steps]', metavar='INT', type=click.IntRange(min=1))
@click.option('--pd-weight',         help='PD loss weight', type=click.Choice(['snr-trunc', 'edm']), default='snr-trunc', show_default=True)
@click.option('--guided-steps',      help='Guided stage-one updates', metavar='INT', type=click.IntRange(min=1), default=1200, show_default=True)
@click.option('--guided-ema',        help='Guided student EMA half-life, 0 = none', metavar='KIMG', type=click.FloatRange(min=0), default=10, show_default=True)
@click.option('--eval-w',            help='Guidance strengths to evaluate', metavar='LIST', type=str, default='0,1,2,4', show_default=True)
@click.option('--num',               help='Samples per FD measurement', metavar='INT', type=click.IntRange(min=2), default=4000, show_default=True)
@click.option('--parts',             help='What to run', type=click.Choice(['pd', 'guided', 'pd,guided']), default='pd,guided', show_default=True)
@click.option('--seed',              help='Seed of the training data and noise', metavar='INT', type=int, default=0, show_default=True)
@click.option('--threads',           help='torch CPU threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
def main(**opts):
    """Progressive distillation 16 -> 1 and guided distillation stage one on an exact toy problem."""
    opts = dnnlib.EasyDict(opts)
    opts.eval_w = [float(w) for w in opts.eval_w.split(',')]
    torch.set_num_threads(opts.threads)
    log = lambda msg: print(msg, flush=True)
    os.makedirs(opts.workdir, exist_ok=True)
    t0 = time.time()
    teacher, gmm = build_teacher(opts.workdir, opts.fit_steps, log)
    log(f'Teacher ready ({time.time() - t0:.0f} s).')
    ref = dict(means=gmm.means.numpy(), stds=gmm.stds.numpy(), weights=gmm.weights.numpy())
    results = dict(options=dict(opts))
    if 'pd' in opts.parts:
        results['pd'] = bench_pd(teacher, gmm, ref, opts, log)
    if 'guided' in opts.parts:
        results['guided'] = bench_guided(teacher, gmm, opts, log)
    results['total_seconds'] = round(time.time() - t0, 1)
    path = os.path.join(opts.workdir, f'results-{opts.parts.replace(",", "-")}.json')
    dnnlib.util.atomic_write(path, lambda f: f.write(json.dumps(results, indent=2)), mode='w')
    log(f'Done in {results["total_seconds"]:.0f} s; results in {path}')


if __name__ == '__main__':
    main()
