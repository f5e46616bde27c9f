"""Network speed: images/s of the official CIFAR-10 (DDPM++ cond) and ImageNet-64 (ADM) configs, forward and
forward+backward, optionally side by side with a copy of EDM's training/networks.py (same weights, same inputs,
interleaved iterations, so the ratio comes from one run on one machine).

    python bench/bench_networks.py --batch=8 --device=cpu --reference=/tmp/edm_ref/networks.py
"""

import importlib.util
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from training import networks  # noqa: E402

# The official configurations of EDM's train.py (EDMPrecond keywords), as used for the released teachers.
CONFIGS = {
    'cifar10': dict(img_resolution=32, img_channels=3, label_dim=10, model_type='SongUNet', augment_dim=9,
                    model_channels=128, channel_mult=[2,2,2], num_blocks=4, attn_resolutions=[16], dropout=0.13),
    'imagenet64': dict(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet', augment_dim=0,
                       model_channels=192, channel_mult=[1,2,3,4], num_blocks=3, attn_resolutions=[32,16,8], dropout=0.10),
}

# ----------------------------------------------------------------------------

# Import a networks.py from a file path; it needs `torch_utils.persistence`, which this repository provides.
def load_reference(path):
    if not os.path.isfile(path):
        raise click.BadParameter(f'{path} is not a file; pass a copy of EDM\'s training/networks.py', param_hint='--reference')
    name = '_edm_reference_networks'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # persistent_class looks the defining module up by name
    spec.loader.exec_module(module)
    return module


# Replace the zero/near-zero initial layers by fan-in scaled noise, so outputs and gradients are not trivial.
@torch.no_grad()
def randomize_weights_(net, seed):
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return net


# One timed call, synchronised on CUDA so the clock sees the work.
def timed(fn, device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# Inputs as in training: x = y + n*sigma with sigma log-normal, one-hot labels, zero augmentation labels.
def make_inputs(config, batch, device, seed):
    g = torch.Generator().manual_seed(seed)
    res, C = config['img_resolution'], config['img_channels']
    sigma = (torch.randn([batch], generator=g) * 1.2 - 1.2).exp()
    x = torch.randn([batch, C, res, res], generator=g) * (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25).sqrt()
    labels = torch.eye(config['label_dim'])[torch.randint(config['label_dim'], [batch], generator=g)]
    kwargs = dict(augment_labels=torch.zeros([batch, config['augment_dim']])) if config['augment_dim'] else {}
    to = lambda t: t.to(device)
    return to(x), to(sigma), to(labels), {k: to(v) for k, v in kwargs.items()}


# Median seconds per iteration of each implementation, timed in alternation after warm-up.
def bench_pair(nets, inputs, mode, warmup, iters, device):
    x, sigma, labels, kwargs = inputs

    def step(net):
        if mode == 'forward':
            with torch.no_grad():
                net(x, sigma, labels, **kwargs)
        else:
            net(x, sigma, labels, **kwargs).square().mean().backward()
            net.zero_grad(set_to_none=True)

    for net in nets.values():
        net.train(mode != 'forward')
        for _ in range(warmup):
            step(net)
    times = {name: [] for name in nets}
    for _ in range(iters):
        for name, net in nets.items():
            times[name].append(timed(lambda: step(net), device))
    return {name: statistics.median(t) for name, t in times.items()}

# ----------------------------------------------------------------------------

@click.command()
@click.option('--batch', help='Images per call', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--device', help='cpu or cuda', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--configs', help='Comma list of configs', default='cifar10,imagenet64', show_default=True)
@click.option('--modes', help='Comma list of forward, backward (= forward+backward)', default='forward,backward', show_default=True)
@click.option('--warmup', help='Untimed iterations per implementation', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--iters', help='Timed iterations (median reported)', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--fp16', help='use_fp16 (CUDA only; the CPU is always fp32)', is_flag=True)
@click.option('--reference', help='Path to EDM\'s training/networks.py to time side by side', metavar='PATH', default=None)
@click.option('--seed', help='Seed for weights and inputs', type=int, default=0, show_default=True)
@click.option('--threads', help='CPU threads (default: torch\'s choice)', type=click.IntRange(min=1), default=None)
def main(batch, device, configs, modes, warmup, iters, fp16, reference, seed, threads):
    """Print images/s of this project's networks (and of EDM's reference, with --reference)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('CUDA is not available on this machine; use --device=cpu', param_hint='--device')
    configs = configs.split(',')
    modes = modes.split(',')
    for name in configs:
        if name not in CONFIGS:
            raise click.BadParameter(f'unknown config "{name}"; choose from {", ".join(CONFIGS)}', param_hint='--configs')
    for mode in modes:
        if mode not in ['forward', 'backward']:
            raise click.BadParameter(f'unknown mode "{mode}"; use forward and/or backward', param_hint='--modes')
    ref_module = load_reference(reference) if reference is not None else None

    print(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {batch}, '
          f'warmup {warmup}, iters {iters}, fp16 {fp16}')
    for name in configs:
        config = CONFIGS[name]
        torch.manual_seed(seed)
        nets = {'ours': randomize_weights_(networks.EDMPrecond(use_fp16=fp16, **config), seed).to(device)}
        if ref_module is not None:
            nets['edm'] = ref_module.EDMPrecond(use_fp16=fp16, **config).to(device)
            nets['edm'].load_state_dict(nets['ours'].state_dict(), strict=True)
        inputs = make_inputs(config, batch, device, seed)
        if ref_module is not None:
            with torch.no_grad():
                D = {k: net.eval()(*inputs[:3], **inputs[3]) for k, net in nets.items()}
            err = ((D['ours'] - D['edm']).abs().max() / D['edm'].abs().max()).item()
            print(f'{name}: max |D_ours - D_edm| / max |D_edm| = {err:.2e}')
        for mode in modes:
            t = bench_pair(nets, inputs, mode, warmup, iters, device)
            line = f'{name:10s} {mode:8s} ' + '  '.join(f'{k} {batch / v:8.2f} img/s ({v * 1e3:8.1f} ms)' for k, v in t.items())
            if 'edm' in t:
                line += f'  speedup {t["edm"] / t["ours"]:.3f}x'
            print(line, flush=True)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
