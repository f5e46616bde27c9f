"""DMD on closed-form problems, its pieces, and train.py --method=dmd."""

import json
import math
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import train
from torch_utils import persistence
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.dataset import ImageFolderDataset
from training.distill.dmd import DMD

# ----------------------------------------------------------------------------
# Gaussian denoisers with the preconditioner interface.

class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mean, std^2 I): D(x; s) = mean + std^2 / (std^2 + s^2) (x - mean), with learnable
    mean and log-std. As the teacher it is the exact real score; its copies are a Gaussian fake score and an
    affine generator G(z) = mean + std^2 / (std^2 + s^2) (s z - mean)."""

    def __init__(self, mean, std):
        super().__init__()
        self.img_channels, self.img_resolution = mean.shape[0], mean.shape[1]
        self.label_dim = 0
        self.sigma_min, self.sigma_max = 0, float('inf')
        self.mean = torch.nn.Parameter(mean.clone())
        self.log_std = torch.nn.Parameter(torch.tensor(math.log(std)))

    def forward(self, x, sigma, class_labels=None, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        t2 = (2 * self.log_std).exp()
        return (self.mean + t2 / (t2 + sigma ** 2) * (x.to(torch.float32) - self.mean)).to(torch.float32)


def run_steps(method, num_steps, batch_size, seed=0):
    for step in range(num_steps):
        rand = StepRandom(seed, step, batch_size, 'cpu')
        method.step([Round(None, None, rand, 0, batch_size)], step * batch_size)


def generator_moments(method, n=20000):
    z = torch.randn([n, *method.img_shape], generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        x = method.generate(method.G, z, None)
    return x.mean(0), x.std(0).mean()


def test_dmd_converges_to_gaussian_data():
    """Single Gaussian data, exact real score, Gaussian fake score fitted by its denoising loss, affine generator.
    With DMD2's two-time-scale rule the generator reaches the data mean and std (the fake score then equals
    the real one, so the distribution-matching gradient vanishes)."""
    mu = torch.tensor([0.3, -0.2, 0.1, 0.5]).reshape(1, 2, 2)
    t_data = 0.3
    dmd = DMD(GaussianDenoiser(mu, t_data), 'cpu', batch_size=64, sigma_init=0.5, lr=1e-2, fake_lr=2e-2,
              fake_steps=3, ema_halflife_kimg=None, max_grad_norm=1e3)
    # Start the generator away from the data: mean shifted, spread collapsed.
    with torch.no_grad():
        dmd.G.mean.add_(0.5)
        dmd.G.log_std.add_(-1.0)
    mean0, std0 = generator_moments(dmd)
    assert (mean0 - mu).abs().max() > 0.3 and std0 < 0.1
    run_steps(dmd, 1600, 64)
    dmd.lr, dmd.fake_lr = 2e-3, 4e-3  # a second, slower phase removes most of the stochastic jitter
    run_steps(dmd, 2400, 64, seed=1)
    mean, std = generator_moments(dmd)
    assert (mean - mu).abs().max() < 0.03, (mean, mu)
    assert abs(std - t_data) < 0.02, (std, t_data)
    assert (dmd.fake.mean - mu).abs().max() < 0.05
    assert abs(dmd.fake.log_std.exp() - t_data) < 0.03


def test_distribution_matching_gradient_is_injected_exactly():
    """d L_DM / d x = (p_fake - p_real) / mean|x - p_real| / numel, with noise levels from [0.02T, 0.98T]."""
    mu = torch.zeros(1, 2, 2)
    dmd = DMD(GaussianDenoiser(mu, 0.5), 'cpu', batch_size=4, sigma_init=2.5, ema_halflife_kimg=None)
    with torch.no_grad():
        dmd.fake.mean.fill_(0.4)
    r = Round(None, None, StepRandom(0, 0, 4, 'cpu'), 0, 4)
    x = torch.randn(4, 1, 2, 2, requires_grad=True)
    loss = dmd.distribution_matching_loss(x, r, None)
    loss.sum().backward()
    t = r.randint('dm_t', dmd.dm_t_hi - dmd.dm_t_lo + 1) + dmd.dm_t_lo
    assert t.min() >= 20 and t.max() <= 980
    sigma = dmd.sigma_grid[t].view(-1, 1, 1, 1)
    x_s = x.detach() + sigma * r.randn('dm_n', 1, 2, 2)
    p_real = dmd.real(x_s, sigma.flatten())
    p_fake = dmd.fake(x_s, sigma.flatten())
    w = (x.detach() - p_real).abs().mean(dim=[1, 2, 3], keepdim=True)
    torch.testing.assert_close(x.grad, (p_fake - p_real) / w / 4, rtol=1e-5, atol=1e-7)


def test_sigma_grid_range():
    dmd = DMD(GaussianDenoiser(torch.zeros(1, 2, 2), 0.5), 'cpu', batch_size=4, ema_halflife_kimg=None)
    grid = dmd.sigma_grid.double()
    assert grid[0] == pytest.approx(80, rel=1e-6) and grid[-1] == pytest.approx(0.002, rel=1e-5)
    assert grid[20] == pytest.approx(71.7, rel=2e-3) and grid[980] == pytest.approx(0.0031, rel=3e-2)


def test_two_time_scale_updates_generator_every_k_steps():
    dmd = DMD(GaussianDenoiser(torch.full([1, 2, 2], 0.3), 0.5), 'cpu', batch_size=8, fake_steps=5, ema_halflife_kimg=None)
    optimizer_steps = lambda opt: int(opt.state[opt.param_groups[0]['params'][0]].get('step', 0))
    g_steps, fake_steps = [], []
    for step in range(10):
        dmd.step([Round(None, None, StepRandom(0, step, 8, 'cpu'), 0, 8)], step * 8)
        g_steps.append(optimizer_steps(dmd.opt_G))
        fake_steps.append(optimizer_steps(dmd.opt_fake))
    assert g_steps == [1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert fake_steps == list(range(1, 11))
    assert dmd.num_g_steps == 2 and dmd.num_steps == 10


# ----------------------------------------------------------------------------
# Through the loop and the CLI with a tiny EDM teacher.

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1],
            num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope='module')
def teacher_pkl(tmp_path_factory):
    from training.networks import EDMPrecond
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=EDMPrecond(**TINY)), f)
    return path


DMD_ARGS = ['--method=dmd', '--batch=8', '--tick=0.008', '--snap=1', '--dump=1', '--seed=1', '--device=cpu',
            '--sigma-init=80', '--lr=1e-4']


def test_cli_dmd_snapshot_samples_one_step_without_flags(teacher_pkl, tmp_path):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', '--duration=0.000016',
                                        '--nosubdir', *DMD_ARGS], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    snap = tmp_path / 'network-snapshot-000000.pkl'
    with open(snap, 'rb') as f:
        G = persistence.load(f)['ema']
    assert G.sampling_spec['num_steps'] == 1 and G.sampling_spec['sigma_max'] == 80
    with PIL.Image.open(tmp_path / 'fakes-000000.png') as grid:  # 64 previews as 8x8 blocks: x, x_real, x_fake
        assert grid.size == (8 * 8, 3 * 8 * 8)
    # generate.py: one network evaluation per batch, equal to G(80 z; 80).
    calls = []
    G.register_forward_hook(lambda *a: calls.append(1))
    images = generate.generate_batch(G, [0, 1, 2], 'cpu')
    assert len(calls) == 1
    from training.samplers import StackedRandomGenerator
    rnd = StackedRandomGenerator('cpu', [0, 1, 2])
    z = rnd.randn([3, 3, 8, 8])
    c = torch.eye(4)[rnd.randint(4, size=[3])]
    with torch.no_grad():
        x = G(z.double() * 80, torch.full([3], 80.0), c)
    expected = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert (images.to(torch.int16) - expected.to(torch.int16)).abs().max() <= 1


def test_dmd_resume_is_bitwise_exact(teacher_pkl, tmp_path):
    common = [f'--teacher={teacher_pkl}', '--duration=0.000032', '--nosubdir', *DMD_ARGS, '--fake-steps=2']
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "full"}', *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "part"}', *common[:1], '--duration=0.000008',
                                        *common[2:]], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(train.main, [f'--resume={tmp_path / "part"}', *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    a = torch.load(loop_module.find_latest_state(str(tmp_path / 'full')), weights_only=True)['method']
    b = torch.load(loop_module.find_latest_state(str(tmp_path / 'part')), weights_only=True)['method']
    assert a['num_steps'] == b['num_steps'] == 4 and a['num_g_steps'] == 2
    for net in ['G', 'fake', 'G_ema']:
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)


def test_cli_dmd_needs_teacher(tmp_path):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=dmd', '--device=cpu'])
    assert r.exit_code != 0 and '--teacher' in r.output
    assert not (tmp_path / 'runs').exists()


def test_cli_dmd_gan_needs_data(teacher_pkl, tmp_path):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=dmd', '--device=cpu',
                                        f'--teacher={teacher_pkl}', '--gan-g=3e-3'])
    assert r.exit_code != 0 and '--data' in r.output
    assert not (tmp_path / 'runs').exists()


def test_cli_dmd_lpips_weights_checked_before_any_directory(teacher_pkl, tmp_path):
    """LPIPS's weights are loaded with the other network files (rank 0 first), before the run directory exists."""
    torch.save({'features.0.weight': torch.zeros(3)}, tmp_path / 'not-vgg.pth')
    for vgg, message in [(tmp_path / 'missing.pth', 'No such file'), (tmp_path / 'not-vgg.pth', 'features.0.weight')]:
        r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=dmd', '--device=cpu',
                                            f'--teacher={teacher_pkl}', f'--pairs={tmp_path}', f'--lpips-vgg={vgg}',
                                            f'--lpips-lin={tmp_path / "not-vgg.pth"}'])
        assert r.exit_code != 0 and 'Error: LPIPS:' in r.output and message in r.output, r.output
        assert not (tmp_path / 'runs').exists()


