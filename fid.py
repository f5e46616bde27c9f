"""Calculate FID with EDM's protocol: `calc` scores generated images against reference statistics, `ref` makes them;
`is` gives the Inception Score and `pr` precision and recall against real images, as StyleGAN3 does.

Runs under torchrun (images split across ranks, statistics summed). Examples:

    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    torchrun --standalone --nproc_per_node=2 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=out --ref=toy.npz --num-images=1000 --detector=pixels
    python fid.py is --images=out
    python fid.py pr --images=out --data=datasets/cifar10-32x32.zip

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
from torch_utils import options
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


def _features(dataset, detector_net, desc, num, **kwargs):
    """metrics.compute_features of `num` images of a dataset, under a progress bar."""
    with dnnlib.util.progress_bar(num, desc) as bar:
        return metrics.compute_features(dataset, detector_net, num=num, **kwargs,
                                        progress=dnnlib.util.share_updater(bar, dist.get_world_size()))


def _init(detector, trust_detector):
    """(device, detector network): torchrun-aware init, then rank 0 first, so that a URL is downloaded once."""
    device = dist.init()
    with dist.rank0_first():
        return device, metrics.load_detector(detector, device=device, trust=trust_detector)


def _open_images(path):
    """A folder or zip of images, every image of this rank's share decoded once now: a damaged one is one line naming
    it here, not an error inside a DataLoader worker during the long pass."""
    dataset = ImageFolderDataset(path=path)
    dataset.verify(dist.get_rank(), dist.get_world_size())
    dist.print0(f'Found {len(dataset)} images of shape {list(np.asarray(dataset[0][0]).shape)} in "{path}"')
    return dataset


def detector_options(default):
    """The options of every command, with the command's own default detector."""
    return [
        click.option('--detector', help='inception | vgg16 | pixels | PATH|URL of a pickled detector',
                     metavar='NAME|PATH|URL', type=str, default=default, show_default=True),
        click.option('--trust-detector', help='Allow unpickling a detector file other than the official Inception '
                     'and VGG16 ones (runs code from it)', is_flag=True),
        click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
                     type=options.BATCH, default=64, show_default=True),
        click.option('--workers', 'num_workers', help='Data loader processes per rank', metavar='INT',
                     type=options.Int(min=0), default=2, show_default=True),
    ]


def _with_detector_options(default='inception'):
    def decorate(fn):
        for option in reversed(detector_options(default)):
            fn = option(fn)
        return fn
    return decorate

# ----------------------------------------------------------------------------

@click.group()
def main():
    """Calculate FID and its reference statistics (EDM), Inception Score and precision/recall (StyleGAN3)."""

# ----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path', help='Generated images: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (np.savez with mu, sigma)', metavar='NPZ|URL', type=str, required=True)
@click.option('--num-images', 'num_expected', help='Number of images to use', metavar='INT', type=options.Int(min=2), default=50000, show_default=True)
@click.option('--num', 'num_alias', help='EDM\'s name of --num-images (not under torchrun)', metavar='INT', type=options.Int(min=2), hidden=True)
@click.option('--seed', help='Random seed for choosing the images when there are more', metavar='INT', type=options.SEED, default=0, show_default=True)
@_with_detector_options()
@_one_line_errors
def calc(image_path, ref_path, num_expected, num_alias, seed, detector, trust_detector, max_batch_size, num_workers):
    """Calculate FID of images in a folder or zip against reference statistics."""
    if num_alias is not None:
        if click.get_current_context().get_parameter_source('num_expected') != click.core.ParameterSource.DEFAULT:
            raise click.UsageError('--num is --num-images under another name: give only one of them')
        num_expected = num_alias
    device, detector_net = _init(detector, trust_detector)
    with dist.rank0_first():  # a URL is downloaded into the cache once
        mu_ref, sigma_ref = metrics.load_ref(ref_path)
    dataset = _open_images(image_path)

    # Fail before the long pass if these images cannot match the reference (pixels: resolution, channels).
    probe = torch.from_numpy(np.asarray(dataset[0][0]))[None]
    dim = metrics.detector_features(detector_net, probe, device).shape[1]
    if dim != mu_ref.shape[0]:
        raise click.ClickException(f'Images of shape {list(probe.shape[1:])} give {dim} features with detector '
                                   f'"{detector}" but "{ref_path}" has {mu_ref.shape[0]}: use images at the '
                                   f'reference\'s resolution and the detector the reference was made with')

    with dnnlib.util.progress_bar(num_expected, 'Calculating statistics') as bar:
        mu, sigma = metrics.compute_feature_stats(dataset, detector_net, num=num_expected, seed=seed,
                                                  batch=max_batch_size, device=device, num_workers=num_workers,
                                                  progress=dnnlib.util.share_updater(bar, dist.get_world_size()))
    fid = metrics.frechet_distance(mu, sigma, mu_ref, sigma_ref)
    dist.print0(f'{fid:g}')
    dist.barrier()
    dist.shutdown()

