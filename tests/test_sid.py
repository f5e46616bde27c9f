"""SiD on closed-form Gaussian problems (the generator gradient, its expectation, the fixed point), its step, and
train.py --method=sid (options, refusals, SiDA's term, 1 vs 2 processes)."""

import json
import math
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from dataset_tool import save_dataset
from test_dmd import GaussianDenoiser, generator_moments, run_steps
from test_training import train_1_and_2_processes
from torch_utils import persistence
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.distill.sid import SiD
from training.samplers import karras_sigma

# ----------------------------------------------------------------------------
# The generator gradient on Gaussians. Data N(m, s_d^2), fake score the exact denoiser of N(m_f, s_f^2), so that
# y_r = m + k_r (x_t - m), y_f = m_f + k_f (x_t - m_f), k = s^2 / (s^2 + sigma^2), x_t = x + sigma n.

def gaussian_sid(mean=0.3, std=0.5, alpha=1.2, **kwargs):
    return SiD(GaussianDenoiser(torch.full([1, 2, 2], mean), std), 'cpu', batch_size=4, alpha=alpha,
               ema_halflife_kimg=None, **kwargs)


def k_of(net, sigma):
    return net.log_std.exp() ** 2 / (net.log_std.exp() ** 2 + sigma ** 2)


class Retargeted(SiD):
    """DisBack's hook: a subclass whose real_score is another network (the walk's current target)."""

    def __init__(self, target, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.target = target

    def real_score(self, x_s, sigma, labels):
        return self.target(x_s, sigma, labels)


@pytest.mark.parametrize('retargeted', [False, True])
def test_generator_gradient_flows_through_x_and_both_score_inputs(retargeted):
    """dL/dx = [D (R - alpha Delta) + Delta (k_r - 1 - alpha D)] / w per pixel, with Delta = y_r - y_f, R = y_r - x,
    D = k_r - k_f, w = mean|x - y_r| constant: x enters directly and through x_t in both scores (detaching either
    input, or w, changes it). Noise levels: s = Karras(1 - 0.8 u), u ~ U[0, 1), inside [0.002, s(0.2) = 24.4].
    Retargeted: a subclass's real_score replaces the teacher everywhere (how DisBack plugs in)."""
    args = (GaussianDenoiser(torch.full([1, 2, 2], 0.3), 0.5), 'cpu', 256)
    if retargeted:
        sid = Retargeted(GaussianDenoiser(torch.full([1, 2, 2], -0.2), 0.7), *args, alpha=1.2, ema_halflife_kimg=None)
    else:
        sid = SiD(*args, alpha=1.2, ema_halflife_kimg=None)
    real = sid.target if retargeted else sid.real
    with torch.no_grad():
        sid.fake.mean.fill_(0.1)
        sid.fake.log_std.fill_(math.log(0.2))
    r = Round(None, None, StepRandom(0, 0, 256, 'cpu'), 0, 256)
    x = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    sid.distribution_matching_loss(x, r, None).sum().backward()

    sigma = karras_sigma(1 - 0.8 * r.rand('sid_t'), 0.002, 80.0, 7.0)
    assert sigma.min() >= 0.002 and sigma.max() <= (0.8 * 80 ** (1 / 7) + 0.2 * 0.002 ** (1 / 7)) ** 7 <= 24.5
    assert sigma.max() > 20 and sigma.min() < 0.01  # the whole range is drawn
    torch.testing.assert_close(x.grad, expected_gradient(real, sid.fake, x, r, 1.2), rtol=1e-4, atol=1e-6)


def expected_gradient(real, fake, x, r, alpha):
    """The closed form dL/dx of the test above for Gaussian real and fake denoisers, on the draws of round r."""
    sigma = karras_sigma(1 - 0.8 * r.rand('sid_t'), 0.002, 80.0, 7.0)
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        x_t = x + s * r.randn('sid_n', *x.shape[1:])
        y_r, y_f = real(x_t, sigma), fake(x_t, sigma)
        k_r, k_f = k_of(real, s), k_of(fake, s)
        delta, R, D = y_r - y_f, y_r - x, k_r - k_f
        w = (x - y_r).abs().mean(dim=[1, 2, 3], keepdim=True)
        return (D * (R - alpha * delta) + delta * (k_r - 1 - alpha * D)) / w


def fisher(g, c, m, s_d, sigma):
    """E over x_t ~ p_G of |y_r - y_f|^2 for G's output N(g, c^2) and its exact fake score: the score-matching loss
    (times sigma^4) between data and generator at sigma, as a function of the generator."""
    k_r, k_g = s_d ** 2 / (s_d ** 2 + sigma ** 2), c ** 2 / (c ** 2 + sigma ** 2)
    return ((1 - k_r) * (m - g)) ** 2 + (k_r - k_g) ** 2 * (c ** 2 + sigma ** 2)


def frozen(g, c, m, s_d, sigma, g_f, c_f):
    """The same with the fake score frozen at N(g_f, c_f^2)."""
    k_r, k_f = s_d ** 2 / (s_d ** 2 + sigma ** 2), c_f ** 2 / (c_f ** 2 + sigma ** 2)
    e = (1 - k_r) * m - (1 - k_f) * g_f
    return (e + (k_r - k_f) * g) ** 2 + (k_r - k_f) ** 2 * (c ** 2 + sigma ** 2)


@pytest.mark.parametrize('alpha', [0.0, 0.5, 1.0, 1.2])
@pytest.mark.parametrize('sigma', [0.3, 1.0, 5.0])
def test_expected_loss_and_gradient_are_the_closed_forms(alpha, sigma):
    """The affine generator G(z) = mu (1 - k) + k s_init z, k = std^2 / (std^2 + s_init^2), outputs N(g, c^2); its fake
    score is exact (psi = theta). Expectations over (z, n) are exact on the 4 points (+-1, +-1), which match every
    moment up to degree 2 (the per-pixel loss and its gradient are polynomials of degree 2): one sample of 4 pixels.
    Known answers with F the score-matching loss above: E[loss] = (1 - alpha) F (the score identity
    E[(y_r - y_f).y_f] = E[(y_r - y_f).x]); E[gradient] = 1/2 dF + (1/2 - alpha) d(F with the fake score frozen),
    so alpha = 1/2 follows the exact score-matching gradient, alpha = 1 has expectation 0, and alpha = 0 the value F."""
    m, s_d, s_init, mu, std = 0.3, 0.5, 2.5, -0.1, 0.8
    sid = gaussian_sid(m, s_d, alpha=alpha, sigma_init=s_init)
    k = std ** 2 / (std ** 2 + s_init ** 2)
    with torch.no_grad():
        sid.G.mean.fill_(mu)
        sid.G.log_std.fill_(math.log(std))
        sid.fake.mean.fill_(mu * (1 - k))
        sid.fake.log_std.fill_(math.log(k * s_init))
    z = torch.tensor([1.0, 1.0, -1.0, -1.0]).reshape(1, 1, 2, 2)
    n = torch.tensor([1.0, -1.0, 1.0, -1.0]).reshape(1, 1, 2, 2)
    x = sid.generate(sid.G, z, None)
    loss = sid.identity_loss(x, torch.tensor([sigma]), n, None)
    loss.sum().backward()
    with torch.no_grad():
        w = (x - sid.real(x + sigma * n, torch.tensor([sigma]))).abs().mean()
    mean_loss = loss.detach() * w / 4  # L = sum over the 4 pixels / w
    mean_grad = torch.stack([sid.G.mean.grad.sum(), sid.G.log_std.grad]) * w / 4

    theta = torch.tensor([mu, math.log(std)], dtype=torch.float64, requires_grad=True)
    std2 = (2 * theta[1]).exp()
    kt = std2 / (std2 + s_init ** 2)
    g, c = theta[0] * (1 - kt), kt * s_init
    F = fisher(g, c, m, s_d, sigma)
    (dF,) = torch.autograd.grad(F, theta, retain_graph=True)
    (dF_frozen,) = torch.autograd.grad(frozen(g, c, m, s_d, sigma, g.item(), c.item()), theta)
    assert float(mean_loss) == pytest.approx((1 - alpha) * F.item(), rel=1e-4, abs=1e-7)
    torch.testing.assert_close(mean_grad.double(), 0.5 * dF + (0.5 - alpha) * dF_frozen, rtol=1e-4, atol=1e-7)


def test_sid_converges_to_gaussian_data():
    """Single Gaussian data, exact real score, Gaussian fake score fitted by denoising, affine generator, alpha = 1.2:
    the generator reaches the data mean and std (then y_f = y_r and the gradient vanishes)."""
    mu = torch.tensor([0.3, -0.2, 0.1, 0.5]).reshape(1, 2, 2)
    sid = SiD(GaussianDenoiser(mu, 0.3), 'cpu', batch_size=64, lr=1e-2, fake_lr=2e-2, ema_halflife_kimg=None)
    with torch.no_grad():  # start away from the data: mean shifted, spread collapsed
        sid.G.mean.add_(0.5)
        sid.G.log_std.add_(-1.0)
    mean0, std0 = generator_moments(sid)
    assert (mean0 - mu).abs().max() > 0.3 and std0 < 0.1
    run_steps(sid, 400, 64)
    sid.lr, sid.fake_lr = 1e-3, 2e-3  # a slower phase removes most of the stochastic jitter
    run_steps(sid, 800, 64, seed=1)
    mean, std = generator_moments(sid)
    assert (mean - mu).abs().max() < 0.03, (mean, mu)
    assert abs(std - 0.3) < 0.02, std
    assert (sid.fake.mean - mu).abs().max() < 0.05
    assert abs(sid.fake.log_std.exp() - 0.3) < 0.03


def test_step_fits_the_fake_score_first_then_the_generator():
    """SiD's order: G's loss sees the fake score already updated in this step; Adam betas (0, 0.999), no decay."""
    sid = gaussian_sid(lr=1e-2)
    seen = []
    loss_fn = sid.distribution_matching_loss
    sid.distribution_matching_loss = lambda *a: (seen.append(sid.fake.mean.detach().clone()), loss_fn(*a))[1]
    before = sid.fake.mean.detach().clone()
    sid.step([Round(None, None, StepRandom(0, 0, 4, 'cpu'), 0, 4)], 0)
    assert not torch.equal(seen[0], before) and torch.equal(seen[0], sid.fake.mean)
    assert sid.num_g_steps == sid.num_steps == 1
    for updater in (sid.opt_G, sid.opt_fake):
        group = updater.optimizer.param_groups[0]
        assert group['betas'] == (0.0, 0.999) and group['weight_decay'] == 0 and updater.max_grad_norm is None
    assert gaussian_sid(g_beta1=0.9).opt_G.optimizer.param_groups[0]['betas'] == (0.9, 0.999)
    with pytest.raises(ValueError, match='t_max'):
        gaussian_sid(t_max=0)

# ----------------------------------------------------------------------------
# train.py --method=sid with a tiny EDM teacher.

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1],
            num_blocks=1, attn_resolutions=[], dropout=0.0)