def test_in_training_fid_equals_fid_of_generated_images(teacher_pkl, tmp_path):
    """--metrics=fid1k with the pixel detector gives the FD that generate.py + fid.py calc give for seeds 0-999."""
    from training import metrics
    rng = np.random.default_rng(0)
    mu_ref = rng.normal(size=[192]) * 0.1
    a = rng.normal(size=[192, 192]) * 0.05
    np.savez(tmp_path / 'ref.npz', mu=mu_ref, sigma=a @ a.T)
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "run"}', f'--teacher={teacher_pkl}', '--duration=0.000008',
                                        '--nosubdir', *DMD_ARGS, '--metrics=fid1k', f'--ref={tmp_path / "ref.npz"}',
                                        '--detector=pixels'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in open(tmp_path / 'run' / 'metric-fid1k.jsonl')]
    assert len(lines) == 1
    with open(tmp_path / 'run' / 'network-snapshot-000000.pkl', 'rb') as f:
        G = persistence.load(f)['ema']
    generate.generate_images(G, list(range(1000)), str(tmp_path / 'images'), batch=250, device='cpu')
    mu, sigma = metrics.compute_feature_stats(ImageFolderDataset(str(tmp_path / 'images')), metrics.pixels_detector)
    expected = metrics.frechet_distance(mu, sigma, mu_ref, a @ a.T)
    assert lines[0]['value'] == pytest.approx(expected, rel=1e-4)
