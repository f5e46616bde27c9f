"""Exact toy problem: mixture parameters, sampler moments, denoiser vs Tweedie and Monte Carlo, conditional/unconditional
consistency, pickles, metrics with known answers, fitting, and the toy.py build/metrics commands."""

import io
import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import toy as toy_cli
from torch_utils import persistence
from training import networks, toy
from training.distill.guided import check_null_guide

SMALL = dict(img_resolution=4, img_channels=1, num_components=3, seed=0)  # D = 16: Monte Carlo is accurate


def noisy_samples(gmm, num, sigma, seed):
    """Noisy exact samples x = x0 + s n (float64) and their components."""
    generator = torch.Generator().manual_seed(seed)
    x0, k = gmm.sample(num, generator=generator)
    return x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64), k

# ----------------------------------------------------------------------------
# The mixture.

def test_make_mixture_is_deterministic_and_within_its_ranges():
    kwargs = dict(img_resolution=8, img_channels=3, num_components=5, mean_scale=0.6, std_min=0.05, std_max=0.2,
                  weight_ratio=3.0)
    means, stds, weights = toy.make_mixture(seed=7, **kwargs)
    again = toy.make_mixture(seed=7, **kwargs)
    other = toy.make_mixture(seed=8, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip((means, stds, weights), again))
    assert not np.allclose(means, other[0])
    assert means.shape == (5, 3, 8, 8) and np.abs(means).max() < 0.6
    assert stds.min() >= 0.05 and stds.max() <= 0.2
    assert np.isclose(weights.sum(), 1) and weights.max() / weights.min() <= 3.0
    # Smooth templates: neighbouring pixels differ far less than in white noise of the same spread (1.13 std).
    assert np.abs(np.diff(means, axis=3)).mean() < 0.5 * means.std(axis=(2, 3)).mean()


def test_exact_sampler_matches_exact_moments():
    gmm = toy.GMMDenoiser(**SMALL)
    x, k = gmm.sample(200000, generator=torch.Generator().manual_seed(0))
    mu, sigma = gmm.moments()
    x = x.flatten(1).numpy()
    assert np.abs(x.mean(0) - mu).max() < 5 * np.sqrt(np.diag(sigma).max() / len(x))
    assert np.abs(np.cov(x, rowvar=False) - sigma).max() < 0.02 * np.abs(sigma).max()
    hist = np.bincount(k.numpy(), minlength=3) / len(k)
    assert np.abs(hist - gmm.weights.numpy()).max() < 0.005
    # Classes come first from the stream, then the noise: given classes reproduce the same images.
    x2, _ = gmm.sample(5, generator=torch.Generator().manual_seed(1), class_idx=torch.tensor([2, 2, 0, 1, 2]))
    assert torch.equal(torch.tensor([2, 2, 0, 1, 2]), gmm.log_posterior(x2, 0).argmax(1))

# ----------------------------------------------------------------------------
# The exact denoiser.

