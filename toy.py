"""Exact toy problems: build one (dataset, analytic and fitted teachers, reference statistics), measure images on it.

    python toy.py build --outdir=toy/default
    python toy.py metrics --images=out/toy-heun --problem=toy/default --labels=uniform
    python toy.py metrics --network=toy/default/teacher-unet.pkl --problem=toy/default --num=10000 --labels=none

See training/toy.py for the mixture, its exact denoiser and the metrics.
"""

import json
import os
import pickle
import time

import click
import numpy as np
import torch

import dnnlib
from torch_utils import options
from training import toy

# ----------------------------------------------------------------------------
# Building a problem.

def fit_error(net, gmm, num=256, seed=1, sigmas=(0.002, 0.01, 0.05, 0.2, 0.5, 1, 2, 5, 20, 80)):
    """RMS of net - D* per sigma on a fixed set of noisy exact samples (conditional labels), in pixel units."""
    generator = torch.Generator().manual_seed(seed)
    x0, k = gmm.sample(num, generator=generator)
    labels = torch.nn.functional.one_hot(k, gmm.num_components).to(torch.float32) if net.label_dim else None
    n = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    errors = {}
    with torch.no_grad():
        for sigma in sigmas:
            x = x0 + sigma * n
            error = net(x.to(torch.float32), sigma, labels) - gmm(x, sigma, labels)
            errors[str(sigma)] = float(error.square().mean().sqrt())
    return errors


def dump_pickle(path, net, dataset_kwargs):
    """A snapshot-like {'ema': net, ...} dict in EDM's pickle protocol, written atomically."""
    data = dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs=dataset_kwargs)
    dnnlib.util.atomic_write(path, lambda f: pickle.dump(data, f))


def build(outdir, problem_kwargs, num_images, fit_kimg, fit_kwargs, net_kwargs, log=print):
    """Write problem.json, reference.npz, teacher-exact.pkl, dataset.zip and (fit_kimg > 0) the fitted teacher:
    teacher-unet.pkl (net_kwargs for training.networks.EDMPrecond) or, with net_kwargs class_name
    'training.networks_edm2.Precond', teacher-edm2.pkl."""
    import dataset_tool
    seed = problem_kwargs['seed']
    net_kwargs = dict(net_kwargs)
    class_name = net_kwargs.pop('class_name', 'training.networks.EDMPrecond')
    edm2 = class_name == 'training.networks_edm2.Precond'
    teacher_name = 'teacher-edm2.pkl' if edm2 else 'teacher-unet.pkl'
    outputs = ['problem.json', 'reference.npz', 'teacher-exact.pkl', 'dataset.zip', teacher_name]
    taken = [name for name in outputs if os.path.exists(os.path.join(outdir, name))]
    if taken:
        raise ValueError(f'"{outdir}" already holds {", ".join(taken)}; remove them or pick another --outdir')
    os.makedirs(outdir, exist_ok=True)
    K = problem_kwargs['num_components']
    gmm = toy.GMMDenoiser(**problem_kwargs, label_dim=K)
    R = gmm.img_resolution
    dataset_kwargs = dict(class_name='training.dataset.ImageFolderDataset', path=os.path.join(outdir, 'dataset.zip'),
                          use_labels=True, xflip=False, cache=True, resolution=R, max_size=num_images)

    # Exact statistics and the analytic teacher.
    mu, sigma = gmm.moments()
    ref = dict(mu=mu, sigma=sigma, means=gmm.means.numpy(), stds=gmm.stds.numpy(), weights=gmm.weights.numpy())
    dnnlib.util.atomic_write(os.path.join(outdir, 'reference.npz'), lambda f: np.savez(f, **ref))
    dump_pickle(os.path.join(outdir, 'teacher-exact.pkl'), gmm, dataset_kwargs)
    log(f'Exact teacher and reference statistics written (D = {mu.size}, K = {K}).')

    # The dataset: exact samples, quantised as images are, labelled with their component.
    t0 = time.time()
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for start in range(0, num_images, 10000):  # in chunks, to bound memory
        x, k = gmm.sample(min(10000, num_images - start), generator=generator)
        images.extend(toy.to_uint8(x).permute(0, 2, 3, 1).numpy())  # HWC
        labels.extend(k.tolist())
    dataset_tool.save_dataset(os.path.join(outdir, 'dataset.zip'), images, labels, [f'component{i}' for i in range(K)])
    log(f'dataset.zip: {num_images} exact samples in {time.time() - t0:.1f} s.')

    # The fitted UNet teacher.
    fit_steps = int(round(fit_kimg * 1000 / fit_kwargs['batch_size']))
    info = dict(problem=problem_kwargs, num_images=num_images, fit=dict(fit_kwargs, num_steps=fit_steps),
                net=net_kwargs if not edm2 else dict(class_name=class_name, **net_kwargs))
    if fit_steps > 0:
        torch.manual_seed(seed)
        # Recorded in the pickle: the zero label is unconditional (EDM2's Precond has no such keyword).
        dropout = {} if edm2 else dict(label_dropout=fit_kwargs['p_uncond'])
        net = dnnlib.util.construct_class_by_name(class_name=class_name, img_resolution=R, img_channels=gmm.img_channels,
                                                  label_dim=K, **net_kwargs, **dropout)
        num_params = sum(p.numel() for p in net.parameters())
        log(f'Fitting a {num_params / 1e6:.2f}M-parameter {"EDM2 UNet" if edm2 else net_kwargs["model_type"]} to D* '
            f'for {fit_steps} steps...')
        t0 = time.time()
        net.requires_grad_(True)
        with dnnlib.util.progress_bar(fit_steps, 'Fitting', unit='step') as bar:
            for _step, loss in toy.fit_denoiser(net, gmm, num_steps=fit_steps, seed=seed + 1, **fit_kwargs):
                bar.set_postfix(loss=f'{loss:.5f}', refresh=False)
                bar.update(1)
        net.eval().requires_grad_(False)
        info.update(num_params=num_params, fit_seconds=round(time.time() - t0, 1), fit_rms=fit_error(net, gmm))
        dump_pickle(os.path.join(outdir, teacher_name), net, dataset_kwargs)
        log(f'{teacher_name} written after {dnnlib.util.format_time(info["fit_seconds"])} (last loss {loss:.5f}); '
            f'RMS error vs D* per sigma: {info["fit_rms"]}')
    dnnlib.util.atomic_write(os.path.join(outdir, 'problem.json'), lambda f: f.write(json.dumps(info, indent=2)),
                             mode='w')
    return info

