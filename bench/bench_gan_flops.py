"""FLOPs of DMD2's GAN pass at the official network configurations: the whole fake-score UNet against the forward
stopped at its bottleneck (training/distill/dmd.py `Bottleneck`), counted by torch's FlopCounterMode on the meta
device (no memory, no weights, exact operator counts).

    python bench/bench_gan_flops.py
"""

import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import networks  # noqa: E402
from training.distill import kd  # noqa: E402
from training.distill.dmd import Bottleneck  # noqa: E402


def flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main():
    for name in ['cifar10', 'imagenet64']:
        config = dict(kd.TEACHER_CONFIGS[name])
        config.pop('class_name')
        with torch.device('meta'):
            net = networks.EDMPrecond(**config)
            x = torch.zeros([1, 3, config['img_resolution'], config['img_resolution']])
            sigma, c = torch.ones([1]), torch.zeros([1, config['label_dim']])
        full = flops(lambda: net(x, sigma, c))
        head = flops(lambda: Bottleneck(net)(x, sigma, c))
        print(f'{name:10s}  full forward {full / 1e9:7.2f} GFLOP/image  to the bottleneck {head / 1e9:7.2f}  '
              f'saved {1 - head / full:.1%} of each GAN pass')


if __name__ == '__main__':
    main()
