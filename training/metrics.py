"""Frechet distance with EDM's protocol: feature detectors, float64 feature statistics summed across ranks.

FID = |mu - mu_ref|^2 + Tr(S + S_ref - 2 sqrtm(S S_ref)) over Inception-v3 features (EDM's pickle), or over raw
pixels in [-1,1] (the `pixels` detector) for the toy problems, where the data distribution is known exactly.
"""

import functools
import io
import zipfile

import numpy as np
import scipy.linalg
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence

# The feature network of every NVIDIA FID script (StyleGAN2-ADA, StyleGAN3, EDM), used as-is so scores compare.
INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'

# ----------------------------------------------------------------------------
# Detectors: called as detector(uint8 NCHW, return_features=True) -> [N, D] float features.

def pixels_detector(images, return_features=True):
    """The generator's pixel space (x/127.5 - 1) as features: FD against a known Gaussian is then exact.

    float64, so that pixel-space statistics carry no float32 rounding."""
    return images.flatten(1).to(torch.float64) / 127.5 - 1


def load_detector(name_or_url='inception', device=torch.device('cpu'), trust=False):
    """'inception' (EDM's Inception-v3 pickle), 'pixels', or the PATH|URL of a pickled detector (needs trust=True).

    Unpickling a callable runs code from the file. The official Inception URL is trusted without asking: it is the
    file NVIDIA's own FID scripts unpickle, served over HTTPS by NVIDIA's NGC registry, i.e. the same publisher whose
    EDM code and references define the metric. Any other file must be trusted explicitly.
    """
    if name_or_url == 'pixels':
        return pixels_detector
    url = INCEPTION_URL if name_or_url == 'inception' else name_or_url
    if url != INCEPTION_URL and not trust:
        raise ValueError(f'Refusing to unpickle detector "{url}": loading it runs code from the file; '
                         f'pass --trust-detector (trust=True) only for a file you trust')
    try:
        f = dnnlib.util.open_url(url)
    except OSError as e:
        if url != INCEPTION_URL:
            raise
        raise OSError(f'Cannot download the Inception detector: fetch {INCEPTION_URL} elsewhere and place it at '
                      f'"{dnnlib.util.url_cache_path(url)}", or pass --detector=PATH --trust-detector') from e
    with f:
        detector = persistence.load(f, allow_code=True)
    if not callable(detector):
        raise ValueError(f'Detector "{url}" unpickled to a {type(detector).__name__}, not a callable network')
    if isinstance(detector, torch.nn.Module):
        detector = detector.eval().requires_grad_(False).to(device)
    return detector

# ----------------------------------------------------------------------------
# Feature statistics: sums in float64 on each rank, one all-reduce, then mean and unbiased covariance.

def detector_features(detector, images, device):
    """One batch of uint8 NCHW images -> float64 features; Inception wants 3 channels, pixels keep theirs."""
    images = images.to(device)
    if images.shape[1] == 1 and detector is not pixels_detector:
        images = images.repeat([1, 3, 1, 1])
    return detector(images, return_features=True).to(torch.float64)


def _accumulate(batches, detector, device, progress=None):
    """Sum of features and of their outer products over this rank's batches; None sums if it had no images."""
    n, s1, s2 = 0, None, None
    for images in batches:
        x = detector_features(detector, images, device)
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        s2 = x.T @ x if s2 is None else s2 + x.T @ x
        n += x.shape[0]
        if progress is not None:
            progress(x.shape[0])
    return n, s1, s2