# ----------------------------------------------------------------------------
# Measuring images against a problem.

def load_reference(problem_dir):
    """reference.npz of a built problem as a dict of float64 arrays."""
    path = os.path.join(problem_dir, 'reference.npz')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'No reference.npz in "{problem_dir}"; build the problem with: python toy.py build '
                                f'--outdir={problem_dir}')
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def image_batches(path, num=None, batch=1000):
    """uint8 images of a folder or zip (sorted names, first `num`) as float64 batches [n, D] in [-1, 1]."""
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(path)
    num = len(dataset) if num is None else num
    if num > len(dataset):
        raise ValueError(f'--num={num} but "{path}" holds only {len(dataset)} images; generate more or lower --num')
    for start in range(0, num, batch):
        yield toy.from_uint8(np.stack([dataset[i][0] for i in range(start, min(start + batch, num))]))


def network_batches(net, ref, num, labels, batch=250, device='cpu', **sampler_kwargs):
    """Images sampled from a network (its sampling spec, else EDM's Heun), quantised like PNGs, as float64 batches.

    Seed i draws the latents then (labels 'uniform') the class from its own stream, exactly as generate.py does;
    labels 'weights' draw the class from the mixture's weights, 'none' samples unconditionally (label None).
    """
    from training import samplers
    if labels != 'none' and not net.label_dim:
        raise ValueError(f'--labels={labels} needs a conditional network; this one has label_dim=0, use --labels=none')
    weights = torch.as_tensor(ref['weights'])
    for start in range(0, num, batch):
        seeds = list(range(start, min(start + batch, num)))
        rnd = samplers.StackedRandomGenerator(device, seeds)
        latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
        class_labels = None
        if labels == 'uniform':
            class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)])]
        elif labels == 'weights':
            k = torch.cat([torch.multinomial(weights, 1, generator=g) for g in rnd.generators])  # after the latents
            class_labels = torch.eye(net.label_dim, device=device)[k]
        with torch.no_grad():
            x = samplers.sample(net, latents, class_labels, rnd.randn_like, **sampler_kwargs)
        yield toy.from_uint8(toy.to_uint8(x).cpu().numpy())


