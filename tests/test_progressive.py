"""Progressive distillation (--method=pd): the two-Euler-step target, exact rounds on a Gaussian, the loop, resume, CLI."""

import copy
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
import train
from dataset_tool import save_dataset
from golden import fill_golden_weights
from torch_utils import training_stats
from training import samplers
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.distill.progressive import ProgressiveDistillation, loss_weight, pd_target, round_schedule

CIFAR10_COND = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl'
IMAGENET64 = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl'


def tiny_teacher(label_dim=4, seed=0, label_dropout=0):
    """An 8x8 SongUNet with random (not zero-initialised) weights, so its outputs depend on every layer."""
    from training.networks import EDMPrecond
    net = EDMPrecond(8, 3, label_dim=label_dim, model_type='SongUNet', model_channels=16, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[], dropout=0, label_dropout=label_dropout)
    return fill_golden_weights(net, seed).eval().requires_grad_(False)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """16 labelled and unlabelled 8x8 images, and a conditional and an unconditional teacher pickle."""
    root = tmp_path_factory.mktemp('pd')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)]
    save_dataset(str(root / 'cond.zip'), images, [i % 4 for i in range(16)])
    save_dataset(str(root / 'uncond.zip'), images, None)
    for name, label_dim in [('teacher.pkl', 4), ('teacher-uncond.pkl', 0)]:
        with open(root / name, 'wb') as f:
            pickle.dump(dict(ema=tiny_teacher(label_dim)), f)
    return root

# ----------------------------------------------------------------------------
# The target and the schedule.

@pytest.mark.parametrize('i', [0, 2, 3])
def test_target_step_lands_on_teacher_two_steps(i):
    """A student whose D is the target x~ takes one Euler step s -> s'' onto the teacher's two steps s -> s' -> s''."""
    teacher = tiny_teacher()
    N = 4
    grid = samplers.nested_sigmas(2 * N, 0.002, 80, 7)  # the teacher's 2N-step grid: s(j/2N), then 0
    s, s_mid, s_next = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    assert torch.allclose(samplers.nested_sigmas(N, 0.002, 80, 7)[i:i + 2], torch.stack([s, s_next]))
    g = torch.Generator().manual_seed(i)
    z = torch.randn([3, 3, 8, 8], generator=g, dtype=torch.float64)
    labels = torch.eye(4)[[0, 1, 3]]
    x = z * s  # as euler_sampler starts, so both see the same x_s
    teacher_two = samplers.euler_sampler(teacher, z, labels, torch.stack([s, s_mid, s_next]))
    ones = torch.ones(3, dtype=torch.float64)
    target = pd_target(teacher, x, s * ones, s_mid * ones, s_next * ones, labels)
    student_one = target + (s_next / s) * (x - target)  # euler_sampler's step with D = x~
    if s_next == 0:
        assert torch.equal(target, teacher_two) and torch.equal(student_one, teacher_two)
    else:
        torch.testing.assert_close(student_one, teacher_two, rtol=1e-12, atol=1e-12)
        assert (target - teacher_two).abs().max() > 1e-3  # x~ is a denoised image, not the two-step result


def test_round_schedule():
    assert round_schedule(16, 1, 0.64, 1.28, 64) == [(8, 10), (4, 10), (2, 20), (1, 20)]
    assert round_schedule(12, 3, 1, 2, 100) == [(6, 10), (3, 10)]
    for start, end in [(16, 16), (12, 5), (3, 1), (24, 1), (8, 0)]:
        with pytest.raises(ValueError, match='power of two'):
            round_schedule(start, end, 1, 1, 8)

# ----------------------------------------------------------------------------
# An exact linear teacher: data N(0, t^2 I) has D(x; s) = t^2 / (t^2 + s^2) x.

