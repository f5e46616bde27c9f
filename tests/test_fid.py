"""FID: Frechet distance vs independent formulas, EDM's protocol through fid.py, torchrun, detectors, bad input."""

import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import requests
import scipy.linalg
import torch
from click.testing import CliRunner

import dnnlib
import fid
from training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exact_fd(mu1, s1, mu2, s2):
    """Closed-form FD via symmetric eigendecompositions: Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2)."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.linalg.eigvalsh(r @ s2 @ r)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(e, 0, None)).sum()


def random_stats(rng, n, d, offset=0.0):
    x = rng.standard_normal([n, d]) @ rng.standard_normal([d, d]) * 0.3 + offset
    return x.mean(0), np.cov(x, rowvar=False)


def write_images(folder, arrays):
    """uint8 CHW arrays -> PNG files as dataset_tool.py names them."""
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        img = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
        PIL.Image.fromarray(img).save(os.path.join(folder, f'img{i:08d}.png'))
    return str(folder)


def random_images(n, shape, seed):
    return list(np.random.default_rng(seed).integers(0, 256, size=[n, *shape], dtype=np.uint8))


def pixel_stats(arrays):
    x = np.stack(arrays).reshape(len(arrays), -1).astype(np.float64) / 127.5 - 1
    return x.mean(0), np.cov(x, rowvar=False)


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], np.zeros([0], np.float32)


def invoke(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1 and 'Traceback' not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]

# ----------------------------------------------------------------------------

def test_frechet_distance_vs_independent():
    rng = np.random.default_rng(0)
    for n, d in [(500, 16), (10, 64)]:  # full rank; rank-deficient (10 samples in 64 dimensions)
        mu1, s1 = random_stats(rng, n, d)
        mu2, s2 = random_stats(rng, n, d, offset=0.2)
        expected = exact_fd(mu1, s1, mu2, s2)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-5)
        assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-5 * np.trace(s1))
    with pytest.raises(ValueError, match='16 features but the reference has 64'):
        metrics.frechet_distance(*random_stats(rng, 50, 16), *random_stats(rng, 50, 64))


def test_frechet_distance_eps_fallback(monkeypatch):
    rng = np.random.default_rng(1)
    mu1, s1 = random_stats(rng, 200, 8)
    mu2, s2 = random_stats(rng, 200, 8)
    real_sqrtm, calls = scipy.linalg.sqrtm, []
    def failing_once(a):  # the first call fails as sqrtm does on a numerically singular product
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)
    monkeypatch.setattr(scipy.linalg, 'sqrtm', failing_once)
    value = metrics.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(8)) @ (s2 + 1e-6 * np.eye(8)))
    assert value == pytest.approx(exact_fd(mu1, s1 + 1e-6 * np.eye(8), mu2, s2 + 1e-6 * np.eye(8)), rel=1e-8)


def test_pixels_detector_gaussian_closed_form():
    # Images drawn from N(mu_a, S_a) in pixel space [-1, 1], quantised to uint8; FD to N(mu_b, S_b) is closed form.
    rng = np.random.default_rng(2)
    d, n = 12, 20000
    mu_a, mu_b = rng.uniform(-0.3, 0.3, d), rng.uniform(-0.3, 0.3, d)
    l_a, l_b = rng.standard_normal([d, d]) * 0.04, rng.standard_normal([d, d]) * 0.04
    s_a, s_b = l_a @ l_a.T, l_b @ l_b.T
    y = rng.multivariate_normal(mu_a, s_a, size=n + 500)
    u = np.clip(np.round((y + 1) * 127.5), 0, 255).astype(np.uint8).reshape(-1, 3, 2, 2)
    mu, sigma = metrics.compute_feature_stats(ArrayDataset(list(u)), metrics.pixels_detector, num=n, batch=4096)
    np.testing.assert_allclose(mu, mu_a, atol=4e-3)
    expected = exact_fd(mu_a, s_a, mu_b, s_b)
    assert metrics.frechet_distance(mu, sigma, mu_b, s_b) == pytest.approx(expected, rel=0.03)


def test_feature_stats_subset_and_sampler():
    images = random_images(30, [1, 4, 4], seed=3)
    # EDM's subset rule for num < len: shuffle indices with the seed, keep the first num.
    keep = np.arange(30)
    np.random.RandomState(5).shuffle(keep)
    mu, sigma = metrics.compute_feature_stats(ArrayDataset(images), metrics.pixels_detector, num=11, seed=5, batch=4)
    ref_mu, ref_sigma = pixel_stats([images[i] for i in keep[:11]])
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-12, atol=1e-12)
    # In-training FID: images from sample_fn(seeds) against given statistics.
    sample_fn = lambda seeds: torch.from_numpy(np.stack([images[s] for s in seeds]))
    value = metrics.fid_of_sampler(sample_fn, num=20, ref=(ref_mu, ref_sigma), detector=metrics.pixels_detector,
                                   batch=6, seed=4)
    assert value == pytest.approx(exact_fd(*pixel_stats(images[4:24]), ref_mu, ref_sigma), rel=1e-6)
    with pytest.raises(ValueError, match='Found 30 images but 31 were requested'):
        metrics.compute_feature_stats(ArrayDataset(images), metrics.pixels_detector, num=31)
    with pytest.raises(ValueError, match=r'Image 3 has shape \[1, 2, 2\]'):
        metrics.compute_feature_stats(ArrayDataset(images[:3] + [images[3][:, :2, :2]]), metrics.pixels_detector)

# ----------------------------------------------------------------------------

def test_ref_then_calc(tmp_path):
    images = random_images(12, [3, 8, 8], seed=4)
    data = write_images(tmp_path / 'data', images)
    result = invoke('ref', '--data', data, '--dest', tmp_path / 'refs' / 'ref.npz', '--detector', 'pixels',
                    '--batch', 5, '--workers', 0)
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / 'refs' / 'ref.npz') as npz:
        assert sorted(npz.files) == ['mu', 'sigma']
        mu, sigma = pixel_stats(images)
        np.testing.assert_allclose(npz['mu'], mu, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(npz['sigma'], sigma, rtol=1e-12, atol=1e-14)
    result = invoke('calc', '--images', data, '--ref', tmp_path / 'refs' / 'ref.npz', '--num-images', 12,
                    '--detector', 'pixels', '--workers', 0)
    assert result.exit_code == 0, result.output
    # 12 images in 192 dimensions: S S_ref is singular, and sqrtm is accurate to ~1e-7 of the trace there.
    assert abs(float(result.output.splitlines()[-1])) < 1e-6 * np.trace(sigma)

    # A random half of the images against the full set: the printed FID is that subset's distance.
    result = invoke('calc', '--images', data, '--ref', tmp_path / 'refs' / 'ref.npz', '--num-images', 6, '--seed', 7,
                    '--detector', 'pixels', '--workers', 0)
    keep = np.arange(12)
    np.random.RandomState(7).shuffle(keep)
    expected = exact_fd(*pixel_stats([images[i] for i in keep[:6]]), mu, sigma)
    assert float(result.output.splitlines()[-1]) == pytest.approx(expected, rel=1e-5)

    # EDM's --num names the same option (without torchrun); giving both is refused.
    again = invoke('calc', '--images', data, '--ref', tmp_path / 'refs' / 'ref.npz', '--num', 6, '--seed', 7,
                   '--detector', 'pixels', '--workers', 0)
    assert again.exit_code == 0 and again.output == result.output, again.output
    both = invoke('calc', '--images', data, '--ref', tmp_path / 'refs' / 'ref.npz', '--num', 6, '--num-images', 6)
    assert both.exit_code != 0 and 'give only one of them' in both.output, both.output


def test_cli_errors(tmp_path):
    data = write_images(tmp_path / 'data', random_images(5, [3, 8, 8], seed=5))
    ref = tmp_path / 'ref.npz'
    assert invoke('ref', '--data', data, '--dest', ref, '--detector', 'pixels', '--workers', 0).exit_code == 0
    calc = lambda images, ref_path, *extra: invoke('calc', '--images', images, '--ref', ref_path,
                                                   '--detector', 'pixels', *extra)

    assert_one_line_error(calc(data, ref), 'Found 5 images but 50000 were requested')
    assert_one_line_error(calc(tmp_path / 'nothing', ref, '--num-images', 5), 'does not exist')
    assert_one_line_error(calc(data, tmp_path / 'nothing.npz', '--num-images', 5), 'nothing.npz')

    # Images at another resolution than the reference's (pixels detector): refused before the long pass.
    small = write_images(tmp_path / 'small', random_images(5, [3, 4, 4], seed=6))
    assert_one_line_error(calc(small, ref, '--num-images', 5), '48 features', 'has 192')
    # One image of another size inside the set: reported even from a loader worker.
    mixed = write_images(tmp_path / 'mixed', random_images(4, [3, 8, 8], seed=7) + random_images(1, [3, 4, 4], seed=8))
    assert_one_line_error(calc(mixed, ref, '--num-images', 5, '--workers', 1), 'img00000004.png', '[3, 4, 4]')

    # Corrupt reference files.
    (tmp_path / 'garbage.npz').write_bytes(b'not an npz at all' * 10)
    np.savez(tmp_path / 'nomu.npz', sigma=np.eye(192))
    np.savez(tmp_path / 'shape.npz', mu=np.zeros(192), sigma=np.eye(10))
    with open(ref, 'rb') as f:
        (tmp_path / 'truncated.npz').write_bytes(f.read()[:1000])
    for name, fragment in [('garbage', 'Corrupt'), ('nomu', "missing key(s) ['mu']"), ('shape', 'sigma [10, 10]'),
                           ('truncated', 'Corrupt')]:
        assert_one_line_error(calc(data, tmp_path / f'{name}.npz', '--num-images', 5), fragment)

# ----------------------------------------------------------------------------

DETECTOR_SRC = '''
import torch
from torch_utils import persistence

@persistence.persistent_class
class ChannelMeans(torch.nn.Module):
    """A stand-in for the Inception pickle: per-channel means of the uint8 images, times a scale."""
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, return_features=False):
        assert return_features and x.dtype == torch.uint8
        return x.to(torch.float32).mean(dim=[2, 3]) * self.scale
'''


@pytest.fixture
def fake_detector_pkl(tmp_path, monkeypatch):
    """A pickled detector in the Inception file's format: EDM persistence with its module source embedded."""
    (tmp_path / 'fake_detector_module.py').write_text(DETECTOR_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_detector_module
    path = tmp_path / 'detector.pkl'
    path.write_bytes(pickle.dumps(fake_detector_module.ChannelMeans(scale=0.5)))
    return path


def test_pickled_detector(tmp_path, fake_detector_pkl):
    ref_images, images = random_images(9, [3, 4, 4], seed=9), random_images(7, [1, 4, 4], seed=10)
    ref_data, data = write_images(tmp_path / 'ref', ref_images), write_images(tmp_path / 'gen', images)
    result = invoke('ref', '--data', ref_data, '--dest', tmp_path / 'ref.npz', '--detector', fake_detector_pkl)
    assert_one_line_error(result, 'Refusing to unpickle', '--trust-detector')
    result = invoke('ref', '--data', ref_data, '--dest', tmp_path / 'ref.npz', '--detector', fake_detector_pkl,
                    '--trust-detector', '--workers', 0)
    assert result.exit_code == 0, result.output
    result = invoke('calc', '--images', data, '--ref', tmp_path / 'ref.npz', '--num-images', 7, '--detector',
                    fake_detector_pkl, '--trust-detector', '--workers', 0)
    assert result.exit_code == 0, result.output
    # Grayscale images reach the detector as 3 identical channels.
    feats = lambda arrays, c: np.stack([a.astype(np.float64).mean(axis=(1, 2)) for a in arrays]).repeat(c, 1) * 0.5
    f_ref, f_gen = feats(ref_images, 1), feats(images, 3)
    expected = exact_fd(f_gen.mean(0), np.cov(f_gen, rowvar=False), f_ref.mean(0), np.cov(f_ref, rowvar=False))
    assert float(result.output.splitlines()[-1]) == pytest.approx(expected, rel=1e-5, abs=1e-9)


def go_offline(monkeypatch, cache_dir):
    """An empty download cache and no network."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(cache_dir))
    def offline(*args, **kwargs):
        raise requests.ConnectionError('network is unreachable')
    monkeypatch.setattr(requests.Session, 'get', offline)


def test_inception_offline_and_cached(tmp_path, monkeypatch, fake_detector_pkl):
    go_offline(monkeypatch, tmp_path / 'cache')
    cache_path = dnnlib.util.url_cache_path(metrics.INCEPTION_URL)
    with pytest.raises(OSError) as e:
        metrics.load_detector('inception')
    assert '\n' not in str(e.value) and metrics.INCEPTION_URL in str(e.value) and cache_path in str(e.value)
    # Placed in the cache, the official file loads without network once trusted (which records its sha256), then
    # without a trust flag.
    os.makedirs(os.path.dirname(cache_path))
    with open(fake_detector_pkl, 'rb') as src, open(cache_path, 'wb') as dst:
        dst.write(src.read())
    with pytest.raises(ValueError, match='not downloaded by this project'):
        metrics.load_detector('inception')
    metrics.load_detector('inception', trust=True)
    detector = metrics.load_detector('inception')
    x = torch.full([2, 3, 4, 4], 8, dtype=torch.uint8)
    assert torch.equal(detector(x, return_features=True), torch.full([2, 3], 4.0))

# ----------------------------------------------------------------------------

SAMPLE_SRC = '''
def sample_fn(seeds):
    """One uint8 image per seed, independent of batching and rank."""
    return torch.stack([torch.randint(0, 256, [1, 4, 4], dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(s)) for s in seeds])
'''

TORCHRUN_SCRIPT = '''
import sys
import numpy as np
import torch
import fid
from torch_utils import distributed as dist
from training import metrics
from training.dataset import ImageFolderDataset
''' + SAMPLE_SRC + '''
data, out = sys.argv[1], sys.argv[2]
dist.init()
mu, sigma = metrics.compute_feature_stats(ImageFolderDataset(data), metrics.pixels_detector, num=7, seed=3, batch=2)
value = metrics.fid_of_sampler(sample_fn, 5, (mu, sigma), metrics.pixels_detector, batch=2)
if dist.get_rank() == 0:
    np.savez(out + '/subset.npz', mu=mu, sigma=sigma, fd=value, world=dist.get_world_size())
# Last: the CLI shuts the process group down when it is done.
fid.main(['ref', '--data', data, '--dest', out + '/ref.npz', '--detector', 'pixels', '--batch', '2',
          '--workers', '0'])
'''


def test_two_processes_match_one(tmp_path):
    data = write_images(tmp_path / 'data', random_images(11, [1, 4, 4], seed=11))
    (tmp_path / 'run.py').write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(tmp_path / 'run.py'), data, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The same computations in this single process.
    namespace = dict(torch=torch)
    exec(SAMPLE_SRC, namespace)
    assert invoke('ref', '--data', data, '--dest', tmp_path / 'ref1.npz', '--detector', 'pixels', '--workers', 0).exit_code == 0
    from training.dataset import ImageFolderDataset
    mu, sigma = metrics.compute_feature_stats(ImageFolderDataset(data), metrics.pixels_detector, num=7, seed=3)
    value = metrics.fid_of_sampler(namespace['sample_fn'], 5, (mu, sigma), metrics.pixels_detector)
    with np.load(tmp_path / 'ref.npz') as two, np.load(tmp_path / 'ref1.npz') as one:
        np.testing.assert_allclose(two['mu'], one['mu'], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(two['sigma'], one['sigma'], rtol=1e-12, atol=1e-15)
    with np.load(tmp_path / 'subset.npz') as two:
        assert int(two['world']) == 2
        np.testing.assert_allclose(two['mu'], mu, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(two['sigma'], sigma, rtol=1e-12, atol=1e-15)
        assert float(two['fd']) == pytest.approx(value, rel=1e-6)  # 5 images in 16-d: sqrtm of a singular product