def floor_batches(ref, num, labels, seed=1 << 31, batch=10000):
    """The exact sampler's images at the same count (fixed seed, same label rule), quantised like PNGs."""
    means, stds, weights = (torch.as_tensor(ref[key]) for key in ('means', 'stds', 'weights'))
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, num, batch):
        n = min(batch, num - start)
        class_idx = torch.randint(len(weights), [n], generator=generator) if labels == 'uniform' else None
        x, _ = toy.sample_mixture(means, stds, weights, n, generator=generator, class_idx=class_idx)
        yield toy.from_uint8(toy.to_uint8(x).numpy())


def measure(batches, ref, labels):
    """Metrics of some images and of the exact sampler at the same count (the floor), both against the mixture
    with the weights their classes follow (uniform for labels 'uniform', else the problem's weights)."""
    K = len(ref['weights'])
    weights = np.full(K, 1 / K) if labels == 'uniform' else ref['weights']
    result = toy.mixture_metrics(batches, ref['means'], ref['stds'], weights)
    floor = toy.mixture_metrics(floor_batches(ref, result['num'], labels), ref['means'], ref['stds'], weights)
    return dict(num=result['num'], labels=labels, images=result, floor=floor)

# ----------------------------------------------------------------------------
# Command line.

@click.group()
def cli():
    """Exact toy problems: an image-space Gaussian mixture with known denoiser and statistics."""