class GainDenoiser(torch.nn.Module):
    """D(x; s) = gain[j] * t^2 / (t^2 + s^2) * x with one learnable gain per noise level s_j of a table; gain 1 is
    the exact denoiser of N(0, t^2 I). Every PD target on the table's levels is linear in x_s, so a student of this
    form can match it exactly."""

    def __init__(self, t, levels):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = 4, 1, 0
        self.sigma_min, self.sigma_max = 0, float('inf')
        self.t = t
        self.register_buffer('levels', levels.to(torch.float64))
        self.gain = torch.nn.Parameter(torch.ones(len(levels), dtype=torch.float64))

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        j = (sigma[:, None] - self.levels[None]).abs().argmin(dim=1)
        a = self.gain[j] * self.t ** 2 / (self.t ** 2 + sigma ** 2)
        return a.reshape(-1, 1, 1, 1) * x.to(torch.float64)


def train_rounds(method, t, num_steps, batch=64):
    g = torch.Generator().manual_seed(1)
    for step in range(num_steps):
        images = t * torch.randn([batch, 1, 4, 4], generator=g)
        method.step([Round(images, None, StepRandom(0, step, batch, 'cpu'), 0, batch)], step * batch)


def test_gaussian_rounds_reproduce_teacher_samples():
    """With an exact linear teacher, the 4-step and then the 2-step student sample what the 8-step teacher does."""
    t = 0.5
    levels = samplers.nested_sigmas(8, 0.002, 80, 7)[:-1]  # the 8-step grid contains every coarser grid and midpoint
    teacher = GainDenoiser(t, levels).requires_grad_(False)
    method = ProgressiveDistillation(teacher, torch.device('cpu'), batch_size=64, dataset=dnnlib.EasyDict(resolution=4, num_channels=1, label_dim=0),
                                     start_steps=8, end_steps=2, round_kimg=64 * 0.5, final_round_kimg=64 * 0.5,
                                     optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.1))
    z = torch.randn([256, 1, 4, 4], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sample = lambda net, N: samplers.euler_sampler(net, z, None, samplers.nested_sigmas(N, 0.002, 80, 7))
    teacher_8 = sample(teacher, 8)
    assert (sample(teacher, 4) - teacher_8).abs().max() > 0.05  # fewer steps of the teacher are visibly off

    train_rounds(method, t, 500)
    assert method.num_steps == 4 and method.wants_snapshot()
    torch.testing.assert_close(sample(method.student, 4), teacher_8, rtol=0, atol=1e-6)
    train_rounds(method, t, 500)
    assert method.num_steps == 2 and method.wants_snapshot()
    torch.testing.assert_close(sample(method.student, 2), teacher_8, rtol=0, atol=1e-6)
    snap = method.snapshot()['ema']
    assert snap.sampling_spec == dict(solver='euler', grid='nested', num_steps=2, sigma_min=0.002, sigma_max=80, rho=7,
                                      clip_denoised=True)
    train_rounds(method, t, 1)  # past the last round: nothing changes
    assert torch.equal(method.student.gain, snap.gain)

def test_round_handover_lr_decay_and_optimizer_reset():
    """Per round: lr decays linearly to 0, Adam restarts, and (ema_teacher) the EMA becomes teacher and student."""
    levels = samplers.nested_sigmas(8, 0.002, 80, 7)[:-1]
    teacher = GainDenoiser(0.5, levels).requires_grad_(False)
    method = ProgressiveDistillation(teacher, torch.device('cpu'), batch_size=64,
                                     dataset=dnnlib.EasyDict(resolution=4, num_channels=1, label_dim=0), start_steps=8,
                                     end_steps=2, round_kimg=64 * 4 / 1000, final_round_kimg=64 * 2 / 1000,
                                     optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.1), ema_halflife_kimg=0.1,
                                     ema_teacher=True)
    assert method.schedule == [(4, 4), (2, 2)]
    lrs = []
    for _ in range(4):
        train_rounds(method, 0.5, 1)
        lrs.append(method.optimizer.optimizer.param_groups[0]['lr'])
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025])
    ema = method.ema.ema.gain.detach().clone()
    assert not torch.equal(ema, method.student.gain) and method.wants_snapshot()
    assert torch.equal(method.snapshot()['ema'].gain, ema)  # the snapshot is the EMA
    train_rounds(method, 0.5, 1)
    assert method.num_steps == 2 and torch.equal(method.teacher.gain, ema)
    assert method.optimizer.optimizer.param_groups[0]['lr'] == 0.1
    assert int(method.optimizer.optimizer.state[method.student.gain]['step']) == 1  # a fresh Adam