@pytest.mark.parametrize('sigma', [0.05, 0.3, 1.0, 5.0])
@pytest.mark.parametrize('conditional', [False, True])
def test_denoiser_satisfies_tweedie(sigma, conditional):
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3)
    x, k = noisy_samples(gmm, 64, sigma, seed=1)
    labels = torch.nn.functional.one_hot(k, 3).to(torch.float32) if conditional else None
    x.requires_grad_(True)
    score, = torch.autograd.grad(gmm.log_prob(x, sigma, labels).sum(), x)
    D = gmm(x.detach(), sigma, labels)
    assert D.dtype == torch.float32
    torch.testing.assert_close(D.double(), x.detach() + sigma ** 2 * score, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('sigma', [0.3, 1.0])
def test_denoiser_matches_monte_carlo_posterior_mean(sigma):
    """E[x0 | x] and P(k | x) by importance weighting 400k exact draws with the likelihood N(x; x0, s^2 I)."""
    gmm = toy.GMMDenoiser(**SMALL)
    x0, k = gmm.sample(400000, generator=torch.Generator().manual_seed(2))
    x0 = x0.flatten(1)
    queries, _ = noisy_samples(gmm, 4, sigma, seed=3)
    D = gmm(queries, sigma).double().flatten(1)
    post = gmm.log_posterior(queries, sigma).exp()
    for i, q in enumerate(queries.flatten(1)):
        log_w = -0.5 * (x0 - q).square().sum(1) / sigma ** 2
        w = (log_w - log_w.max()).exp()
        w /= w.sum()
        ess = 1 / w.square().sum()
        assert ess > 2000
        mean = w @ x0
        se = (w @ (x0 - mean).square() / ess).sqrt()
        assert ((mean - D[i]).abs() / se).max() < 4.5
        post_mc = torch.stack([w[k == j].sum() for j in range(3)])
        assert (post_mc - post[i]).abs().max() < 4.5 * (0.25 / ess).sqrt() + 1e-9


def test_unconditional_is_posterior_mixture_of_conditionals():
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3)
    for sigma in [0.1, 0.7, 3.0]:
        x, _ = noisy_samples(gmm, 32, sigma, seed=4)
        g = gmm.log_posterior(x, sigma).exp()
        D_c = torch.stack([gmm(x, sigma, torch.eye(3)[j].expand(32, 3)).double() for j in range(3)], dim=1)
        torch.testing.assert_close(gmm(x, sigma).double(), (g[:, :, None, None, None] * D_c).sum(1),
                                   rtol=1e-6, atol=1e-6)
        # All-zero label rows mean unconditional; label_dim=0 ignores labels, as EDM's unconditional networks.
        labels = torch.eye(3)[torch.arange(32) % 3]
        labels[::2] = 0
        D = gmm(x, sigma, labels)
        assert torch.equal(D[::2], gmm(x, sigma)[::2]) and torch.equal(D[1::2], gmm(x, sigma, labels)[1::2])
        assert torch.equal(toy.GMMDenoiser(**SMALL)(x, sigma, labels), gmm(x, sigma))
        # One sigma per image equals the scalar.
        assert torch.equal(gmm(x, torch.full([32], sigma, dtype=torch.float64), labels), D)


def test_denoiser_limits_and_interface():
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3)
    x, _ = noisy_samples(gmm, 8, 0.5, seed=5)
    assert torch.equal(gmm(x, 0), x.to(torch.float32))  # nothing to remove at s = 0
    mu, _ = gmm.moments()
    torch.testing.assert_close(gmm(x, 1e4).double().flatten(1), torch.as_tensor(mu).expand(8, -1), rtol=0, atol=1e-4)
    assert (gmm.img_resolution, gmm.img_channels, gmm.label_dim) == (4, 1, 3)
    assert gmm.sigma_min == 0 and gmm.sigma_max == float('inf') and gmm.use_fp16 is False
    assert torch.equal(gmm.round_sigma(0.123), torch.as_tensor(0.123))
    with pytest.raises(ValueError, match='Expected x of shape'):
        gmm(torch.zeros(2, 3, 4, 4), 1.0)
    with pytest.raises(ValueError, match='one entry per image'):
        gmm(x, torch.ones(3))
    with pytest.raises(ValueError, match='non-negative'):
        gmm(x, 1.0, -torch.eye(3)[[0] * 8])
    with pytest.raises(ValueError, match='label_dim must be 0 or num_components'):
        toy.GMMDenoiser(**SMALL, label_dim=5)


def test_guided_denoiser_interpolates_and_extrapolates():
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3)
    x, k = noisy_samples(gmm, 16, 1.0, seed=6)
    c = torch.nn.functional.one_hot(k, 3).to(torch.float32)
    D_c, D_u = gmm(x, 1.0, c), gmm(x, 1.0)
    assert torch.equal(toy.guided_denoiser(gmm, x, 1.0, c, 0), D_c)
    torch.testing.assert_close(toy.guided_denoiser(gmm, x, 1.0, c, -1), D_u)
    torch.testing.assert_close(toy.guided_denoiser(gmm, x, 1.0, c, 2), 3 * D_c - 2 * D_u)