@cli.command('build')
@click.option('--outdir',        help='Where to write the problem', metavar='DIR', type=str, required=True)
@click.option('--resolution',    help='Image resolution (the exact covariance is (3R^2)^2 float64s: 1.2 GB at 64)', metavar='INT', type=options.Int(min=2, max=64), default=16, show_default=True)
@click.option('--channels',      help='Colour channels', type=click.Choice(['1', '3']), default='3', show_default=True)
@click.option('--K', 'K',        help='Number of components (= classes)', metavar='INT', type=options.Int(min=1), default=10, show_default=True)
@click.option('--seed',          help='Seed of the problem, dataset and fit', metavar='INT', type=options.SEED, default=0, show_default=True)
@click.option('--num-images',    help='Exact samples in dataset.zip', metavar='INT', type=options.Int(min=1), default=50000, show_default=True)
@click.option('--fit-kimg',      help='Fitting duration in thousands of images, 0 = no UNet teacher', metavar='KIMG', type=options.Float(min=0), default=100, show_default=True)
@click.option('--fit-batch',     help='Fitting batch size', metavar='INT', type=options.BATCH, default=128, show_default=True)
@click.option('--fit-lr',        help='Adam learning rate (cosine decay)', metavar='FLOAT', type=options.Float(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--fit-p-uncond',  help='Share of all-zero labels (unconditional targets)', metavar='P', type=options.Float(0, 1), default=0.1, show_default=True)
@click.option('--fit-channels',  help='model_channels of the fitted teacher', metavar='INT', type=options.Int(min=1), default=32, show_default=True)
@click.option('--fit-mult',      help='channel_mult of the fitted teacher', metavar='LIST', type=str, default='1,2', show_default=True)
@click.option('--fit-blocks',    help='num_blocks of the fitted teacher', metavar='INT', type=options.Int(min=1), default=1, show_default=True)
@click.option('--arch',          help='Fitted teacher: EDM\'s SongUNet (teacher-unet.pkl) or EDM2\'s UNet (teacher-edm2.pkl)', type=click.Choice(['songunet', 'edm2']), default='songunet', show_default=True)
def build_cmd(outdir, resolution, channels, K, seed, num_images, fit_kimg, fit_batch, fit_lr, fit_p_uncond,
              fit_channels, fit_mult, fit_blocks, arch):
    """Build a problem: dataset.zip, teacher-exact.pkl, teacher-unet.pkl, reference.npz, problem.json."""
    if resolution & (resolution - 1):
        raise click.BadParameter(f'{resolution} is not a power of two (datasets need power-of-two images)', param_hint='--resolution')
    try:
        channel_mult = [int(m) for m in fit_mult.split(',')]
    except ValueError:
        raise click.BadParameter(f'"{fit_mult}" is not a comma-separated list of integers, e.g. 1,2', param_hint='--fit-mult')
    if resolution % (1 << (len(channel_mult) - 1)):
        raise click.BadParameter(f'{len(channel_mult)} levels need a resolution divisible by '
                                 f'{1 << (len(channel_mult) - 1)}', param_hint='--fit-mult')
    problem_kwargs = dict(img_resolution=resolution, img_channels=int(channels), num_components=K, seed=seed)
    # Half the noise levels log-uniform on [0.002, 80], so the sampler's high levels (where an unconditional model
    # picks its mode) get more of each batch than under EDM's log-normal.
    fit_kwargs = dict(batch_size=fit_batch, lr=fit_lr, p_uncond=fit_p_uncond, p_loguniform=0.5)
    net_kwargs = dict(model_type='SongUNet', model_channels=fit_channels, channel_mult=channel_mult,
                      num_blocks=fit_blocks, attn_resolutions=[], dropout=0)
    if arch == 'edm2':  # the same widths; float32 throughout, as on the CPU
        net_kwargs = dict(class_name='training.networks_edm2.Precond', use_fp16=False, model_channels=fit_channels,
                          channel_mult=channel_mult, num_blocks=fit_blocks, attn_resolutions=[])
    try:
        build(outdir, problem_kwargs, num_images, fit_kimg, fit_kwargs, net_kwargs, log=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e))
    except OSError as e:  # a full disk, a read-only --outdir, ...
        raise click.ClickException(dnnlib.util.os_error_message(e))
    click.echo(f'Done: {outdir}')


@cli.command('metrics')
@click.option('--problem',      help='Problem directory (from toy.py build)', metavar='DIR', type=str, required=True)
@click.option('--images',       help='Folder or zip of generated images', metavar='DIR|ZIP', type=str)
@click.option('--network',      help='Or: sample this network pickle (Heun, or its sampling spec)', metavar='PKL', type=str)
@click.option('--labels',       help='How classes were (are) drawn: uniform (generate.py), weights, none (uncond)', type=click.Choice(['uniform', 'weights', 'none']), default='uniform', show_default=True)
@click.option('--num',          help='Number of images  [default: all / 10000 for --network]', metavar='INT', type=options.Int(min=2))
@click.option('--steps', 'num_steps', help='Sampler steps for --network  [default: 18 or spec]', metavar='INT', type=options.Int(min=1))
@click.option('--trust-pickle', help='Allow code embedded in the pickle to run', is_flag=True)
@click.option('--out',          help='Also write the results as JSON', metavar='JSON', type=str)
def metrics_cmd(problem, images, network, labels, num, num_steps, trust_pickle, out):
    """Exact FD, mode coverage TV and precision, beside the exact sampler's own at the same count (the floor)."""
    if (images is None) == (network is None):
        raise click.UsageError('Pass exactly one of --images or --network')
    try:
        ref = load_reference(problem)
        if images is not None:
            batches = image_batches(images, num)
        else:
            from torch_utils import persistence
            net = persistence.load_network_pkl(network, allow_code=trust_pickle).eval().requires_grad_(False)
            batches = network_batches(net, ref, num or 10000, labels, num_steps=num_steps)
        result = measure(batches, ref, labels)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e))
    result.update(problem=problem, source=images or network)
    click.echo(f'{result["num"]} images from {result["source"]} (labels: {labels}) vs the exact mixture:')
    click.echo(f'{"":12s}{"images":>12s}{"floor":>12s}')
    for key, name in [('fd', 'FD'), ('mode_tv', 'mode TV'), ('precision', 'precision'), ('spread', 'spread')]:
        click.echo(f'{name:12s}{result["images"][key]:12.5f}{result["floor"][key]:12.5f}')
    if out is not None:
        try:
            dnnlib.util.atomic_write(out, lambda f: f.write(json.dumps(result, indent=2)), mode='w')
        except OSError as e:
            raise click.ClickException(dnnlib.util.os_error_message(e))

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    cli()