def test_defaults_are_official_loss_weight_and_clipping(monkeypatch):
    """By default a step is the official one: the x-error weighted by truncated SNR, max(1/s^2, 1), averaged over
    pixels and the batch, its gradient clipped at global norm 1.

    Facts from google-research/google-research diffusion_distillation/diffusion_distillation:
    dpm.py `x_mse = utils.meanflat(jnp.square(model_output['model_x'] - x_target))` and, for 'snr_trunc',
    `loss = jnp.maximum(x_mse, eps_mse)` (= x_mse * max(SNR, 1)); model.py `loss_dict = {k: v.mean() ...}` (the batch
    mean) and `utils.clip_by_global_norm(grad, clip_norm=config.train.grad_clip)`; config/cifar_distill.py and
    imagenet64_distill.py `grad_clip=1.0`."""
    assert loss_weight(torch.tensor([0.5, 1.0, 2.0]), 'snr-trunc').tolist() == [4.0, 1.0, 1.0]
    assert loss_weight(torch.tensor([0.5, 2.0]), 'edm').tolist() == [8.0, 4.25]
    levels = samplers.nested_sigmas(8, 0.002, 80, 7)[:-1]
    teacher = GainDenoiser(0.5, levels).requires_grad_(False)
    lr = 1e-3
    method = ProgressiveDistillation(teacher, torch.device('cpu'), batch_size=64, dataset=dnnlib.EasyDict(
                                     resolution=4, num_channels=1, label_dim=0), start_steps=8, end_steps=4,
                                     round_kimg=1, optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=lr))
    with torch.no_grad():
        method.student.gain.mul_(1.5)  # away from the target: a gradient norm well above 1
    student = copy.deepcopy(method.student)
    reported = {}
    monkeypatch.setattr(training_stats, 'report', lambda name, value: reported.setdefault(name, value))
    images = 0.5 * torch.randn([64, 1, 4, 4], generator=torch.Generator().manual_seed(1))
    r = Round(images, None, StepRandom(0, 0, 64, 'cpu'), 0, 64)
    method.step([r], 0)

    i = r.randint('pd_step', 4)
    sigma, sigma_next = method.sigmas[i], method.sigmas[i + 1]
    x_s = images.to(torch.float64) + sigma.reshape(-1, 1, 1, 1) * r.randn('pd_noise', 1, 4, 4).to(torch.float64)
    target = pd_target(teacher, x_s, sigma, method.sigmas_mid[i], sigma_next)
    x_mse = (student(x_s, sigma) - target).square().flatten(1).mean(1)  # meanflat
    expected = x_mse * torch.maximum(1 / sigma ** 2, torch.ones([]))   # snr_trunc, per sample
    torch.testing.assert_close(reported['Loss/loss'], expected, rtol=1e-5, atol=0)
    grad, = torch.autograd.grad(expected.mean(), student.gain)      # the batch mean
    assert grad.norm() > 1.5  # the clip acts on this step, on the official gradient's scale
    torch.testing.assert_close(method.student.gain - student.gain, -lr * grad / grad.norm(), rtol=1e-4, atol=0)

# ----------------------------------------------------------------------------
# The training loop: exact resume inside a round and at a round's end.

def run_pd(run_dir, files, total_steps, batch=32, resume_state=None):
    """Rounds 8 -> 4 -> 2 -> 1 of 2, 3 and 3 updates (the rounds to 2 and 1 steps are the longer ones)."""
    method_kwargs = dict(class_name='training.distill.progressive.ProgressiveDistillation', start_steps=8, end_steps=1,
                         round_kimg=batch * 2 / 1000, final_round_kimg=batch * 3 / 1000,
                         optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3))
    os.makedirs(run_dir, exist_ok=True)
    return loop_module.training_loop(
        run_dir=str(run_dir), method_kwargs=method_kwargs, teacher=str(files / 'teacher.pkl'),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(files / 'cond.zip'), use_labels=True),
        seed=1, batch_size=batch, batch_gpu=batch // 2, total_kimg=(total_steps * batch - 0.5) / 1000, kimg_per_tick=100,
        snapshot_ticks=None, state_dump_ticks=1, resume_state=resume_state, preview_grid=0, device=torch.device('cpu'))


