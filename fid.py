"""Calculate FID with EDM's protocol: `calc` scores generated images against reference statistics, `ref` makes them.

Runs under torchrun (images split across ranks, statistics summed). Examples:

    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=2 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=out --ref=toy.npz --num-images=1000 --detector=pixels

(`--num-images`, not EDM's `--num`: torchrun rejects `--num` as an ambiguous abbreviation of its `--numa-binding`;
`--num` still works without torchrun.)
"""

import functools
import os

import click
import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from training import metrics
from training.dataset import ImageFolderDataset

# ----------------------------------------------------------------------------

def _one_line_errors(fn):
    """Library errors (bad files, too few images, offline) become one-line click errors instead of tracebacks."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e
    return wrapper


def _progress(total):
    """Rank 0 prints about every tenth of the way; its share times the world size estimates the whole."""
    state = dnnlib.EasyDict(done=0, next_report=total / 10)
    def report(n):
        state.done += n
        if state.done * dist.get_world_size() >= state.next_report:
            dist.print0(f'{min(state.done * dist.get_world_size(), total)}/{total} images')
            state.next_report += total / 10
    return report


def _open_images(path):
    dataset = ImageFolderDataset(path=path)
    dist.print0(f'Found {len(dataset)} images of shape {list(np.asarray(dataset[0][0]).shape)} in "{path}"')
    return dataset


detector_options = [
    click.option('--detector', help='inception | pixels | PATH|URL of a pickled detector', metavar='NAME|PATH|URL',
                 type=str, default='inception', show_default=True),
    click.option('--trust-detector', help='Allow unpickling a detector file other than the official Inception '
                 'one (runs code from it)', is_flag=True),
    click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
                 type=click.IntRange(min=1), default=64, show_default=True),
    click.option('--workers', 'num_workers', help='Data loader processes per rank', metavar='INT',
                 type=click.IntRange(min=0), default=2, show_default=True),
]


def _with_detector_options(fn):
    for option in reversed(detector_options):
        fn = option(fn)
    return fn

# ----------------------------------------------------------------------------

@click.group()
def main():
    """Calculate Frechet Inception Distance (FID) and reference statistics, following EDM."""

# ----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path', help='Generated images: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (np.savez with mu, sigma)', metavar='NPZ|URL', type=str, required=True)
@click.option('--num-images', 'num_expected', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--num', 'num_alias', help='EDM\'s name of --num-images (not under torchrun)', metavar='INT', type=click.IntRange(min=2), hidden=True)
@click.option('--seed', help='Random seed for choosing the images when there are more', metavar='INT', type=int, default=0, show_default=True)
@_with_detector_options
@_one_line_errors
def calc(image_path, ref_path, num_expected, num_alias, seed, detector, trust_detector, max_batch_size, num_workers):
    """Calculate FID of images in a folder or zip against reference statistics."""
    if num_alias is not None:
        if click.get_current_context().get_parameter_source('num_expected') != click.core.ParameterSource.DEFAULT:
            raise click.UsageError('--num is --num-images under another name: give only one of them')
        num_expected = num_alias
    device = dist.init()
    with dist.rank0_first():  # a URL is downloaded into the cache once
        mu_ref, sigma_ref = metrics.load_ref(ref_path)
        detector_net = metrics.load_detector(detector, device=device, trust=trust_detector)
    dataset = _open_images(image_path)

    # Fail before the long pass if these images cannot match the reference (pixels: resolution, channels).
    probe = torch.from_numpy(np.asarray(dataset[0][0]))[None]
    dim = metrics.detector_features(detector_net, probe, device).shape[1]
    if dim != mu_ref.shape[0]:
        raise click.ClickException(f'Images of shape {list(probe.shape[1:])} give {dim} features with detector '
                                   f'"{detector}" but "{ref_path}" has {mu_ref.shape[0]}: use images at the '
                                   f'reference\'s resolution and the detector the reference was made with')

    dist.print0(f'Calculating statistics for {num_expected} images...')
    mu, sigma = metrics.compute_feature_stats(dataset, detector_net, num=num_expected, seed=seed,
                                              batch=max_batch_size, device=device, num_workers=num_workers,
                                              progress=_progress(num_expected))
    fid = metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    dist.print0(f'{fid:g}')
    dist.barrier()
    dist.shutdown()

# ----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'dataset_path', help='Dataset: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to save the statistics', metavar='NPZ', type=str, required=True)
@_with_detector_options
@_one_line_errors
def ref(dataset_path, dest_path, detector, trust_detector, max_batch_size, num_workers):
    """Calculate reference statistics (mu, sigma) over all images of a dataset."""
    device = dist.init()
    with dist.rank0_first():  # a URL is downloaded into the cache once
        detector_net = metrics.load_detector(detector, device=device, trust=trust_detector)
    dataset = _open_images(dataset_path)

    dist.print0(f'Calculating statistics for {len(dataset)} images...')
    mu, sigma = metrics.compute_feature_stats(dataset, detector_net, batch=max_batch_size, device=device,
                                              num_workers=num_workers, progress=_progress(len(dataset)))
    if dist.get_rank() == 0:
        if os.path.dirname(dest_path):
            os.makedirs(os.path.dirname(dest_path), exist_ok=True)
        dnnlib.util.atomic_write(dest_path, lambda f: np.savez(f, mu=mu, sigma=sigma))
        print(f'Saved "{dest_path}"')
    dist.barrier()
    dist.shutdown()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