def _reduce_stats(n, s1, s2, device):
    """Sum the ranks' sums (a rank without images contributes zeros) and form mu and the unbiased covariance."""
    # Ranks first agree on the count and feature size, so that an empty rank can join the collective sum.
    meta = dist.all_reduce_sum(torch.tensor([n, 0 if s1 is None else s1.numel(), int(s1 is not None)],
                                            dtype=torch.float64, device=device))
    total, dims, ranks_with_data = (int(v) for v in meta.tolist())
    if total < 2:
        raise ValueError(f'Need at least 2 images for a covariance, got {total}')
    dim = dims // ranks_with_data
    if s1 is None:
        s1 = torch.zeros([dim], dtype=torch.float64, device=device)
        s2 = torch.zeros([dim, dim], dtype=torch.float64, device=device)
    s1 = dist.all_reduce_sum(s1.contiguous())
    s2 = dist.all_reduce_sum(s2.contiguous())
    mu = s1 / total
    sigma = (s2 - total * torch.outer(mu, mu)) / (total - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def _load_batch(dataset, shape, index):
    """Runs in a loader worker: one uint8 NCHW batch, or the error itself, re-raised by the main process so that it
    stays one line instead of a worker traceback."""
    try:
        images = [np.asarray(dataset[i][0]) for i in index]
        for i, img in zip(index, images):
            if img.shape != shape:
                raise ValueError(f'Image {i} has shape {list(img.shape)} but the first has {list(shape)}: all '
                                 f'images must share one resolution and channel count')
    except (ValueError, OSError) as e:
        return e
    return torch.from_numpy(np.stack(images))


def _dataset_batches(dataset, indices, shape, batch, num_workers):
    """This rank's images as uint8 NCHW batches, read by a DataLoader in the order of `indices`."""
    index_batches = [indices[i : i + batch].tolist() for i in range(0, len(indices), batch)]
    loader = torch.utils.data.DataLoader(index_batches, batch_size=None, num_workers=num_workers,
                                         collate_fn=functools.partial(_load_batch, dataset, shape))
    for images in loader:
        if isinstance(images, Exception):
            raise images
        yield images


def compute_feature_stats(source, detector, num=None, seed=0, batch=64, device=torch.device('cpu'),
                          num_workers=0, progress=None):
    """(mu, sigma) of detector features over `num` images of `source`, summed across all torchrun ranks.

    `source` is a torch Dataset (dataset[i] -> (uint8 CHW, label)) or an iterable of this rank's uint8 NCHW batches.
    For a dataset, EDM's protocol: a random subset of `num` images chosen by `seed` when it holds more (all of
    them when num is None), each rank taking a disjoint strided share. `progress(n)` is called after each batch.
    """
    if isinstance(source, torch.utils.data.Dataset):
        num = len(source) if num is None else num
        if len(source) < num:
            raise ValueError(f'Found {len(source)} images but {num} were requested: '
                             f'generate more or lower --num-images')
        # EDM's subset rule (its dataset's max_size): shuffle by seed, keep the first num, restore file order.
        # It depends only on (len, num, seed), never on the world size.
        indices = np.arange(len(source))
        if len(source) > num:
            np.random.RandomState(seed % (1 << 31)).shuffle(indices)
            indices = np.sort(indices[:num])
        shape = np.asarray(source[int(indices[0])][0]).shape  # every rank checks against the same image
        share = indices[dist.get_rank() :: dist.get_world_size()]
        source = _dataset_batches(source, share, shape, batch, num_workers)
    with torch.no_grad():
        n, s1, s2 = _accumulate(source, detector, device, progress)
    return _reduce_stats(n, s1, s2, device)

# ----------------------------------------------------------------------------
# Frechet distance between two Gaussians.

def frechet_distance(mu, sigma, mu_ref, sigma_ref, eps=1e-6):
    """|mu - mu_ref|^2 + Tr(S + S_ref - 2 sqrtm(S S_ref)), real part of scipy's sqrtm as in EDM.

    When S S_ref is so close to singular that sqrtm returns non-finite values, eps*I is added to both covariances
    (the usual remedy of the TTUR and pytorch-fid implementations, here applied to every term); finite results are
    left untouched, as in EDM.
    """
    mu, sigma, mu_ref, sigma_ref = (np.asarray(a, dtype=np.float64) for a in (mu, sigma, mu_ref, sigma_ref))
    if mu.shape != mu_ref.shape or sigma.shape != sigma_ref.shape or sigma.shape != mu.shape * 2:
        raise ValueError(f'Statistics have {mu.shape[-1]} features but the reference has {mu_ref.shape[-1]}: '
                         f'use the detector and image resolution the reference was computed with')
    m = np.square(mu - mu_ref).sum()
    s = scipy.linalg.sqrtm(sigma @ sigma_ref)
    if not np.isfinite(s).all():
        # The distance between the regularised Gaussians, so identical inputs still give 0.
        sigma, sigma_ref = sigma + np.eye(sigma.shape[0]) * eps, sigma_ref + np.eye(sigma.shape[0]) * eps
        s = scipy.linalg.sqrtm(sigma @ sigma_ref)
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


def load_ref(path_or_url):
    """Reference statistics np.savez(mu=[D], sigma=[D, D]) from a path or URL, checked for shape and finiteness."""
    with dnnlib.util.open_url(path_or_url) as f:
        data = f.read()
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError('an .npy array, not an .npz archive')
        missing = [k for k in ('mu', 'sigma') if k not in npz.files]
        if missing:
            raise ValueError(f'missing key(s) {missing}, found {npz.files}')
        mu, sigma = npz['mu'], npz['sigma']
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f'Corrupt reference statistics "{path_or_url}" ({e}): '
                         f'recompute them with `python fid.py ref --data DIR --dest NPZ`') from e
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'Corrupt reference statistics "{path_or_url}": mu {list(mu.shape)} and sigma '
                         f'{list(sigma.shape)} should be [D] and [D, D]; recompute them with `python fid.py ref`')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'Corrupt reference statistics "{path_or_url}": non-finite values; recompute them')
    return mu.astype(np.float64), sigma.astype(np.float64)

# ----------------------------------------------------------------------------
# In-training FID: generate, featurise and compare without writing images.

def fid_of_sampler(sample_fn, num, ref, detector, batch=64, device=torch.device('cpu'), seed=0):
    """FD of `num` images from sample_fn(seeds: list[int]) -> uint8 NCHW against ref = (mu_ref, sigma_ref).

    Seeds seed..seed+num-1 are strided across ranks; every rank returns the same value.
    """
    seeds = list(range(seed, seed + num))[dist.get_rank() :: dist.get_world_size()]
    batches = (sample_fn(seeds[i : i + batch]) for i in range(0, len(seeds), batch))
    mu, sigma = compute_feature_stats(batches, detector, device=device)
    return frechet_distance(mu, sigma, *ref)