@pytest.fixture(scope='module')
def full_run(files, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp('full')
    run_pd(run_dir, files, total_steps=8)
    return torch.load(loop_module.find_latest_state(str(run_dir)), weights_only=True)['method']


@pytest.mark.parametrize('cut', [3, 5])  # inside the second round; right at its end
def test_resume_inside_a_round_is_bitwise_exact(files, full_run, tmp_path, cut):
    run_pd(tmp_path, files, total_steps=cut)
    state = torch.load(loop_module.find_latest_state(str(tmp_path)), weights_only=True)['method']
    assert (state['round'], state['round_step']) == ((1, 1) if cut == 3 else (1, 3))
    run_pd(tmp_path, files, total_steps=8, resume_state=str(tmp_path))
    state = torch.load(loop_module.find_latest_state(str(tmp_path)), weights_only=True)['method']
    assert (state['round'], state['round_step']) == (full_run['round'], full_run['round_step']) == (2, 3)
    for net in ['student', 'teacher']:
        for k, v in full_run[net].items():
            assert torch.equal(v, state[net][k]), (net, k)
    assert full_run['optimizer']['optimizer']['state'].keys() == state['optimizer']['optimizer']['state'].keys()
    for k, v in full_run['optimizer']['optimizer']['state'].items():
        assert all(torch.equal(v[name], state['optimizer']['optimizer']['state'][k][name]) for name in v)

# ----------------------------------------------------------------------------
# The command line.

CLI = ['--method=pd', '--batch=512', '--batch-gpu=256', '--start-steps=8', '--end-steps=1', '--round-kimg=1.024',
       '--final-round-kimg=1.536', '--tick=100', '--snap=1', '--dump=100', '--workers=0', '--seed=3', '--device=cpu']


def cli(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def test_cli_snapshot_per_round_sampled_by_generate_without_flags(files, tmp_path):
    """Rounds of 2, 3 and 3 updates end at 1024, 2560 and 4096 images: snapshots 1, 2 and 4 (4-, 2-, 1-step specs)."""
    r = cli(f'--outdir={tmp_path}', f'--teacher={files / "teacher.pkl"}', f'--data={files / "cond.zip"}', '--cond=1',
            '--nosubdir', *CLI)
    assert r.exit_code == 0, r.output
    options = json.load(open(tmp_path / 'training_options.json'))
    assert options['total_kimg'] * 1000 == pytest.approx(4096) and options['total_kimg'] * 1000 <= 4096
    snaps = sorted(n for n in os.listdir(tmp_path) if n.startswith('network-snapshot-'))
    assert snaps == ['network-snapshot-000001.pkl', 'network-snapshot-000002.pkl', 'network-snapshot-000004.pkl']
    for name, N in zip(snaps, [4, 2, 1]):
        net = generate.load_network(str(tmp_path / name))
        assert net.sampling_spec == dict(solver='euler', grid='nested', num_steps=N, sigma_min=0.002, sigma_max=80, rho=7,
                                         clip_denoised=True)
    r = CliRunner().invoke(generate.main, [f'--network={tmp_path / snaps[-1]}', f'--outdir={tmp_path / "out"}', '--seeds=0-1'])
    assert r.exit_code == 0, r.output
    net = generate.load_network(str(tmp_path / snaps[-1]))
    expected = generate.generate_batch(net, [0, 1], 'cpu', solver='euler', grid='nested', num_steps=1, sigma_max=80,
                                       clip_denoised=True)
    for seed in [0, 1]:
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / 'out' / f'{seed:06d}.png')),
                              expected[seed].permute(1, 2, 0).numpy())


