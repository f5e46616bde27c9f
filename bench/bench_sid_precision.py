"""bf16 against fp32 for SiD's generator gradient on an official-size CIFAR-10 network (EDM's DDPM++ cond VP: 55.7M
parameters), on the CPU: one batch, the same weights, draws and labels, the backbones run in fp32 and then under bf16
autocast (training/networks.py backbone_precision). Reports the relative error (L2 norm of the difference over the
fp32 norm) of y_r - y_f, of the loss and of G's whole gradient, beside fp32's own floor: the same fp32 gradient
summed per sample instead of over the batch (another float32 summation order).

The weights are EDM's initialisation with every tensor perturbed (std 0.02; EDM zero-initialises output layers), the
fake score a further 0.1% away from the teacher, so that y_r - y_f is small next to y as in training.

    python bench/bench_sid_precision.py                 # batch 2, about a minute on one CPU thread
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import networks  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.distill.sid import SiD  # noqa: E402
from training.samplers import karras_sigma  # noqa: E402

# EDM's edm-cifar10-32x32-cond-vp.pkl configuration (EDM train.py --arch=ddpmpp --precond=vp --cond=1).
CIFAR10 = dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', embedding_type='positional',
               encoder_type='standard', decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
               model_channels=128, channel_mult=[2, 2, 2], dropout=0.13, augment_dim=9)


def generator_gradient(sid, rounds, precision):
    """G's gradient of SiD's generator loss (x100, as trained) summed over `rounds`, backbones in `precision`."""
    sid.G.zero_grad(set_to_none=True)
    total = 0.0
    with networks.backbone_precision(precision):
        for r in rounds:
            x = sid.generate(sid.G, r.randn('z_g', *sid.img_shape), r.labels)
            loss = sid.g_loss_scale * sid.distribution_matching_loss(x, r, r.labels).sum()
            loss.backward()
            total += float(loss.detach())
    grads = [p.grad.flatten() for p in sid.G.parameters() if p.grad is not None]  # map_augment: no augment labels
    return torch.cat(grads), total


def score_difference(sid, r, precision):
    """(y_r - y_f, y_r) at the generator loss's x_t for round r."""
    with torch.no_grad(), networks.backbone_precision(precision):
        x = sid.generate(sid.G, r.randn('z_g', *sid.img_shape), r.labels)
        t = r.rand('sid_t') * (sid.t_max / 1000)
        sigma = karras_sigma(1 - t, 0.002, 80.0, 7.0)
        x_t = x + sigma.view(-1, 1, 1, 1) * r.randn('sid_n', *sid.img_shape)
        y_r = sid.real(x_t, sigma, r.labels)
        return y_r - sid.fake(x_t, sigma, r.labels), y_r


def rel(a, b):
    return float((a - b).norm() / b.norm())


@click.command()
@click.option('--batch', help='Images in the batch', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--seed', help='Weights and draws', type=int, default=0, show_default=True)
@click.option('--fake-offset', help='Fake score = teacher + this x mean|w| noise per tensor', type=float, default=1e-3, show_default=True)
def main(batch, seed, fake_offset):
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    teacher = networks.VPPrecond(**CIFAR10)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    teacher.eval().requires_grad_(False)
    sid = SiD(teacher, 'cpu', batch, augment_p=0, ema_halflife_kimg=None)
    with torch.no_grad():
        for p in sid.fake.parameters():
            p.add_(torch.randn_like(p) * fake_offset * p.abs().mean())
    print(f'DDPM++ cond: {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M parameters, batch {batch}')
    labels = torch.eye(10)[torch.arange(batch) % 10]
    rand = StepRandom(seed, 0, batch, 'cpu')
    whole = [Round(None, labels, rand, 0, batch)]
    single = [Round(None, labels[i:i + 1], rand, i, 1) for i in range(batch)]

    t0 = time.time()
    g32, l32 = generator_gradient(sid, whole, 'fp32')
    t1 = time.time()
    g32s, _ = generator_gradient(sid, single, 'fp32')
    t2 = time.time()
    g16, l16 = generator_gradient(sid, whole, 'bf16')
    t3 = time.time()
    (d32, y32), (d16, _) = score_difference(sid, whole[0], 'fp32'), score_difference(sid, whole[0], 'bf16')
    print(f'|y_r - y_f| / |y_r| in fp32:                   {rel(y32 - d32, y32):.3g}')
    print(f'relative error of y_r - y_f, bf16 vs fp32:     {rel(d16, d32):.3g}')
    print(f'relative error of the loss, bf16 vs fp32:      {abs(l16 - l32) / abs(l32):.3g}')
    print(f'relative error of G\'s gradient, bf16 vs fp32:  {rel(g16, g32):.3g}')
    print(f'fp32 floor (per-sample vs batch summation):    {rel(g32s, g32):.3g}')
    print(f'cosine(bf16 gradient, fp32 gradient):          {float(torch.nn.functional.cosine_similarity(g16, g32, dim=0)):.6f}')
    print(f'seconds: fp32 {t1 - t0:.1f}, fp32 per-sample {t2 - t1:.1f}, bf16 {t3 - t2:.1f}')


if __name__ == '__main__':
    main()
