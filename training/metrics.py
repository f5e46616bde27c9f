"""Image metrics with the NVIDIA protocols (EDM, StyleGAN2-ADA/StyleGAN3): feature detectors, features gathered
across ranks, and the three scores computed from them.

- FID = |mu - mu_ref|^2 + Tr(S + S_ref - 2 sqrtm(S S_ref)) over Inception-v3 features (EDM's pickle), or over raw
  pixels in [-1,1] (the `pixels` detector) for the toy problems, where the data distribution is known exactly.
- Inception Score (Salimans et al. 2016) = exp(E_x KL(p(y|x) || p(y))) over the Inception network's class
  probabilities, averaged over 10 consecutive splits as StyleGAN3 does.
- Precision and recall (Kynkaanniemi et al. 2019): the share of generated images inside the real images' k-NN
  manifold (k = 3) and the reverse, over VGG16 features (StyleGAN3's pickle).
"""

import functools
import io
import os
import re
import zipfile

import numpy as np
import scipy.linalg
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence
from training.pairs import file_sha256

# The feature network of every NVIDIA FID script (StyleGAN2-ADA, StyleGAN3, EDM), used as-is so scores compare.
INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
# StyleGAN2-ADA/StyleGAN3's VGG16 for precision and recall (the fc features of Kynkaanniemi et al.'s network).
VGG16_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl'
OFFICIAL_DETECTORS = dict(inception=INCEPTION_URL, vgg16=VGG16_URL)

# ----------------------------------------------------------------------------
# Detectors: called as detector(uint8 NCHW, return_features=True) -> [N, D] float features.

def pixels_detector(images, return_features=True):
    """The generator's pixel space (x/127.5 - 1) as features: FD against a known Gaussian is then exact.

    float64, so that pixel-space statistics carry no float32 rounding."""
    return images.flatten(1).to(torch.float64) / 127.5 - 1


_TRUST_FLAGS = '--trust-detector (fid.py) or --trust-pickle (train.py)'


def load_detector(name_or_url='inception', device=torch.device('cpu'), trust=False):
    """'inception' (EDM's Inception-v3 pickle), 'vgg16' (StyleGAN3's), 'pixels', or the PATH|URL of a pickled
    detector (needs trust=True).

    Unpickling a callable runs code from the file. The official URLs are trusted without asking: they are the files
    NVIDIA's own metric scripts unpickle, served over HTTPS by NVIDIA's NGC registry, i.e. the same publisher whose
    EDM code and references define the metrics; their cached copies are checked first (`_official_file`). Any other
    file must be trusted explicitly.
    """
    if name_or_url == 'pixels':
        return pixels_detector
    url = OFFICIAL_DETECTORS.get(name_or_url, name_or_url)
    official = url in OFFICIAL_DETECTORS.values()
    if not official and not dnnlib.util.is_url(url) and not os.path.isfile(url):
        raise ValueError(f'No such detector "{url}": use inception, vgg16, pixels, or the PATH|URL of a pickled '
                         f'detector (with {_TRUST_FLAGS})')
    if not official and not trust:
        raise ValueError(f'Refusing to unpickle detector "{url}": loading it runs code from the file; pass '
                         f'{_TRUST_FLAGS} only for a file you trust')
    with open(_official_file(url, trust), 'rb') if official else dnnlib.util.open_url(url) as f:
        detector = persistence.load(f, allow_code=True)
    if not callable(detector):
        raise ValueError(f'Detector "{url}" unpickled to a {type(detector).__name__}, not a callable network')
    if isinstance(detector, torch.nn.Module):
        detector = detector.eval().requires_grad_(False).to(device)
    return detector


def _official_file(url, trust):
    """The cached download of an official detector, checked against the sha256 recorded beside it (FILE.sha256) when
    this project downloaded it: trust on first use, as NVIDIA publishes no checksum. A cached file with another hash
    (replaced or damaged), or with none recorded (placed by hand), is unpickled only with trust=True, which records
    its hash. This guards against a cache file changed after the download, not against one who can write both."""
    name = 'Inception' if url == INCEPTION_URL else 'VGG16'
    downloading = not os.path.isfile(dnnlib.util.url_cache_path(url))
    try:
        path = dnnlib.util.open_url(url, return_filename=True)
    except OSError as e:
        raise OSError(f'Cannot download the {name} detector: fetch {url} elsewhere, place it at '
                      f'"{dnnlib.util.url_cache_path(url)}" and pass {_TRUST_FLAGS} once (it records the file\'s '
                      f'sha256), or pass --detector=PATH --trust-detector') from e
    digest = file_sha256(path)
    record = path + '.sha256'
    recorded = open(record).read().strip() if os.path.isfile(record) else None
    if downloading or trust:
        if recorded != digest:
            dnnlib.util.atomic_write(record, lambda f: f.write(digest + '\n'), mode='w')
    elif recorded is None:
        raise ValueError(f'Refusing to unpickle the {name} detector "{path}": it was not downloaded by this project '
                         f'(no sha256 recorded beside it) and loading it runs code from it; pass {_TRUST_FLAGS} once '
                         f'if you trust the file (its sha256 is then recorded), or delete it to download it again')
    elif recorded != digest:
        raise ValueError(f'Refusing to unpickle the {name} detector "{path}": its sha256 differs from the one recorded '
                         f'when it was downloaded (replaced or damaged); delete it to download it again, or pass '
                         f'{_TRUST_FLAGS} if you trust it')
    return path

