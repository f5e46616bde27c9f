"""Images/s of one DMD training step (generator update + fake-score update) for the official teacher configs.

    python bench/bench_dmd_step.py --config=cifar10 --batch=8 --device=cpu
    python bench/bench_dmd_step.py --config=imagenet64 --batch=32 --device=cuda

The teacher has random weights (speed does not depend on them); the regression loss is off unless --reg=l2
(LPIPS needs its weights), which feeds the generator random stand-in pairs at the same cost as real ones.
"""

import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.batching import Round, StepRandom
from training.distill.dmd import DMD
from training.networks import EDMPrecond

CONFIGS = dict(
    cifar10=dict(img_resolution=32, img_channels=3, label_dim=10, augment_dim=9, model_type='SongUNet',
                 model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
    imagenet64=dict(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet', model_channels=192,
                    channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1, use_fp16=True),
)


class RandomPairs:
    """Stand-in for training.pairs.PairSet with random contents (same shapes and cost)."""

    def __init__(self, shape, label_dim, device):
        self.shape, self.label_dim, self.device = shape, label_dim, device

    def __len__(self):
        return 1000

    def get(self, indices):
        n = len(indices)
        c = torch.eye(self.label_dim, device=self.device)[torch.arange(n) % self.label_dim] if self.label_dim else None
        return torch.randn([n, *self.shape], device=self.device), torch.randn([n, *self.shape], device=self.device), c


@click.command()
@click.option('--config', type=click.Choice(sorted(CONFIGS)), default='cifar10', show_default=True)
@click.option('--batch', type=int, default=8, show_default=True)
@click.option('--iters', type=int, default=5, show_default=True)
@click.option('--warmup', type=int, default=2, show_default=True)
@click.option('--device', type=click.Choice(['cpu', 'cuda']), default='cuda' if torch.cuda.is_available() else 'cpu')
@click.option('--reg', type=click.Choice(['none', 'l2']), default='none', show_default=True)
@click.option('--fake-steps', type=int, default=1, show_default=True)
def main(config, batch, iters, warmup, device, reg, fake_steps):
    device = torch.device(device)
    torch.manual_seed(0)
    teacher = EDMPrecond(**CONFIGS[config]).to(device)
    dmd = DMD(teacher, device, batch_size=batch, fake_steps=fake_steps)
    if reg == 'l2':
        from training.batching import IndexStream
        from training.distances import make_distance
        dmd.pairs = RandomPairs(dmd.img_shape, dmd.label_dim, device)
        dmd.pair_stream = IndexStream(len(dmd.pairs))
        dmd.distance = make_distance('l2').to(device)
        dmd.reg_weight = 0.25
    times = []
    for step in range(warmup + iters):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dmd.step([Round(None, None, StepRandom(0, step, batch, device), 0, batch)], step * batch)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times[warmup:]))
    params = sum(p.numel() for p in teacher.parameters())
    print(f'{config} ({params:,} params), batch {batch}, {device.type}, reg={reg}, fake_steps={fake_steps}: '
          f'{t:.3f} s/step, {batch / t:.2f} images/s (median of {iters})')


if __name__ == '__main__':
    main()
