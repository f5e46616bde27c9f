"""DMD on closed-form problems, its pieces, and train.py --method=dmd."""

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import generate
import make_pairs
import train
from conftest import TINY_TEACHER
from dataset_tool import save_dataset
from torch_utils import persistence
from training import training_loop as loop_module
from training.batching import IndexStream, Round, StepRandom
from training.dataset import ImageFolderDataset
from training.distill import dmd as dmd_module
from training.distill.dmd import DMD, Bottleneck, GANHead

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
    optimizer_steps = lambda u: int(u.optimizer.state[u.params[0]].get('step', 0))
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

TINY = TINY_TEACHER


DMD_ARGS = ['--method=dmd', '--batch=8', '--tick=0.008', '--snap=1', '--dump=1', '--seed=1', '--device=cpu',
            '--sigma-init=80', '--lr=1e-4', '--ema=0.5']  # an EMA (not the default) so resume checks it too


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
    assert lines[0]['results'] == dict(fid1k=pytest.approx(expected, rel=1e-4))


# ----------------------------------------------------------------------------
# DMD2's GAN head, the bottleneck pass, and the smaller options.

def test_gan_head_is_dmd2s_classifier_and_sees_every_bottleneck_position():
    """conv4x4/2 p1 - GN - SiLU - conv4x4/4 p0 - GN - SiLU - conv1x1: an 8x8 bottleneck reduces to 1x1 and every one
    of its 64 positions reaches the logit through the convolutions (not only through GroupNorm statistics)."""
    torch.manual_seed(0)
    head = GANHead(32)
    h = torch.randn([2, 32, 8, 8], requires_grad=True)
    conv1, gn1, _, conv2, gn2, _, conv3 = head.net
    y = F.silu(F.group_norm(F.conv2d(h, conv1.weight, conv1.bias, stride=2, padding=1), 8, gn1.weight, gn1.bias))
    y = F.conv2d(y, conv2.weight, conv2.bias, stride=4, padding=0)
    assert y.shape == (2, 32, 1, 1)
    y = F.conv2d(F.silu(F.group_norm(y, 8, gn2.weight, gn2.bias)), conv3.weight, conv3.bias)
    torch.testing.assert_close(head(h), y.flatten())
    head.net[1] = head.net[4] = torch.nn.Identity()
    head(h).sum().backward()
    assert (h.grad.abs().sum(dim=[0, 1]) > 0).all(), h.grad.abs().sum(dim=[0, 1])


def tiny_edm(channel_mult=(1,), label_dim=4):
    from golden import fill_golden_weights
    from training.networks import EDMPrecond
    net = EDMPrecond(**dict(TINY, channel_mult=list(channel_mult), label_dim=label_dim))
    return fill_golden_weights(net, 0).eval()


def test_bottleneck_pass_stops_before_the_decoder():
    """The GAN pass returns the lowest-resolution encoder output of a full forward, and no decoder block runs."""
    net = tiny_edm()
    full, decoder_calls = [], []
    enc_last = list(net.model.enc.values())[-1]
    enc_last.register_forward_hook(lambda m, args, out: full.append(out))
    for block in net.model.dec.values():
        block.register_forward_hook(lambda m, args, out: decoder_calls.append(1))
    bottleneck = Bottleneck(net)
    g = torch.Generator().manual_seed(0)
    x, sigma, c = torch.randn([3, 3, 8, 8], generator=g), torch.tensor([0.5, 2.0, 20.0]), torch.eye(4)[[0, 1, 3]]
    D = net(x, sigma, c)  # a plain call is untouched by the bottleneck hook
    assert D.shape == x.shape and len(decoder_calls) == len(net.model.dec) and len(full) == 1
    decoder_calls.clear()
    h = bottleneck(x, sigma, c)
    assert torch.equal(h, full[0]) and h.shape == (3, 16, 8, 8) and not decoder_calls
    assert h.requires_grad  # the partial graph is kept for the GAN losses
    assert torch.equal(net(x, sigma, c), D) and decoder_calls  # and disarmed again


def test_gan_head_needs_an_8x8_bottleneck():
    with pytest.raises(ValueError, match='at least 8x8.*4x4'):
        DMD(tiny_edm(channel_mult=(1, 1)), 'cpu', batch_size=4, dataset=object(), gan_g_weight=3e-3)


def test_fake_score_lognormal_noise_levels():
    """fake_sigma='lognormal': EDM's ln s ~ N(-1.2, 1.2^2), one level per sample."""
    dmd = DMD(GaussianDenoiser(torch.zeros(1, 2, 2), 0.5), 'cpu', batch_size=8, fake_sigma='lognormal',
              ema_halflife_kimg=None)
    seen = []
    dmd.fake.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    r = Round(None, None, StepRandom(0, 0, 8, 'cpu'), 0, 8)
    dmd.fake_step([r], [torch.zeros(8, 1, 2, 2)], 0)
    torch.testing.assert_close(seen[0], (r.randn('fake_t') * 1.2 - 1.2).exp())
    with pytest.raises(ValueError, match='fake_sigma'):
        DMD(GaussianDenoiser(torch.zeros(1, 2, 2), 0.5), 'cpu', batch_size=8, fake_sigma='uniform')


