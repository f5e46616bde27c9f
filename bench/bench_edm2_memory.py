"""Memory per GPU of DMD2/SiD distillation of EDM2 img64 teachers, estimated on the CPU (no GPU needed):
parameter counts of the official presets, and the activation bytes one image keeps for the backward pass of a
train-step forward (counted with saved-tensor hooks, fp32 and bf16 autocast), at 64x64 with 1000 classes.

    OMP_NUM_THREADS=1 python bench/bench_edm2_memory.py [--presets=xs,s]

Per GPU, for a recipe's per-GPU batch b: trained networks (G and the fake score) 16 bytes/parameter each (fp32
weights, gradients, two Adam moments), frozen networks (teacher, guiding network, EMA, each --phema profile) 4 bytes/
parameter, plus the larger backward pass's saved tensors (one network's forward with gradients): b x the bytes per
image plus the normalised weights EDM2 recomputes on every forward.
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import networks, networks_edm2  # noqa: E402

PRESETS = dict(xs=128, s=192, m=256, l=320, xl=384)  # model_channels (EDM2's img64 presets, NVlabs/edm2:train_edm2.py)


def build(channels):
    return networks_edm2.Precond(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=False, model_channels=channels)


def saved_bytes(net, precision, batch):
    """Bytes of the distinct tensors autograd saves for a forward of `batch` images (gradients on)."""
    seen = {}
    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    x = torch.randn([batch, 3, 64, 64])
    labels = torch.eye(1000)[[0] * batch]
    with networks.backbone_precision(precision), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, torch.ones([batch]), labels)
    return sum(seen.values())


def activation_bytes(net, precision):
    """(bytes per image, bytes per forward whatever the batch): the normalised weights EDM2 computes on every
    forward are saved too, so two batch sizes separate the two."""
    one, two = saved_bytes(net, precision, 1), saved_bytes(net, precision, 2)
    return two - one, 2 * one - two


@click.command()
@click.option('--presets', default='xs,s', show_default=True)
def main(presets):
    torch.manual_seed(0)
    for name in presets.split(','):
        net = build(PRESETS[name]).eval()  # eval: the distillation methods' mode (no dropout)
        params = sum(p.numel() for p in net.parameters())
        act = {p: activation_bytes(net, p) for p in ['fp32', 'bf16']}
        print(f'edm2-img64-{name}: {params:,} parameters; saved for backward: ' + ', '.join(
            f'{p} {a[0] / 2**20:.1f} MiB per image + {a[1] / 2**30:.2f} GiB per forward' for p, a in act.items()))
        del net


if __name__ == '__main__':
    main()