def test_pickle_round_trip_safe_and_with_code():
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3, mean_scale=0.5)
    blob = pickle.dumps(dict(ema=gmm))
    assert b'_reconstruct_persistent_obj' in blob and b'class GMMDenoiser' in blob  # EDM protocol, source embedded
    x, k = noisy_samples(gmm, 8, 0.5, seed=7)
    c = torch.nn.functional.one_hot(k, 3).to(torch.float32)
    for allow_code in (False, True):
        net = persistence.load(io.BytesIO(blob), allow_code=allow_code)['ema']
        assert type(net).__name__ == 'GMMDenoiser' and net.init_kwargs == gmm.init_kwargs
        assert (type(net) is toy.GMMDenoiser) == (not allow_code)  # safe: our class; with code: the embedded one
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), gmm.state_dict().values()))
        assert torch.equal(net(x, 0.5, c), gmm(x, 0.5, c)) and torch.equal(net(x, 0.5), gmm(x, 0.5))

# ----------------------------------------------------------------------------
# Metrics.

def test_fd_of_exact_gaussian_samples_matches_finite_sample_expectation():
    """One isotropic Gaussian: E[FD] = s^2 (d/n + d(d+1)/(4(n-1))) to first order in d/n."""
    means, stds, weights = torch.full([1, 1, 8, 8], 0.1, dtype=torch.float64), torch.tensor([0.2]), torch.tensor([1.0])
    n, d = 20000, 64
    x, _ = toy.sample_mixture(means, stds.double(), weights.double(), n, torch.Generator().manual_seed(0))
    r = toy.mixture_metrics([x[:7000].flatten(1).numpy(), x[7000:].flatten(1).numpy()], means, stds, weights,
                            quantized=False)
    expected = 0.2 ** 2 * (d / n + d * (d + 1) / (4 * (n - 1)))
    assert r['num'] == n and abs(r['fd'] / expected - 1) < 0.15
    assert r['mode_tv'] == 0 and abs(r['precision'] - 0.99) < 4 * np.sqrt(0.99 * 0.01 / n)
    assert abs(r['spread'] - 1) < 4 * np.sqrt(2 / (n * d))  # mean of chi^2_d / d over n samples
    # A 50% too wide distribution: FD = d (0.3 - 0.2)^2 + the finite-sample term, and few samples are precise.
    r_wide = toy.mixture_metrics([0.1 + 1.5 * (x.flatten(1).numpy() - 0.1)], means, stds, weights, quantized=False)
    assert abs(r_wide['fd'] / (d * 0.1 ** 2 + 1.5 ** 2 * expected) - 1) < 0.05 and r_wide['precision'] < 0.05
    assert r_wide['spread'] == pytest.approx(1.5 ** 2 * r['spread'])


def test_dropped_mode_gives_tv_equal_to_its_weight():
    gmm = toy.GMMDenoiser(img_resolution=8, img_channels=3, num_components=5, seed=1)
    w, n, dropped = gmm.weights, 10000, 2
    counts = torch.round(n * w / (1 - w[dropped])).long()
    counts[dropped] = 0
    class_idx = torch.repeat_interleave(torch.arange(5), counts)
    x, _ = gmm.sample(len(class_idx), generator=torch.Generator().manual_seed(0), class_idx=class_idx)
    r = toy.mixture_metrics([toy.from_uint8(toy.to_uint8(x).numpy())], gmm.means, gmm.stds, w)
    hist = counts.double() / counts.sum()
    assert np.allclose(r['mode_hist'], hist.numpy())  # every sample is assigned its own component
    assert r['mode_tv'] == pytest.approx(0.5 * float((hist - w).abs().sum()))
    assert abs(r['mode_tv'] - float(w[dropped])) < 5 / n
    assert r['precision'] > 0.98
    with pytest.raises(ValueError, match='check resolution/channels'):
        toy.mixture_metrics([np.zeros([4, 10])], gmm.means, gmm.stds, w)