SID_ARGS = ['--method=sid', '--batch=8', '--tick=0.008', '--snap=1', '--dump=1', '--seed=1', '--device=cpu',
            '--lr=1e-4', '--nosubdir', '--workers=0']


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    from training.networks import EDMPrecond
    root = tmp_path_factory.mktemp('sid')
    torch.manual_seed(0)
    with open(root / 'teacher.pkl', 'wb') as f:
        pickle.dump(dict(ema=EDMPrecond(**TINY)), f)
    rng = np.random.default_rng(0)
    save_dataset(str(root / 'data.zip'), [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(8)],
                 [i % 4 for i in range(8)])
    return root


def invoke(files, outdir, *args, **kwargs):
    args = [f'--outdir={outdir}', f'--teacher={files / "teacher.pkl"}', *SID_ARGS, *args]
    return CliRunner().invoke(train.main, args, **kwargs)


def options(output):
    return json.loads(output.split('Training options:')[1].split('Output directory')[0])


def test_cli_defaults_are_the_papers_and_the_snapshot_samples_at_2p5(files, tmp_path):
    dry_run = lambda *args: options(CliRunner().invoke(train.main, [
        f'--outdir={tmp_path}', '--method=sid', f'--teacher={files / "teacher.pkl"}', '--device=cpu', '--dry-run', *args]).output)
    kw = dry_run()['method_kwargs']
    assert kw['class_name'] == 'training.distill.sid.SiD'
    assert (kw['sigma_init'], kw['alpha'], kw['t_max'], kw['g_beta1'], kw['lr'], kw['fake_lr']) == (2.5, 1.2, 800, 0, 1e-5, None)
    assert (kw['fake_sigma'], kw['max_grad_norm'], kw['ema_halflife_kimg'], kw['sida']) == ('lognormal', None, 500, False)
    assert (kw['dropout'], kw['augment_p'], kw['eps']) == (None, None, 1e-8)  # the teacher's dropout / augmentation
    kw = dry_run('--sigma-init=80', '--alpha=1', '--t-max=1000', '--g-beta1=0.9', '--lr=4e-6', '--fake-sigma=karras',
                 '--ema=2', '--grad-clip=1')['method_kwargs']
    assert (kw['sigma_init'], kw['alpha'], kw['t_max'], kw['g_beta1'], kw['lr']) == (80, 1, 1000, 0.9, 4e-6)
    assert (kw['fake_sigma'], kw['ema_halflife_kimg'], kw['max_grad_norm']) == ('karras', 2000, 1)
    r = invoke(files, tmp_path, '--duration=0.000016', catch_exceptions=False)
    assert r.exit_code == 0, r.output
    with open(tmp_path / 'network-snapshot-000000.pkl', 'rb') as f:
        G = persistence.load(f)['ema']
    assert G.sampling_spec['num_steps'] == 1 and G.sampling_spec['sigma_max'] == 2.5
    stats = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert all('Loss/G_sid' in s and 'Loss/fake' in s and 'Loss/G_gan' not in s for s in stats)


