"""Inception Score and precision/recall: against numpy implementations written from the papers' definitions, through
fid.py, offline detector files, torchrun, and as in-training metrics."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
import generate
import train
from test_dmd import DMD_ARGS
from test_fid import assert_one_line_error, go_offline, random_images, write_images
from training import metrics
from training.dataset import ImageFolderDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# Reference implementations, from the definitions.

def reference_inception_score(probs, splits):
    """Salimans et al. 2016: IS = exp(E_x KL(p(y|x) || p(y))), p(y) the marginal of the split; StyleGAN3 splits the
    rows into `splits` consecutive parts [i N / splits, (i + 1) N / splits) and reports their mean and std."""
    n = len(probs)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0)
        kl = [sum(p[y] * np.log(p[y] / marginal[y]) for y in range(len(p)) if p[y] > 0) for p in part]
        scores.append(np.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


def reference_precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019: f(x, S) = 1 if |x - s| <= |s - NN_k(s)| for some s in S, NN_k(s) the k-th nearest
    other point of S; precision = mean f(fake, real), recall = mean f(real, fake). Brute force, float64."""
    def inside(manifold, probes):
        d = np.sqrt(((manifold[:, None] - manifold[None]) ** 2).sum(-1))
        radii = np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])
        to_probes = np.sqrt(((probes[:, None] - manifold[None]) ** 2).sum(-1))
        # The data must have no near-ties, or float rounding could decide a probe either way.
        assert np.abs(to_probes - radii[None]).min() > 1e-9
        return np.mean([(row <= radii).any() for row in to_probes])
    return inside(real, fake), inside(fake, real)


def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

# ----------------------------------------------------------------------------
# A detector built by the tests: Inception's interface (features, or class probabilities with no_output_bias).

DETECTOR_SRC = '''
import torch
from torch_utils import persistence

@persistence.persistent_class
class Classifier(torch.nn.Module):
    """Features: per-channel means of the uint8 image (x 1/64). Class probabilities: softmax of features @ W."""
    def __init__(self, W):
        super().__init__()
        self.register_buffer('W', torch.as_tensor(W, dtype=torch.float32))

    def forward(self, x, return_features=False, no_output_bias=False):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        features = x.to(torch.float32).mean(dim=[2, 3]) / 64
        if return_features:
            return features
        assert no_output_bias
        return torch.softmax(features @ self.W, dim=1)
'''

W = np.random.default_rng(42).normal(size=[3, 5])


