"""Generate images from a diffusion network or a distilled generator: seeds -> PNGs, alone or under torchrun.

    python generate.py --network=edm-cifar10-32x32-cond-vp.pkl --outdir=out --seeds=0-63 --batch=64
    torchrun --standalone --nproc_per_node=2 generate.py --network=... --outdir=out --seeds=0-49999 --subdirs

Each image depends only on its seed, never on the batch size or the number of processes.
"""

import os

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import options
from torch_utils import persistence
from training import networks, samplers

# ----------------------------------------------------------------------------
# Command-line helpers.

def load_network(network_pkl, device='cpu', allow_code=False):
    """The network to sample from a snapshot pickle ({'ema': net, ...}) or a bare network pickle, path or URL (http(s)
    downloads are cached): in eval mode, without gradients, on `device`. A student carries its sampling spec."""
    net = persistence.load_network_pkl(network_pkl, allow_code=allow_code)
    return net.eval().requires_grad_(False).to(device)


def init_and_load(device, network_pkl, allow_code, what):
    """The command lines' start: check --device, init (torchrun-aware), load the network for inference with rank 0
    first, so that a URL is downloaded into the cache only once. Returns (device, net); one-line errors."""
    try:
        device = dist.init(device)
    except ValueError as e:  # a malformed $EDM_DISTILL_TIMEOUT_MIN
        raise click.ClickException(str(e))
    try:
        with dist.rank0_first():
            net = load_network(network_pkl, device, allow_code=allow_code)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'Cannot load {what} "{network_pkl}": {e}')
    return device, net

def autoguided(net, guide_pkl, guidance, device, allow_code):
    """--guide-net: `net` guided by the network in guide_pkl with weight `guidance` (EDM2's autoguidance)."""
    try:
        with dist.rank0_first():
            gnet = load_network(guide_pkl, device, allow_code=allow_code)
        return samplers.Autoguided(net, gnet, guidance)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'Cannot load guiding network "{guide_pkl}": {e}')


def inference_precision(net, device, precision):
    """--precision as a backbone precision: 'auto' is EDM's rule (the network's stored use_fp16: fp16 on CUDA)."""
    return precision if precision != 'auto' else networks.edm_precision(net, device)


precision_option = click.option('--precision', help='Backbone precision  [default: auto = the network\'s use_fp16 on CUDA, as EDM]',
                                type=click.Choice(['auto', 'fp32', 'bf16', 'fp16']), default='auto')

# ----------------------------------------------------------------------------
# Images.

def image_path(outdir, seed, subdirs=False):
    """outdir/{seed:06d}.png, or outdir/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    if subdirs:
        outdir = os.path.join(outdir, f'{seed - seed % 1000:06d}')
    return os.path.join(outdir, f'{seed:06d}.png')


def _to_pil(image):
    """uint8 CHW (1 or 3 channels) -> PIL image in mode 'L' or 'RGB'."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f'Expected a uint8 image of shape [1 or 3, H, W], got {image.dtype} {list(image.shape)}')
    hwc = image.transpose(1, 2, 0)
    return PIL.Image.fromarray(hwc[:, :, 0], 'L') if hwc.shape[2] == 1 else PIL.Image.fromarray(hwc, 'RGB')


def save_image(image, path):
    """Write one uint8 CHW image as PNG, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pil = _to_pil(image)
    dnnlib.util.atomic_write(path, lambda f: pil.save(f, format='PNG'))


def save_image_grid(images, path, grid_w, grid_h):
    """Tile uint8 NCHW images row by row into one grid_h x grid_w PNG (training previews)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] != grid_w * grid_h:
        raise ValueError(f'Expected {grid_w * grid_h} images (grid {grid_w}x{grid_h}) as NCHW, '
                         f'got shape {list(images.shape)}')
    _n, c, h, w = images.shape
    grid = images.reshape(grid_h, grid_w, c, h, w).transpose(2, 0, 3, 1, 4).reshape(c, grid_h * h, grid_w * w)
    save_image(grid, path)

# ----------------------------------------------------------------------------
# Generation core, shared with the training loop.

def check_class(net, class_idx):
    """A fixed class (or one per seed) needs a conditional network and indices below its label_dim."""
    if class_idx is None:
        return
    if not net.label_dim:
        raise ValueError(f'--class={class_idx} given, but the network is unconditional (label_dim=0); drop --class')
    for c in np.atleast_1d(class_idx).tolist():
        if not 0 <= c < net.label_dim:
            raise ValueError(f'--class={c} is out of range: the network has {net.label_dim} classes '
                             f'(0..{net.label_dim - 1})')


@torch.no_grad()
def generate_batch(net, seeds, device='cpu', class_idx=None, model_kwargs=None, **sampler_kwargs):
    """Seeds -> uint8 NCHW images on the CPU. Per seed: latents, then class label, then sampler noise.
    class_idx: None (random, drawn from the seed), one class, or a class per seed.
    model_kwargs go to every network call (e.g. guidance=w for a guided-distillation student)."""
    check_class(net, class_idx)
    if class_idx is not None and np.ndim(class_idx) and len(class_idx) != len(seeds):
        raise ValueError(f'{len(class_idx)} classes for {len(seeds)} seeds: give one class, or one per seed')
    rnd = samplers.StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    class_labels = None
    if net.label_dim:
        # Drawn even with a fixed class, so the noise that follows does not depend on --class.
        class_labels = torch.eye(net.label_dim, device=device)[rnd.randint(net.label_dim, size=[len(seeds)])]
        if class_idx is not None:
            class_labels = torch.zeros_like(class_labels)
            class_labels[torch.arange(len(seeds)), torch.as_tensor(class_idx)] = 1
    x = samplers.sample(net, latents, class_labels, rnd.randn_like, model_kwargs=model_kwargs, **sampler_kwargs)
    samplers.require_finite(x, seeds)  # NaN would become a black image
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu()