# ----------------------------------------------------------------------------
# Feature statistics: sums in float64 on each rank, one all-reduce, then mean and unbiased covariance.

def detector_features(detector, images, device, probabilities=False):
    """One batch of uint8 NCHW images -> float64 features, or with probabilities=True the class probabilities of an
    Inception-like detector (its call with no_output_bias=True, as StyleGAN3's Inception Score). Inception wants 3
    channels; pixels keep theirs."""
    images = images.to(device)
    if images.shape[1] == 1 and detector is not pixels_detector:
        images = images.repeat([1, 3, 1, 1])
    if probabilities:
        if detector is pixels_detector:
            raise ValueError('The pixels detector has no class probabilities: the Inception Score needs --detector='
                             'inception or a classifier pickle')
        return detector(images, no_output_bias=True).to(torch.float64)
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


def _rank_batches(source, num, seed, batch, num_workers):
    """This rank's uint8 NCHW batches of a Dataset (EDM's subset rule, below) or of an iterable of them (as is)."""
    if not isinstance(source, torch.utils.data.Dataset):
        return source
    num = len(source) if num is None else num
    if len(source) < num:
        raise ValueError(f'Found {len(source)} images but {num} were requested: generate more or lower --num-images')
    # EDM's subset rule (its dataset's max_size): shuffle by seed, keep the first num, restore file order.
    # It depends only on (len, num, seed), never on the world size.
    indices = np.arange(len(source))
    if len(source) > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(indices)
        indices = np.sort(indices[:num])
    shape = np.asarray(source[int(indices[0])][0]).shape  # every rank checks against the same image
    share = indices[dist.get_rank() :: dist.get_world_size()]
    return _dataset_batches(source, share, shape, batch, num_workers)


def compute_feature_stats(source, detector, num=None, seed=0, batch=64, device=torch.device('cpu'),
                          num_workers=0, progress=None):
    """(mu, sigma) of detector features over `num` images of `source`, summed across all torchrun ranks.

    `source` is a torch Dataset (dataset[i] -> (uint8 CHW, label)) or an iterable of this rank's uint8 NCHW batches.
    For a dataset, EDM's protocol: a random subset of `num` images chosen by `seed` when it holds more (all of
    them when num is None), each rank taking a disjoint strided share. `progress(n)` is called after each batch.
    """
    source = _rank_batches(source, num, seed, batch, num_workers)
    with torch.no_grad():
        n, s1, s2 = _accumulate(source, detector, device, progress)
    return _reduce_stats(n, s1, s2, device)