def test_uint8_round_trip_error_is_uniform_rounding():
    x = torch.rand(200000, dtype=torch.float64) * 1.8 - 0.9
    err = toy.from_uint8(toy.to_uint8(x).numpy()[:, None]).ravel() - x.numpy()
    assert np.abs(err).max() <= 0.5 / 127.5 + 1e-12 and abs(err.mean()) < 1e-5
    assert err.var() == pytest.approx(toy.QUANT_VAR, rel=0.02)
    assert toy.to_uint8(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]

# ----------------------------------------------------------------------------
# Fitting a network.

def tiny_net(label_dim=3, label_dropout=0):
    torch.manual_seed(0)
    return networks.EDMPrecond(4, 1, label_dim=label_dim, model_type='SongUNet', model_channels=8, channel_mult=[1],
                               num_blocks=1, attn_resolutions=[], dropout=0, label_dropout=label_dropout)


def test_fit_denoiser_reduces_error_and_is_deterministic():
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3)
    x, k = noisy_samples(gmm, 256, 0.5, seed=8)
    c = torch.nn.functional.one_hot(k, 3).to(torch.float32)
    def error(net):
        with torch.no_grad():
            return float((net(x, 0.5, c) - gmm(x, 0.5, c)).square().mean())
    nets = [tiny_net() for _ in range(3)]
    before = error(nets[0])
    runs = [list(toy.fit_denoiser(net, gmm, num_steps=30, batch_size=32, lr=1e-2, seed=seed))
            for net, seed in zip(nets, [0, 0, 1])]
    assert error(nets[0]) < 0.5 * before
    assert runs[0] == runs[1] and [step for step, _ in runs[0]] == list(range(30))
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))
    assert runs[0] != runs[2]
    with pytest.raises(ValueError, match='label_dim'):
        next(toy.fit_denoiser(tiny_net(), toy.GMMDenoiser(**SMALL), num_steps=1))


def test_fit_drops_labels_itself_not_through_the_nets_label_dropout():
    """A net that records label_dropout=p_uncond is fitted exactly as one without: only fit_denoiser drops labels
    (with their exact unconditional targets), whatever mode the caller left the net in."""
    gmm = toy.GMMDenoiser(**SMALL, label_dim=3)
    nets = [tiny_net(label_dropout=p).train() for p in [0, 0.1]]
    runs = [list(toy.fit_denoiser(net, gmm, num_steps=5, batch_size=32, lr=1e-2, p_uncond=0.1, seed=0)) for net in nets]
    assert runs[0] == runs[1]
    assert all(torch.equal(a, b) for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()))

# ----------------------------------------------------------------------------
# Command line.

BUILD = ['--resolution=8', '--channels=1', '--K=3', '--num-images=300', '--fit-kimg=0.064', '--fit-batch=32',
         '--fit-channels=8', '--fit-mult=1']