@pytest.fixture
def classifier_pkl(tmp_path, monkeypatch):
    (tmp_path / 'classifier_module.py').write_text(DETECTOR_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import classifier_module
    path = tmp_path / 'classifier.pkl'
    path.write_bytes(pickle.dumps(classifier_module.Classifier(W)))
    return path


def classifier_probs(arrays):
    """The classifier's probabilities, computed independently in float64 from uint8 CHW arrays."""
    features = np.stack([a.astype(np.float64).mean(axis=(1, 2)) / 64 for a in arrays])
    return softmax(features @ W)


def pixel_features(arrays):
    return np.stack(arrays).reshape(len(arrays), -1).astype(np.float64) / 127.5 - 1

# ----------------------------------------------------------------------------

def test_inception_score_known_answers_and_reference():
    # Confident and evenly spread over K classes: IS = K. One class for every image: IS = 1.
    one_hot = np.eye(4)[np.arange(40) % 4]
    assert metrics.inception_score(one_hot, splits=10) == pytest.approx((4.0, 0.0), abs=1e-12)
    assert metrics.inception_score(np.tile([0.1, 0.2, 0.7], [30, 1]), splits=3) == pytest.approx((1.0, 0.0), abs=1e-12)
    # Random probabilities (with exact zeros) in unequal splits.
    probs = np.random.default_rng(0).dirichlet(np.full(6, 0.5), size=103)
    probs[::7, 2] = 0
    probs /= probs.sum(axis=1, keepdims=True)
    mean, std = metrics.inception_score(probs, splits=10)
    expected = reference_inception_score(probs, splits=10)
    assert (mean, std) == pytest.approx(expected, rel=1e-12)
    assert std > 0
    with pytest.raises(ValueError, match='cannot be split 10 ways'):
        metrics.inception_score(probs[:9], splits=10)


def test_precision_recall_known_answers_and_reference(monkeypatch):
    rng = np.random.default_rng(1)
    real = rng.normal(size=[40, 5])
    fake = rng.normal(size=[35, 5]) * 1.5 + 0.7  # wider and shifted: neither set covers the other
    expected = reference_precision_recall(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    to = lambda a: torch.from_numpy(a)
    assert metrics.precision_recall(to(real), to(fake)) == expected
    # Row batches of any size give the same answer.
    chunks = metrics._row_chunks
    monkeypatch.setattr(metrics, '_row_chunks', lambda x, cols: chunks(x, cols, max_elems=3 * cols))
    assert metrics.precision_recall(to(real), to(fake)) == expected
    # A set against itself is inside its own manifold; far-away sets share none of it.
    assert metrics.precision_recall(to(real), to(real)) == (1.0, 1.0)
    assert metrics.precision_recall(to(real), to(fake + 100)) == (0.0, 0.0)
    with pytest.raises(ValueError, match='no 3-th nearest'):
        metrics.precision_recall(to(real[:3]), to(fake))


def test_fid_py_is_and_pr(tmp_path, classifier_pkl):
    gen, real = random_images(23, [3, 4, 4], seed=1), random_images(17, [3, 4, 4], seed=2)
    gen_dir, real_dir = write_images(tmp_path / 'gen', gen), write_images(tmp_path / 'real', real)
    invoke = lambda *args: CliRunner().invoke(fid.main, [str(a) for a in args])

    result = invoke('is', '--images', gen_dir, '--num-images', 23, '--splits', 4, '--detector', classifier_pkl,
                    '--trust-detector', '--workers', 0, '--batch', 5)
    assert result.exit_code == 0, result.output
    mean, std = (float(v) for v in result.output.splitlines()[-1].split())
    assert (mean, std) == pytest.approx(reference_inception_score(classifier_probs(gen), 4), rel=1e-5)

    # Precision/recall on pixels: all 17 real images (fewer than the 20 generated ones chosen by --seed).
    result = invoke('pr', '--images', gen_dir, '--data', real_dir, '--num-images', 20, '--seed', 5,
                    '--detector', 'pixels', '--workers', 0, '--batch', 6)
    assert result.exit_code == 0, result.output
    keep = np.arange(23)
    np.random.RandomState(5).shuffle(keep)
    p, r = reference_precision_recall(pixel_features(real), pixel_features([gen[i] for i in sorted(keep[:20])]))
    assert result.output.splitlines()[-1] == f'precision {p:g} recall {r:g}'

    # One-line errors: no class probabilities in pixels, too few images, real images of another resolution.
    assert_one_line_error(invoke('is', '--images', gen_dir, '--num-images', 23, '--detector', 'pixels'),
                          'no class probabilities')
    assert_one_line_error(invoke('pr', '--images', gen_dir, '--data', real_dir, '--detector', 'pixels'),
                          'Found 23 images but 50000 were requested')
    small = write_images(tmp_path / 'small', random_images(5, [3, 2, 2], seed=3))
    assert_one_line_error(invoke('pr', '--images', gen_dir, '--data', small, '--num-images', 23, '--detector',
                                 'pixels', '--workers', 0), '48 features but real ones 12')


def test_vgg16_offline_then_cached(tmp_path, monkeypatch, classifier_pkl):
    go_offline(monkeypatch, tmp_path / 'cache')
    cache_path = dnnlib.util.url_cache_path(metrics.VGG16_URL)
    gen_dir = write_images(tmp_path / 'gen', random_images(5, [3, 4, 4], seed=4))
    result = CliRunner().invoke(fid.main, ['pr', '--images', gen_dir, '--data', gen_dir, '--num-images', '5'])
    assert_one_line_error(result, 'Cannot download the VGG16 detector', metrics.VGG16_URL, cache_path)
    # Placed in the cache, the official file loads without network once trusted (which records its sha256), then
    # without a trust flag.
    os.makedirs(os.path.dirname(cache_path))
    with open(classifier_pkl, 'rb') as src, open(cache_path, 'wb') as dst:
        dst.write(src.read())
    args = ['pr', '--images', gen_dir, '--data', gen_dir, '--num-images', '5', '--workers', '0']
    assert_one_line_error(CliRunner().invoke(fid.main, args), 'not downloaded by this project', '--trust-detector')
    for trust in [['--trust-detector'], []]:
        result = CliRunner().invoke(fid.main, args + trust)
        assert result.exit_code == 0 and result.output.splitlines()[-1] == 'precision 1 recall 1', result.output

# ----------------------------------------------------------------------------

TORCHRUN_SCRIPT = '''
import sys
import numpy as np
import torch
from torch_utils import distributed as dist
from training import metrics, training_loop
from training.dataset import ImageFolderDataset

def sample_fn(seeds):
    return torch.stack([torch.randint(0, 256, [3, 2, 2], dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(s)) for s in seeds])

class Method:
    """The training loop's view of a method: networks() and sample(z, c) -> images in [-1, 1]."""
    def networks(self):
        net = torch.nn.Module()
        net.img_channels, net.img_resolution, net.label_dim = 3, 2, 0
        return dict(G=net)

    def sample(self, z, c):
        return torch.tanh(z)

dist.init()
data = metrics.compute_features(ImageFolderDataset(sys.argv[1]), metrics.pixels_detector, num=7, seed=3, batch=2)
sampled = metrics.compute_features(metrics.sampler_batches(sample_fn, 5, batch=2), metrics.pixels_detector)
# In-training precision/recall: real features (a collective) and the generated ones, in the run directory sys.argv[3].
training_loop._run_metrics(Method(), ['pr1k'], dict(detector='pixels', pr_data=sys.argv[1], batch=7), sys.argv[3],
                           0, torch.device('cpu'))
if dist.get_rank() == 0:
    np.savez(sys.argv[2], data=data.numpy(), sampled=sampled.numpy(), world=dist.get_world_size())
dist.shutdown()
'''


def test_features_and_in_training_pr_across_two_processes_in_global_order(tmp_path):
    images = random_images(11, [3, 2, 2], seed=6)
    data = write_images(tmp_path / 'data', images)
    (tmp_path / 'run.py').write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    for name, launcher in [('one', []), ('two', ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])]:
        os.makedirs(tmp_path / name)
        proc = subprocess.run([sys.executable, *launcher, str(tmp_path / 'run.py'), data, str(tmp_path / f'{name}.npz'),
                               str(tmp_path / name)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    pr = [json.loads((tmp_path / name / 'metric-pr1k.jsonl').read_text())['results'] for name in ('one', 'two')]
    assert pr[0] == pr[1] and 0 < pr[0]['pr1k_precision'] < 1
    keep = np.arange(11)
    np.random.RandomState(3).shuffle(keep)
    with np.load(tmp_path / 'two.npz') as two:
        assert int(two['world']) == 2
        np.testing.assert_array_equal(two['data'], pixel_features([images[i] for i in sorted(keep[:7])]))
        expected = [torch.randint(0, 256, [3, 2, 2], dtype=torch.uint8, generator=torch.Generator().manual_seed(s))
                    .numpy() for s in range(5)]
        np.testing.assert_array_equal(two['sampled'], pixel_features(expected))

# ----------------------------------------------------------------------------

def test_in_training_is_and_pr_equal_fid_py_on_generated_images(teacher_pkl, tmp_path, monkeypatch, classifier_pkl):
    """--metrics=is1k,pr1k with the official detector names (files placed in the cache with the sha256 a download
    records: no network) give what generate.py + the same detectors give for seeds 0-999, against --pr-data."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    for url in (metrics.INCEPTION_URL, metrics.VGG16_URL):
        os.makedirs(os.path.dirname(dnnlib.util.url_cache_path(url)), exist_ok=True)
        with open(dnnlib.util.url_cache_path(url), 'wb') as f:
            f.write(classifier_pkl.read_bytes())
        with open(dnnlib.util.url_cache_path(url) + '.sha256', 'w') as f:
            f.write(hashlib.sha256(classifier_pkl.read_bytes()).hexdigest())
    real = write_images(tmp_path / 'real', random_images(30, [3, 8, 8], seed=7))
    args = [f'--outdir={tmp_path / "run"}', f'--teacher={teacher_pkl}', '--duration=0.000008', '--nosubdir',
            *DMD_ARGS, '--metrics=is1k,pr1k']
    r = CliRunner().invoke(train.main, args)
    assert r.exit_code == 1 and '--pr-data=ZIP|DIR' in r.output, r.output
    r = CliRunner().invoke(train.main, [*args, f'--pr-data={real}'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    is_line, = [json.loads(l) for l in open(tmp_path / 'run' / 'metric-is1k.jsonl')]
    pr_line, = [json.loads(l) for l in open(tmp_path / 'run' / 'metric-pr1k.jsonl')]
    stats = [json.loads(l) for l in open(tmp_path / 'run' / 'stats.jsonl')]
    assert stats[-1]['Metrics/is1k']['mean'] == is_line['results']['is1k']

    net = generate.load_network(str(tmp_path / 'run' / 'network-snapshot-000000.pkl'))
    generate.generate_images(net, list(range(1000)), str(tmp_path / 'images'), batch=250)
    detector = metrics.load_detector('inception')
    images = ImageFolderDataset(str(tmp_path / 'images'))
    probs = metrics.compute_features(images, detector, probabilities=True)
    mean, std = metrics.inception_score(probs)
    assert is_line['results'] == dict(is1k=pytest.approx(mean, rel=1e-6), is1k_std=pytest.approx(std, rel=1e-5))
    precision, recall = metrics.precision_recall(metrics.compute_features(ImageFolderDataset(real), detector),
                                                 metrics.compute_features(images, detector))
    assert pr_line['results'] == dict(pr1k_precision=precision, pr1k_recall=recall)


def test_metric_option_errors(teacher_pkl, tmp_path):
    base = [f'--outdir={tmp_path / "run"}', f'--teacher={teacher_pkl}', *DMD_ARGS]
    r = CliRunner().invoke(train.main, [*base, '--metrics=kid50k'])
    assert r.exit_code == 2 and 'use fidNk, isNk or prNk' in r.output, r.output
    r = CliRunner().invoke(train.main, [*base, '--metrics=fid1k'])
    assert r.exit_code == 1 and '--ref=NPZ|URL' in r.output, r.output
    small = write_images(tmp_path / 'small', random_images(5, [3, 4, 4], seed=8))
    r = CliRunner().invoke(train.main, [*base, '--metrics=pr1k', f'--pr-data={small}', '--detector=pixels'])
    assert r.exit_code == 1 and "generator's 8x8x3" in r.output, r.output
    assert not (tmp_path / 'run').exists()