@pytest.mark.parametrize('args, message', [
    (['--teacher={teacher}'], 'needs --teacher=PKL|URL and --data'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--start-steps=12'], 'power of two'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--duration=1'], 'drop --duration'),
    (['--teacher={teacher}', '--data={uncond}'], 'The teacher is 8x8x3 with 4 labels, the data 8x8x3 with 0 labels'),
    (['--teacher={uncond_teacher}', '--data={uncond}', '--w-range=0,4'], '--w-range needs a w-conditioned'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--w-range=4,1'], 'MIN,MAX'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--lr-rampup=10'], 'drop --lr-rampup'),
])
def test_cli_bad_input(files, tmp_path, args, message):
    args = [a.format(teacher=files / 'teacher.pkl', uncond_teacher=files / 'teacher-uncond.pkl', cond=files / 'cond.zip',
                     uncond=files / 'uncond.zip') for a in args]
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=pd', '--device=cpu', '--batch=8', *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / 'runs').exists()


def printed_options(output):
    """The config dict that --dry-run prints."""
    text = output.split('Training options:')[1].split('Output directory:')[0]
    return json.loads(text)


# The README recipes (with the tests' tiny dataset in place of the real one), against the official configs:
# google-research/google-research diffusion_distillation/diffusion_distillation/config/cifar_distill.py
# (`start_num_steps = 8192`, `end_num_steps = 1`, `distill_steps_per_iter = 50000`, `batch_size=128`,
# `learning_rate=5e-5`, `grad_clip=1.0`, `ema_decay=0.`, `mean_loss_weight_type='snr_trunc'`, `randflip=True`) and
# config/imagenet64_distill.py (`start_num_steps = 1024`, `batch_size=2048`, `learning_rate=1e-4`, the rest the same).
def test_recipe_cifar10(files, tmp_path):
    r = cli(f'--outdir={tmp_path}', '--method=pd', f'--teacher={CIFAR10_COND}', f'--data={files / "cond.zip"}',
            '--cond=1', '--xflip=1', '--batch=128', '--lr=5e-5', '--start-steps=8192', '--end-steps=1', '--dry-run')
    assert r.exit_code == 0, r.output
    c = printed_options(r.output)
    assert c['dataset_kwargs']['xflip'] is True  # `randflip=True`
    kw = c['method_kwargs']
    assert kw['class_name'] == 'training.distill.progressive.ProgressiveDistillation'
    assert (kw['start_steps'], kw['end_steps'], kw['round_kimg'], kw['final_round_kimg']) == (8192, 1, 6400, 6400)
    assert kw['optimizer_kwargs']['lr'] == 5e-5 and kw['ema_halflife_kimg'] is None
    assert kw['max_grad_norm'] == 1.0 and kw['weight'] == 'snr-trunc'  # the official configs
    assert c['total_kimg'] == pytest.approx(13 * 50000 * 128 / 1000)  # 13 rounds (4096 ... 1) of 50k updates
    assert not os.listdir(tmp_path)
    r = cli(f'--outdir={tmp_path}', '--method=pd', f'--teacher={CIFAR10_COND}', f'--data={files / "cond.zip"}',
            '--cond=1', '--pd-weight=edm', '--grad-clip=5', '--final-round-kimg=100', '--dry-run')
    assert r.exit_code == 0, r.output
    kw = printed_options(r.output)['method_kwargs']
    assert (kw['weight'], kw['max_grad_norm'], kw['final_round_kimg']) == ('edm', 5, 100)
    assert kw['start_steps'] == 1024  # the default: ImageNet-64's official value, the smaller of the two


def test_recipe_imagenet64(files, tmp_path):
    r = cli(f'--outdir={tmp_path}', '--method=pd', f'--teacher={IMAGENET64}', f'--data={files / "cond.zip"}',
            '--cond=1', '--xflip=1', '--batch=2048', '--lr=1e-4', '--start-steps=1024', '--end-steps=1', '--dry-run')
    assert r.exit_code == 0, r.output
    c = printed_options(r.output)
    assert c['method_kwargs']['start_steps'] == 1024 and c['total_kimg'] == pytest.approx(10 * 50000 * 2048 / 1000)
    assert c['method_kwargs']['round_kimg'] == 50000 * 2048 / 1000 and c['method_kwargs']['optimizer_kwargs']['lr'] == 1e-4
    assert c['batch_size'] == 2048