def test_build_writes_a_deterministic_problem(tmp_path):
    runner = CliRunner()
    for name in ['a', 'b']:
        result = runner.invoke(toy_cli.cli, ['build', f'--outdir={tmp_path / name}', *BUILD])
        assert result.exit_code == 0, result.output
    a, b = tmp_path / 'a', tmp_path / 'b'
    info = json.loads((a / 'problem.json').read_text())
    assert info['problem'] == dict(img_resolution=8, img_channels=1, num_components=3, seed=0)
    assert info['fit']['num_steps'] == 2 and set(info['fit_rms']) >= {'0.002', '80'}
    gmm = toy.GMMDenoiser(**info['problem'], label_dim=3)

    # Reference statistics are the exact ones.
    with np.load(a / 'reference.npz') as ref:
        mu, sigma = gmm.moments()
        assert np.array_equal(ref['mu'], mu) and np.array_equal(ref['sigma'], sigma)
        assert np.array_equal(ref['means'], gmm.means.numpy()) and np.array_equal(ref['weights'], gmm.weights.numpy())

    # The dataset holds the exact samples of the problem's seed, with their components as labels.
    x, k = gmm.sample(300, generator=torch.Generator().manual_seed(0))
    with zipfile.ZipFile(a / 'dataset.zip') as z:
        meta = json.loads(z.read('dataset.json'))
    assert [label for _, label in meta['labels']] == k.tolist()
    from training.dataset import ImageFolderDataset
    data = ImageFolderDataset(a / 'dataset.zip', use_labels=True)
    assert len(data) == 300 and np.array_equal(data[5][0], toy.to_uint8(x[5]).numpy())

    # Teachers load safely; the exact one is the conditional GMMDenoiser; the build is deterministic.
    exact = persistence.load_network_pkl(str(a / 'teacher-exact.pkl'))
    assert isinstance(exact, toy.GMMDenoiser) and exact.label_dim == 3
    unet = persistence.load_network_pkl(str(a / 'teacher-unet.pkl'))
    assert isinstance(unet, networks.EDMPrecond) and unet.label_dim == 3 and not unet.training
    assert unet.model.label_dropout == 0.1  # fitted with 10% zero labels: its zero label is unconditional
    check_null_guide(unet)  # so guided distillation accepts it as its own guide (--guide=null)
    assert (a / 'reference.npz').read_bytes() == (b / 'reference.npz').read_bytes()
    unet_b = persistence.load_network_pkl(str(b / 'teacher-unet.pkl'))
    assert all(torch.equal(p, q) for p, q in zip(unet.state_dict().values(), unet_b.state_dict().values()))

    result = runner.invoke(toy_cli.cli, ['build', f'--outdir={a}', *BUILD])
    assert result.exit_code == 1 and 'already holds' in result.output
    result = runner.invoke(toy_cli.cli, ['build', f'--outdir={tmp_path / "c"}', '--resolution=12'])
    assert result.exit_code == 2 and 'power of two' in result.output


def test_metrics_command_images_and_network(tmp_path):
    runner = CliRunner()
    problem = tmp_path / 'p'
    assert runner.invoke(toy_cli.cli, ['build', f'--outdir={problem}', *BUILD[:4], '--fit-kimg=0']).exit_code == 0
    ref = toy_cli.load_reference(problem)

    # The dataset (classes drawn from the weights) measured from its zip equals the library on the same images.
    out = tmp_path / 'm.json'
    result = runner.invoke(toy_cli.cli, ['metrics', f'--problem={problem}', f'--images={problem / "dataset.zip"}',
                                         '--labels=weights', f'--out={out}'])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())
    from training.dataset import ImageFolderDataset
    images = np.stack([img for img, _ in ImageFolderDataset(problem / 'dataset.zip')])
    direct = toy.mixture_metrics([toy.from_uint8(images)], ref['means'], ref['stds'], ref['weights'])
    assert m['images'] == direct and m['num'] == 300 and m['floor']['num'] == 300
    assert f'{direct["fd"]:12.5f}' in result.output and 'floor' in result.output

    # --network samples seeds exactly as generate.py does (latents, then a uniform class, then sampler noise).
    net = persistence.load_network_pkl(str(problem / 'teacher-exact.pkl'))
    batch = next(toy_cli.network_batches(net, ref, 6, 'uniform', num_steps=4))
    expected = generate.generate_batch(net, list(range(6)), 'cpu', num_steps=4).numpy()
    assert np.array_equal(batch, toy.from_uint8(expected))
    result = runner.invoke(toy_cli.cli, ['metrics', f'--problem={problem}', f'--network={problem / "teacher-exact.pkl"}',
                                         '--num=40', '--steps=4', '--labels=none'])
    assert result.exit_code == 0 and '40 images' in result.output

    # Clear errors.
    result = runner.invoke(toy_cli.cli, ['metrics', f'--problem={tmp_path}', f'--images={problem / "dataset.zip"}'])
    assert result.exit_code == 1 and 'No reference.npz' in result.output
    result = runner.invoke(toy_cli.cli, ['metrics', f'--problem={problem}', f'--images={problem / "dataset.zip"}',
                                         '--num=301'])
    assert result.exit_code == 1 and 'holds only 300' in result.output
    result = runner.invoke(toy_cli.cli, ['metrics', f'--problem={problem}'])
    assert result.exit_code == 2 and 'exactly one of --images or --network' in result.output