def test_cli_sida_trains_the_classifier_on_real_images(files, tmp_path):
    """SiDA (--gan-g > 0 with data): the fake score's loss carries the classifier's; G waits for 100 kimg (official),
    so a 16-image run never steps it; the classifier has no parameters (no head in the state)."""
    r = invoke(files, tmp_path, '--duration=0.000016', f'--data={files / "data.zip"}', '--cond=1', '--gan-g=0.01',
               catch_exceptions=False)
    assert r.exit_code == 0, r.output
    stats = [json.loads(l) for l in open(tmp_path / 'stats.jsonl')]
    assert all('Loss/D_gan' in s and 'Loss/G_gan' not in s and 'Loss/G_sid' not in s for s in stats)
    state = torch.load(loop_module.find_latest_state(str(tmp_path)), weights_only=True)['method']
    assert 'head' not in state and state['num_g_steps'] == 0 and state['num_steps'] == 2
    kw = options(r.output)['method_kwargs']
    assert (kw['sida'], kw['gan_g_weight'], kw['gan_d_weight']) == (True, 0.01, 1.0)


@pytest.mark.parametrize('args, message', [
    ([], '--method=sid needs --teacher'),
    (['--teacher={teacher}', '--gan-g=1e-4'], '--gan-g > 0 (SiDA) trains its classifier on real images: pass --data'),
    (['--teacher={teacher}', '--augment=0.12'], 'the teacher was trained without augmentation labels, so SiD cannot augment'),
    (['--teacher={teacher}', '--pairs={teacher}'], '--pairs is a DMD option'),
    (['--teacher={teacher}', '--fake-steps=2'], '--fake-steps is a DMD option'),
])
def test_cli_bad_input_is_one_line_before_any_directory(files, tmp_path, args, message):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=sid', '--device=cpu',
                                        *[a.format(teacher=files / 'teacher.pkl') for a in args]])
    assert r.exit_code == 1 and r.output.startswith('Error: ') and len(r.output.strip().splitlines()) == 1, r.output
    assert message in r.output
    assert not (tmp_path / 'runs').exists()


def test_two_processes_match_one(files, tmp_path):
    """gloo: 2 processes with the same global batch give 1 process's weights, with dropout in G and the fake score
    (keyed by sample) and the data's labels. (SiDA's classifier loss: tests/test_sid_official.py, rounds split.)"""
    a, b = train_1_and_2_processes(tmp_path, [f'--teacher={files / "teacher.pkl"}', '--duration=0.000024', *SID_ARGS,
                                              f'--data={files / "data.zip"}', '--cond=1', '--dropout=0.2'])
    assert a['num_g_steps'] == b['num_g_steps'] == 3
    for net in ('G', 'fake', 'G_ema'):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=1e-4, atol=1e-5)