def generate_images(net, seeds, outdir, batch=64, device='cpu', subdirs=False, class_idx=None, progress=None,
                    model_kwargs=None, **sampler_kwargs):
    """Write {seed:06d}.png for every seed; rank r of W takes batches r, r+W, ...; returns this rank's paths.
    progress(n) is called after each batch of n images."""
    check_class(net, class_idx)
    samplers.sampler_settings(net, **sampler_kwargs)  # fail on every rank before any work
    batches = [seeds[i : i + batch] for i in range(0, len(seeds), batch)]
    my_batches = batches[dist.get_rank() :: dist.get_world_size()]
    paths = []
    for batch_seeds in my_batches:
        images = generate_batch(net, batch_seeds, device, class_idx=class_idx, model_kwargs=model_kwargs, **sampler_kwargs)
        for seed, image in zip(batch_seeds, images):
            paths.append(image_path(outdir, seed, subdirs))
            save_image(image.numpy(), paths[-1])
        if progress is not None:
            progress(len(batch_seeds))
    return paths

# ----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_pkl', help='Network pickle filename or URL', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir',                 help='Where to save the output images', metavar='DIR', type=str, required=True)
@click.option('--seeds',                  help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', type=options.IntList(max=options.MAX_SEED), default='0-63', show_default=True)
@click.option('--subdirs',                help='Create subdirectory for every 1000 seeds', is_flag=True)
@click.option('--class', 'class_idx',     help='Class label  [default: random]', metavar='INT', type=options.Int(min=0), default=None)
@click.option('--batch', 'batch',         help='Maximum batch size per process', metavar='INT', type=options.BATCH, default=64, show_default=True)
@click.option('--steps', 'num_steps',     help='Number of sampling steps  [default: 18 (EDM2 networks: 32) or the network\'s spec]', metavar='INT', type=options.Int(min=1))
@click.option('--sigma_min',              help='Lowest noise level  [default: 0.002, per --disc, or spec]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--sigma_max',              help='Highest noise level  [default: 80, per --disc, or spec]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--rho',                    help='Time step exponent  [default: 7 or spec]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--S_churn', 'S_churn',     help='Stochasticity strength  [default: 0]', metavar='FLOAT', type=options.Float(min=0))
@click.option('--S_min', 'S_min',         help='Stoch. min noise level  [default: 0]', metavar='FLOAT', type=options.Float(min=0))
@click.option('--S_max', 'S_max',         help='Stoch. max noise level  [default: inf]', metavar='FLOAT', type=options.Float(min=0))
@click.option('--S_noise', 'S_noise',     help='Stoch. noise inflation  [default: 1]', metavar='FLOAT', type=options.Float())
@click.option('--solver',                 help='Ablate ODE solver  [default: heun or spec]', type=click.Choice(['euler', 'heun']))
@click.option('--disc', 'discretization', help='Ablate time step discretization {t_i}  [default: edm]', type=click.Choice(['vp', 've', 'iddpm', 'edm']))
@click.option('--schedule',               help='Ablate noise schedule sigma(t)  [default: linear]', type=click.Choice(['vp', 've', 'linear']))
@click.option('--scaling',                help='Ablate signal scaling s(t)  [default: none]', type=click.Choice(['vp', 'none']))
@click.option('--device',                 help='Device  [default: cuda if available]', type=options.Device())
@click.option('--trust-pickle',           help='Allow code embedded in the pickle to run (only for files you trust)', is_flag=True)
@click.option('--guidance',               help='Guidance strength w of a guided-distillation student [default: 0], or with --guide-net the autoguidance weight', metavar='FLOAT', type=options.Float())
@click.option('--guide-net', 'guide_pkl', help='Guiding network pickle for autoguidance, D_g + w (D - D_g) (EDM2)', metavar='PATH|URL', type=str)
@precision_option
def main(network_pkl, outdir, seeds, subdirs, class_idx, batch, device, trust_pickle, guidance, guide_pkl, precision, **sampler_kwargs):
    """Generate images (seeds -> PNGs) with a network; sampler options override the network's sampling spec."""
    if guide_pkl is not None and guidance is None:
        raise click.ClickException('--guide-net needs --guidance=W, the autoguidance weight (EDM2 img64-S with XS: 1.7)')
    device, net = init_and_load(device, network_pkl, trust_pickle, 'network')
    precision = inference_precision(net, device, precision)
    if guide_pkl is not None:
        net = autoguided(net, guide_pkl, guidance, device, trust_pickle)
        guidance = None  # the weight belongs to the pair, not to the network's keywords

    dist.print0(f'Generating {len(seeds)} images to "{outdir}" with {dist.get_world_size()} process(es), {precision}...')
    try:
        with networks.backbone_precision(precision), dnnlib.util.progress_bar(len(seeds), 'Generating') as bar:
            generate_images(net, seeds, outdir, batch=batch, device=device, subdirs=subdirs, class_idx=class_idx,
                            progress=dnnlib.util.share_updater(bar, dist.get_world_size()),
                            model_kwargs=dict(guidance=guidance) if guidance is not None else None,
                            **sampler_kwargs)
    except ValueError as e:
        raise click.ClickException(str(e))
    except OSError as e:  # a full disk, a read-only --outdir, ...
        raise click.ClickException(dnnlib.util.os_error_message(e))
    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