def compute_features(source, detector, num=None, seed=0, batch=64, device=torch.device('cpu'), num_workers=0,
                     progress=None, probabilities=False):
    """All features [N, D] (float64, on `device`, the same on every rank) of the images compute_feature_stats
    would use, in their global order: rank r of W holds images r, r+W, ... of it (a Dataset's share, or the
    strided seeds of sampler_batches). Memory: N x D x 8 bytes, 1.6 GB for 50k VGG16 features."""
    rows = []
    with torch.no_grad():
        for images in _rank_batches(source, num, seed, batch, num_workers):
            rows.append(detector_features(detector, images, device, probabilities))
            if progress is not None:
                progress(rows[-1].shape[0])
    mine = torch.cat(rows) if rows else None
    # Ranks agree on the count and the feature size (a rank may have no images), then sum zero-filled copies.
    meta = dist.all_reduce_sum(torch.tensor([0 if mine is None else mine.shape[0], 0 if mine is None else
                                             mine.shape[1], int(mine is not None)], dtype=torch.float64, device=device))
    total, dims, ranks_with_data = (int(v) for v in meta.tolist())
    if total < 1:
        raise ValueError('No images to compute features of')
    full = torch.zeros([total, dims // ranks_with_data], dtype=torch.float64, device=device)
    if mine is not None:
        full[dist.get_rank() :: dist.get_world_size()] = mine
    return dist.all_reduce_sum(full)

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
# Inception Score and precision/recall from features.

def inception_score(probs, splits=10):
    """(mean, std) over `splits` consecutive parts of exp(E_x KL(p(y|x) || p(y))), p(y) the part's mean; 0 log 0 = 0.

    StyleGAN3's protocol: part i holds rows [i N / splits, (i + 1) N / splits) of the probabilities [N, classes]."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    n = probs.shape[0]
    if n < splits:
        raise ValueError(f'{n} images cannot be split {splits} ways for the Inception Score: use at least {splits}')
    scores = []
    for i in range(splits):
        p = probs[i * n // splits : (i + 1) * n // splits]
        kl = torch.special.xlogy(p, p) - torch.special.xlogy(p, p.mean(0, keepdim=True))
        scores.append(float(kl.sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(a, b):
    """|a_i - b_j|^2 [len(a), len(b)] through one matrix product (GEMM speed), clamped at 0 against rounding."""
    return (a.square().sum(1)[:, None] + b.square().sum(1)[None] - 2 * a @ b.T).clamp_(min=0)


def _row_chunks(x, cols, max_elems=1 << 26):
    """Row batches of x whose distance matrices to `cols` columns stay under max_elems entries (512 MB)."""
    return x.split(max(max_elems // max(cols, 1), 1))


def manifold_coverage(manifold, probes, k=3):
    """Share of probes inside the k-NN manifold of `manifold`: within the distance of some point of it to that
    point's k-th nearest neighbour (itself excluded: the (k+1)-th smallest distance, the first being its own 0)."""
    if manifold.shape[0] <= k:
        raise ValueError(f'{manifold.shape[0]} images have no {k}-th nearest neighbours: use more than {k}')
    radii = torch.cat([_squared_distances(m, manifold).kthvalue(k + 1, dim=1).values
                       for m in _row_chunks(manifold, manifold.shape[0])])
    inside = torch.cat([(_squared_distances(p, manifold) <= radii[None]).any(dim=1)
                        for p in _row_chunks(probes, manifold.shape[0])])
    return float(inside.to(torch.float64).mean())


def precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019: precision = share of fake features in the real manifold, recall = the reverse."""
    return manifold_coverage(real, fake, k), manifold_coverage(fake, real, k)

# ----------------------------------------------------------------------------
# In-training metrics: generate, featurise and score without writing images.

def parse_metric(name):
    """'fid50k' -> ('fid', 50000); also isNk and prNk. ValueError naming the accepted forms otherwise."""
    m = re.fullmatch(r'(fid|is|pr)(\d+)k', name)
    if m is None or int(m.group(2)) == 0:
        raise ValueError(f'unknown metric "{name}": use fidNk, isNk or prNk, e.g. fid50k,is50k,pr50k')
    return m.group(1), int(m.group(2)) * 1000


def default_detector(kind):
    """The detector a metric kind uses unless told otherwise: Inception for FID and IS, VGG16 for precision/recall."""
    return 'vgg16' if kind == 'pr' else 'inception'


def sampler_batches(sample_fn, num, batch=64, seed=0):
    """This rank's batches of sample_fn(seeds) -> uint8 NCHW for seeds seed..seed+num-1, strided across ranks."""
    seeds = list(range(seed, seed + num))[dist.get_rank() :: dist.get_world_size()]
    return (sample_fn(seeds[i : i + batch]) for i in range(0, len(seeds), batch))


def fid_of_sampler(sample_fn, num, ref, detector, batch=64, device=torch.device('cpu'), seed=0):
    """FD of `num` images from sample_fn(seeds: list[int]) -> uint8 NCHW against ref = (mu_ref, sigma_ref).

    Seeds seed..seed+num-1 are strided across ranks; every rank returns the same value.
    """
    mu, sigma = compute_feature_stats(sampler_batches(sample_fn, num, batch, seed), detector, device=device)
    return frechet_distance(mu, sigma, *ref)


def sampler_metric(name, sample_fn, detector, ref=None, real=None, batch=64, device=torch.device('cpu')):
    """{result name: value} of metric `name` for seeds 0..N-1 of sample_fn; the same on every rank.

    fidNk needs ref = (mu, sigma); prNk needs real = the real images' features [M, D] (compute_features)."""
    kind, num = parse_metric(name)
    batches = sampler_batches(sample_fn, num, batch)
    if kind == 'fid':
        mu, sigma = compute_feature_stats(batches, detector, device=device)
        return {name: frechet_distance(mu, sigma, *ref)}
    if kind == 'is':
        mean, std = inception_score(compute_features(batches, detector, device=device, probabilities=True))
        return {name: mean, f'{name}_std': std}
    precision, recall = precision_recall(real, compute_features(batches, detector, device=device))
    return {f'{name}_precision': precision, f'{name}_recall': recall}