# ----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'dataset_path', help='Dataset: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to save the statistics', metavar='NPZ', type=str, required=True)
@_with_detector_options()
@_one_line_errors
def ref(dataset_path, dest_path, detector, trust_detector, max_batch_size, num_workers):
    """Calculate reference statistics (mu, sigma) over all images of a dataset."""
    if os.path.isdir(dest_path):  # found now, not after the pass over the data
        raise click.ClickException(f'--dest "{dest_path}" is a directory; name the statistics file, e.g. '
                                   f'--dest={os.path.join(dest_path, "ref.npz")}')
    device, detector_net = _init(detector, trust_detector)
    dataset = _open_images(dataset_path)

    with dnnlib.util.progress_bar(len(dataset), 'Calculating statistics') as bar:
        mu, sigma = metrics.compute_feature_stats(dataset, detector_net, batch=max_batch_size, device=device,
                                                  num_workers=num_workers,
                                                  progress=dnnlib.util.share_updater(bar, dist.get_world_size()))
    if dist.get_rank() == 0:
        try:
            if os.path.dirname(dest_path):
                os.makedirs(os.path.dirname(dest_path), exist_ok=True)
            dnnlib.util.atomic_write(dest_path, lambda f: np.savez(f, mu=mu, sigma=sigma))
        except OSError as e:  # a full disk, a read-only destination, ...
            raise click.ClickException(dnnlib.util.os_error_message(e))
        print(f'Saved "{dest_path}"')
    dist.barrier()
    dist.shutdown()

# ----------------------------------------------------------------------------

@main.command('is')
@click.option('--images', 'image_path', help='Generated images: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--num-images', 'num_expected', help='Number of images to use', metavar='INT', type=options.Int(min=10), default=50000, show_default=True)
@click.option('--splits', help='Consecutive parts the score is averaged over', metavar='INT', type=options.Int(min=1), default=10, show_default=True)
@click.option('--seed', help='Random seed for choosing the images when there are more', metavar='INT', type=options.SEED, default=0, show_default=True)
@_with_detector_options()
@_one_line_errors
def inception_score(image_path, num_expected, splits, seed, detector, trust_detector, max_batch_size, num_workers):
    """Calculate the Inception Score (mean and std over splits) of images in a folder or zip."""
    if num_expected < splits:
        raise click.BadParameter(f'{num_expected} images cannot be split {splits} ways', param_hint='--num-images')
    device, detector_net = _init(detector, trust_detector)
    dataset = _open_images(image_path)
    metrics.detector_features(detector_net, torch.from_numpy(np.asarray(dataset[0][0]))[None], device,
                              probabilities=True)  # fail before the long pass (e.g. --detector=pixels)
    probs = _features(dataset, detector_net, 'Class probabilities', num=num_expected, seed=seed, batch=max_batch_size,
                      device=device, num_workers=num_workers, probabilities=True)
    mean, std = metrics.inception_score(probs, splits)
    dist.print0(f'{mean:g} {std:g}')
    dist.barrier()
    dist.shutdown()

# ----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path', help='Generated images: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--data', 'dataset_path', help='Real images: a folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--num-images', 'num_expected', help='Number of generated images to use', metavar='INT', type=options.Int(min=4), default=50000, show_default=True)
@click.option('--seed', help='Random seed for choosing the images when there are more', metavar='INT', type=options.SEED, default=0, show_default=True)
@_with_detector_options('vgg16')
@_one_line_errors
def pr(image_path, dataset_path, num_expected, seed, detector, trust_detector, max_batch_size, num_workers):
    """Calculate precision and recall (k = 3 nearest neighbours) of generated images against real ones.

    As many real images as generated ones are used (all of them when there are fewer)."""
    device, detector_net = _init(detector, trust_detector)
    dataset, real_dataset = _open_images(image_path), _open_images(dataset_path)
    kwargs = dict(seed=seed, batch=max_batch_size, device=device, num_workers=num_workers)
    fake = _features(dataset, detector_net, 'Generated features', num=num_expected, **kwargs)
    real = _features(real_dataset, detector_net, 'Real features', num=min(len(real_dataset), num_expected), **kwargs)
    if real.shape[1] != fake.shape[1]:
        raise click.ClickException(f'Generated images give {fake.shape[1]} features but real ones {real.shape[1]} '
                                   f'with detector "{detector}": use images of the real images\' resolution')
    precision, recall = metrics.precision_recall(real, fake)
    dist.print0(f'precision {precision:g} recall {recall:g}')
    dist.barrier()
    dist.shutdown()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
