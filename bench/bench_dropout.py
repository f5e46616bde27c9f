"""Cost of dropout keyed by sample (training/networks.py keyed_dropout) against torch's dropout: seconds per
`--method=edm` training step (training.teacher.EDM, EDM loss, Adam, forward + backward + update), the three
variants timed in alternation in one process so that their ratio comes from one run on one machine.

    python bench/bench_dropout.py                       # the default toy problem's teacher size (16x16, 32 channels)
    python bench/bench_dropout.py --res=32 --cbase=128 --cres=2,2,2 --blocks=4 --batch=16   # CIFAR-10's DDPM++
"""

import contextlib
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.teacher import EDM  # noqa: E402

# ----------------------------------------------------------------------------

@click.command()
@click.option('--res', help='Image resolution', type=click.IntRange(min=4), default=16, show_default=True)
@click.option('--cbase', help='SongUNet model_channels', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--cres', help='channel_mult', default='1,2', show_default=True)
@click.option('--blocks', help='num_blocks', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--dropout', help='Dropout probability', type=click.FloatRange(0, 1, max_open=True), default=0.13, show_default=True)
@click.option('--batch', help='Images per step', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--iters', help='Timed steps per variant (median reported)', type=click.IntRange(min=1), default=15, show_default=True)
@click.option('--threads', help='CPU threads', type=click.IntRange(min=1), default=1, show_default=True)
def main(res, cbase, cres, blocks, dropout, batch, iters, threads):
    """Print seconds per EDM training step with keyed dropout, torch's dropout and no dropout."""
    torch.set_num_threads(threads)
    images = torch.rand([batch, 3, res, res]) * 2 - 1
    labels = torch.eye(10)[torch.arange(batch) % 10]
    dataset = dnnlib.EasyDict(resolution=res, num_channels=3, label_dim=10)

    def method(p):
        torch.manual_seed(0)
        net = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=cbase,
                   channel_mult=[int(c) for c in cres.split(',')], num_blocks=blocks, attn_resolutions=[], dropout=p)
        return EDM('cpu', dataset, batch, net, dict(class_name='training.loss.EDMLoss'),
                   dict(class_name='torch.optim.Adam', lr=1e-4), lr_rampup_kimg=0)

    variants = {'keyed': (method(dropout), Round.keyed_dropout),
                'torch': (method(dropout), lambda self: contextlib.nullcontext()),
                'none': (method(0), Round.keyed_dropout)}
    times = {name: [] for name in variants}
    for step in range(iters + 2):  # the first two steps warm up
        for name, (edm, context) in variants.items():
            Round.keyed_dropout = context
            t0 = time.perf_counter()
            edm.step([Round(images, labels, StepRandom(0, step, batch, 'cpu'), 0, batch)], step * batch)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    Round.keyed_dropout = variants['keyed'][1]
    print(f'torch {torch.__version__}, threads {threads}, {res}x{res}, channels {cbase} x [{cres}], {blocks} block(s), '
          f'batch {batch}, dropout {dropout}, {iters} steps each; ratios of steps timed back to back')
    for name in variants:
        ratios = [t / t_torch for t, t_torch in zip(times[name], times['torch'])]
        q = statistics.quantiles(ratios, n=4) if iters > 1 else ratios * 3
        print(f'{name:6s} median {statistics.median(times[name]):.4f} s/step, {q[1]:.3f} x torch dropout '
              f'(quartiles {q[0]:.3f}-{q[2]:.3f})')
    op_times(dropout, iters)


def op_times(p, iters, shape=(64, 128, 32, 32)):
    """The dropout op alone (its int64 hash over every element, forward only) against F.dropout, on one activation
    of CIFAR-10's DDPM++ at batch 64 (8.4M elements), timed in alternation."""
    from training import networks
    x = torch.randn(shape)
    keys = torch.arange(shape[0], dtype=torch.int64) * 2654435761 % 2**32
    ops = {'keyed': lambda: networks._dropout(x, p), 'torch': lambda: torch.nn.functional.dropout(x, p, training=True)}
    times = {name: [] for name in ops}
    with networks.keyed_dropout(keys):
        for i in range(iters + 2):
            for name, op in ops.items():
                if name == 'torch':  # outside the keyed block: torch's RNG
                    networks._keys, saved = None, networks._keys
                t0 = time.perf_counter()
                op()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
                if name == 'torch':
                    networks._keys = saved
    t = {name: statistics.median(v) for name, v in times.items()}
    print(f'op alone, {list(shape)}: keyed {t["keyed"] * 1e3:.1f} ms, F.dropout {t["torch"] * 1e3:.1f} ms '
          f'({t["keyed"] / t["torch"]:.2f} x), {t["keyed"] / x.numel() * 1e9:.2f} ns per element keyed')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