def test_lr_warm_up_of_both_networks():
    """lr_rampup_kimg: both optimizers step with lr * min(images seen / (rampup * 1000), 1)."""
    dmd = DMD(GaussianDenoiser(torch.zeros(1, 2, 2), 0.5), 'cpu', batch_size=8, lr=1e-3, fake_lr=2e-3,
              lr_rampup_kimg=0.032, ema_halflife_kimg=None)
    lrs = []
    for step in range(6):
        dmd.step([Round(None, None, StepRandom(0, step, 8, 'cpu'), 0, 8)], step * 8)
        lrs.append((dmd.opt_G.optimizer.param_groups[0]['lr'], dmd.opt_fake.optimizer.param_groups[0]['lr']))
    assert lrs == pytest.approx([(1e-3 * f, 2e-3 * f) for f in [0, 0.25, 0.5, 0.75, 1, 1]])


@pytest.fixture(scope='module')
def pairs_dir(teacher_pkl, tmp_path_factory):
    out = tmp_path_factory.mktemp('pairs') / 'pairs'
    r = CliRunner().invoke(make_pairs.main, [f'--teacher={teacher_pkl}', f'--outdir={out}', '--seeds=0-7', '--steps=2',
                                             '--batch=8', '--device=cpu'])
    assert r.exit_code == 0, r.output
    return out


def test_lpips_regression_upsamples_to_224_by_default(teacher_pkl, pairs_dir, weight_files):
    """DMD's LPIPS at 224 is the method's own default (also from Python); an explicit resolution wins."""
    with open(teacher_pkl, 'rb') as f:
        teacher = persistence.load(f)['ema']
    files = dict(vgg=weight_files['vgg_path'], lin=weight_files['lin_path'])
    assert DMD(teacher, 'cpu', batch_size=4, pairs=str(pairs_dir), reg_kwargs=files).distance.resolution == 224
    assert DMD(teacher, 'cpu', batch_size=4, pairs=str(pairs_dir), reg_kwargs=dict(files, resolution=64)).distance.resolution == 64


def test_cli_regression_pair_order_follows_seed(teacher_pkl, pairs_dir, tmp_path, monkeypatch):
    seeds = []

    class Recording(IndexStream):
        def __init__(self, num_items, seed=0, **kwargs):
            seeds.append(seed)
            super().__init__(num_items, seed, **kwargs)

    monkeypatch.setattr(dmd_module, 'IndexStream', Recording)
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', '--duration=0.000008',
                                        '--nosubdir', *DMD_ARGS, f'--pairs={pairs_dir}', '--reg-loss=l2', '--seed=7'],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seeds == [7]


def test_cli_dmd_options_reach_the_method(teacher_pkl, tmp_path):
    run = lambda *args: CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', *DMD_ARGS,
                                                        '--dry-run', *args])
    r = run()
    assert r.exit_code == 0, r.output
    kw = json.loads(r.output.split('Training options:')[1].split('Output directory')[0])['method_kwargs']
    assert (kw['fake_sigma'], kw['lr_rampup_kimg'], kw['max_grad_norm'], kw['reg_kwargs']) == ('karras', 0, 10, {})
    r = run('--fake-sigma=lognormal', '--lr-rampup=17.5', '--grad-clip=1')
    assert r.exit_code == 0, r.output
    kw = json.loads(r.output.split('Training options:')[1].split('Output directory')[0])['method_kwargs']
    assert (kw['fake_sigma'], kw['lr_rampup_kimg'], kw['max_grad_norm']) == ('lognormal', 17.5, 1)


def test_dmd_default_has_no_ema_as_dmd2(teacher_pkl, tmp_path):
    """DMD2's official trainer keeps no EMA: tianweiy/DMD2 main/edm/train_edm.py has no EMA option or update, and its
    checkpoints hold the raw generator. So neither DMD(...) nor train.py adds one unless --ema is given."""
    assert DMD(GaussianDenoiser(torch.zeros(1, 2, 2), 0.5), 'cpu', batch_size=4).ema is None
    args = [a for a in DMD_ARGS if not a.startswith('--ema')]
    for extra, expected in [([], None), (['--ema=0'], None), (['--ema=0.5'], 500)]:
        r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', *args, '--dry-run', *extra])
        assert r.exit_code == 0, r.output
        kw = json.loads(r.output.split('Training options:')[1].split('Output directory')[0])['method_kwargs']
        assert kw['ema_halflife_kimg'] == expected


def test_cli_dmd2_gan_head_trains(teacher_pkl, tmp_path):
    """--gan-g with real images: the classifier and the generator losses go through the bottleneck pass."""
    rng = np.random.default_rng(0)
    save_dataset(str(tmp_path / 'data.zip'), [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(8)],
                 [i % 4 for i in range(8)])
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "run"}', f'--teacher={teacher_pkl}', '--duration=0.000016',
                                        '--nosubdir', *DMD_ARGS, f'--data={tmp_path / "data.zip"}', '--cond=1',
                                        '--gan-g=3e-3', '--workers=0'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    stats = [json.loads(l) for l in open(tmp_path / 'run' / 'stats.jsonl')]
    assert all('Loss/G_gan' in l and 'Loss/D_gan' in l for l in stats)
    state = torch.load(loop_module.find_latest_state(str(tmp_path / 'run')), weights_only=True)['method']
    assert state['head']['net.0.weight'].shape == (16, 16, 4, 4) and state['num_g_steps'] == 2
