"""Guided distillation: the w embedding, the guided target against the exact mixture, training, stage two, CLI."""

import copy
import io
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
from golden import fill_golden_weights
from test_progressive import GainDenoiser, printed_options, tiny_teacher, train_rounds
from torch_utils import persistence, training_stats
from training import networks, samplers, toy
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.distill.guided import GuidedDistillation, cfg_target, make_guided_student
from training.distill.progressive import ProgressiveDistillation
from training.samplers import karras_sigma

CIFAR10_COND = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl'
CIFAR10_UNCOND = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl'
IMAGENET64 = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl'
TINY = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """16 labelled 8x8 images (4 classes); conditional (with and without label dropout), unconditional and 16x16
    teacher pickles."""
    from dataset_tool import save_dataset
    root = tmp_path_factory.mktemp('guided')
    rng = np.random.default_rng(0)
    save_dataset(str(root / 'cond.zip'), [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)],
                 [i % 4 for i in range(16)])
    nets = dict(teacher=tiny_teacher(4, label_dropout=0.1), official=tiny_teacher(4), uncond=tiny_teacher(0, seed=1),
                big=networks.EDMPrecond(16, 3, label_dim=0, model_type='SongUNet', **TINY),
                exact=toy.GMMDenoiser(img_resolution=8, img_channels=3, num_components=4, label_dim=4))
    for name, net in nets.items():
        with open(root / f'{name}.pkl', 'wb') as f:
            pickle.dump(dict(ema=net), f)
    return root

# ----------------------------------------------------------------------------
# The w embedding.

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_student_starts_equal_to_teacher_and_takes_w(model_type):
    teacher = fill_golden_weights(networks.EDMPrecond(8, 3, label_dim=4, model_type=model_type, **TINY), 0).eval()
    student = make_guided_student(teacher).eval()
    extra = set(student.state_dict()) - set(teacher.state_dict())
    assert extra == {'model.map_guidance_layer.weight', 'model.map_guidance_layer.bias'}
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())
    x = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    sigma, c = torch.tensor([0.1, 1.0, 20.0]), torch.eye(4)[[0, 2, 3]]
    with torch.no_grad():
        D = teacher(x, sigma, c)
        for w in [None, 0, 2.5, torch.tensor([0.0, 1.0, 4.0])]:  # zero-initialised: every w gives the teacher
            assert torch.equal(student(x, sigma, c, guidance=w), D)
        student.model.map_guidance_layer.weight.normal_()  # once trained, w matters; None means w = 0
        torch.testing.assert_close(student(x, sigma, c), student(x, sigma, c, guidance=torch.zeros(3)))
        assert not torch.allclose(student(x, sigma, c, guidance=2.0), D)
        with pytest.raises(ValueError, match='no guidance input'):
            teacher(x, sigma, c, guidance=1.0)
        # The student pickles with its keyword and loads with the safe loader.
        loaded = persistence.load(io.BytesIO(pickle.dumps(dict(ema=student))))['ema']
        assert loaded.init_kwargs['guidance_embed'] is True
        assert torch.equal(loaded(x, sigma, c, guidance=2.0), student(x, sigma, c, guidance=2.0))

# ----------------------------------------------------------------------------
# The guided target, against the exact mixture's guided denoiser.

def test_cfg_target_matches_exact_guided_mixture():
    gmm = toy.GMMDenoiser(img_resolution=8, img_channels=3, num_components=4, label_dim=4)
    gmm_uncond = toy.GMMDenoiser(img_resolution=8, img_channels=3, num_components=4, label_dim=0)
    weaker = toy.GMMDenoiser(img_resolution=8, img_channels=3, num_components=4, label_dim=4, seed=5)
    x, k = gmm.sample(6, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 0.2, 0.5, 1.0, 3.0, 10.0], dtype=torch.float64)
    x = (x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, dtype=torch.float64)).to(torch.float32)
    c = torch.eye(4)[k]
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
    exact = toy.guided_denoiser(gmm, x, sigma, c, w.reshape(-1, 1, 1, 1))
    assert (exact - gmm(x, sigma, c)).abs().max() > 0.01  # guidance changes the denoiser here
    torch.testing.assert_close(cfg_target(gmm, None, x, sigma, c, w), exact, rtol=0, atol=1e-6)  # null label
    torch.testing.assert_close(cfg_target(gmm, gmm_uncond, x, sigma, c, w), exact, rtol=0, atol=1e-6)  # separate
    auto = gmm(x, sigma, c) + w.reshape(-1, 1, 1, 1) * (gmm(x, sigma, c) - weaker(x, sigma, c))  # autoguidance
    torch.testing.assert_close(cfg_target(gmm, weaker, x, sigma, c, w), auto, rtol=0, atol=1e-6)

# ----------------------------------------------------------------------------
# Stage one: training.

def guided_method(w_range, lr=1e-3):
    dataset = dnnlib.EasyDict(resolution=8, num_channels=3, label_dim=4)
    return GuidedDistillation(tiny_teacher(4, label_dropout=0.1), torch.device('cpu'), batch_size=32, dataset=dataset,
                              guidance_range=w_range,
                              optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=lr), ema_halflife_kimg=None)


def guided_steps(method, num_steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for step in range(num_steps):
        images = torch.rand([32, 3, 8, 8], generator=g) * 2 - 1
        labels = torch.eye(4)[torch.randint(4, [32], generator=g)]
        method.step([Round(images, labels, StepRandom(seed, step, 32, 'cpu'), 0, 32)], step * 32)


def test_stage_one_at_w0_is_already_optimal():
    """At w = 0 the target is the teacher, which the fresh student equals: zero gradients, unchanged weights."""
    method = guided_method([0, 0])
    before = {k: v.clone() for k, v in method.student.state_dict().items()}
    guided_steps(method, 2)
    assert all(torch.equal(before[k], v) for k, v in method.student.state_dict().items())


def test_stage_one_loss_is_a_mean_over_pixels_and_batch(monkeypatch):
    """The per-sample loss is lam(s) * meanflat((D_student - D_w)^2) and a step follows the gradient of its batch mean,
    the reduction of the progressive-distillation code (google-research diffusion_distillation dpm.py `meanflat`,
    model.py `v.mean()`), so --grad-clip thresholds mean what they mean there."""
    dataset = dnnlib.EasyDict(resolution=8, num_channels=3, label_dim=4)
    method = GuidedDistillation(tiny_teacher(4, label_dropout=0.1), torch.device('cpu'), batch_size=8, dataset=dataset,
                                guidance_range=[1, 3], optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=0.1),
                                ema_halflife_kimg=None)
    student = copy.deepcopy(method.student)
    reported = {}
    monkeypatch.setattr(training_stats, 'report', lambda name, value: reported.setdefault(name, value))
    g = torch.Generator().manual_seed(3)
    images, labels = torch.rand([8, 3, 8, 8], generator=g) * 2 - 1, torch.eye(4)[torch.randint(4, [8], generator=g)]
    r = Round(images, labels, StepRandom(0, 0, 8, 'cpu'), 0, 8)
    method.step([r], 0)
    sigma = karras_sigma(r.rand('guided_sigma'), 0.002, 80, 7)
    w = 1 + 2 * r.rand('guided_w')
    x_s = images + sigma.reshape(-1, 1, 1, 1) * r.randn('guided_noise', 3, 8, 8)
    D_w = cfg_target(method.teacher, None, x_s, sigma, labels, w)
    lam = 1 / sigma ** 2 + 1 / 0.5 ** 2
    expected = lam * (student(x_s, sigma, labels, guidance=w) - D_w).square().flatten(1).mean(1)
    torch.testing.assert_close(reported['Loss/loss'], expected, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(expected.mean(), list(student.parameters()))
    for p, q, dp in zip(method.student.parameters(), student.parameters(), grads):
        torch.testing.assert_close(p - q, -0.1 * dp, rtol=1e-3, atol=1e-7)  # float32 weights: p - q rounds at ~1e-8


def test_stage_one_learns_the_guided_target():
    """w ~ U[0, 4]: on held-out inputs at w = 4, the student's error to D_w falls well below the teacher's (its start)."""
    method = guided_method([0, 4], lr=2e-3)
    g = torch.Generator().manual_seed(9)
    x = torch.rand([64, 3, 8, 8], generator=g) * 2 - 1
    sigma = (torch.randn([64], generator=g) * 1.2 - 1.2).exp()
    x_s, c, w = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g), torch.eye(4)[torch.arange(64) % 4], torch.full([64], 4.0)
    target = cfg_target(method.teacher, None, x_s, sigma, c, w)
    error = lambda: float(((method.student(x_s, sigma, c, guidance=w) - target) ** 2).mean())
    with torch.no_grad():
        start = error()
    guided_steps(method, 60)
    with torch.no_grad():
        assert error() < 0.6 * start

# ----------------------------------------------------------------------------
# Stage two: progressive distillation with w carried through to teacher and student.

class WGainDenoiser(GainDenoiser):
    """A linear w-conditioned denoiser, D = (1 + k w) * GainDenoiser; `model.map_guidance_layer` marks it as one."""

    def __init__(self, t, levels, k):
        super().__init__(t, levels)
        self.k = k
        self.model = torch.nn.Module()
        self.model.map_guidance_layer = torch.nn.Identity()

    def forward(self, x, sigma, class_labels=None, guidance=None, force_fp32=False):
        w = torch.as_tensor(0.0 if guidance is None else guidance, dtype=torch.float64).reshape(-1, 1, 1, 1)
        return (1 + self.k * w) * super().forward(x, sigma)


def test_stage_two_carries_w_through():
    """Trained at w = 1.5, the 4-step student samples what the 8-step teacher does at w = 1.5, not at w = 0."""
    levels = samplers.nested_sigmas(8, 0.002, 80, 7)[:-1]
    teacher = WGainDenoiser(0.5, levels, k=0.3).requires_grad_(False)
    dataset = dnnlib.EasyDict(resolution=4, num_channels=1, label_dim=0)
    with pytest.raises(ValueError, match='pass --w-range'):
        ProgressiveDistillation(teacher, torch.device('cpu'), 64, dataset, start_steps=8, end_steps=4,
                                optimizer_kwargs=dict(lr=0.1))
    method = ProgressiveDistillation(teacher, torch.device('cpu'), batch_size=64, dataset=dataset, start_steps=8,
                                     end_steps=4, round_kimg=64 * 0.5, guidance_range=[1.5, 1.5],
                                     optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=0.1))
    train_rounds(method, 0.5, 500)
    z = torch.randn([256, 1, 4, 4], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sample = lambda net, N, w: samplers.euler_sampler(net, z, None, samplers.nested_sigmas(N, 0.002, 80, 7),
                                                      model_kwargs=dict(guidance=w))
    torch.testing.assert_close(sample(method.student, 4, 1.5), sample(teacher, 8, 1.5), rtol=0, atol=1e-6)
    assert (sample(method.student, 4, 0.0) - sample(teacher, 8, 0.0)).abs().max() > 1e-2

# ----------------------------------------------------------------------------
# The loop and the command line.

def run_guided(run_dir, files, total_steps, resume_state=None):
    os.makedirs(run_dir, exist_ok=True)
    return loop_module.training_loop(
        run_dir=str(run_dir), teacher=str(files / 'teacher.pkl'),
        method_kwargs=dict(class_name='training.distill.guided.GuidedDistillation', guide=str(files / 'uncond.pkl'),
                           optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), ema_halflife_kimg=0.05),
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(files / 'cond.zip'), use_labels=True),
        seed=1, batch_size=16, batch_gpu=8, total_kimg=(total_steps * 16 - 0.5) / 1000, kimg_per_tick=0.016,
        snapshot_ticks=None, state_dump_ticks=1, resume_state=resume_state, preview_grid=0, device=torch.device('cpu'))


def test_resume_is_bitwise_exact(files, tmp_path):
    run_guided(tmp_path / 'full', files, 4)
    run_guided(tmp_path / 'cut', files, 2)
    run_guided(tmp_path / 'cut', files, 4, resume_state=str(tmp_path / 'cut'))
    a, b = [torch.load(loop_module.find_latest_state(str(tmp_path / d)), weights_only=True)['method'] for d in ['full', 'cut']]
    for net in ['student', 'ema']:
        assert all(torch.equal(v, b[net][k]) for k, v in a[net].items())
    assert not torch.equal(a['student']['model.map_guidance_layer.weight'], torch.zeros_like(a['student']['model.map_guidance_layer.weight']))


CLI = ['--batch=16', '--tick=0.016', '--snap=1', '--dump=100', '--workers=0', '--seed=3', '--device=cpu', '--nosubdir']


def cli(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def test_cli_stage_one_then_two_then_generate_with_guidance(files, tmp_path):
    r = cli(f'--outdir={tmp_path / "one"}', '--method=guided', f'--teacher={files / "teacher.pkl"}',
            f'--data={files / "cond.zip"}', '--cond=1', '--duration=0.000032', '--lr=1e-2', *CLI)
    assert r.exit_code == 0, r.output
    kw = json.load(open(tmp_path / 'one' / 'training_options.json'))['method_kwargs']
    assert (kw['guide'], kw['guidance_range'], kw['lr_rampup_kimg'], kw['ema_halflife_kimg']) == ('null', [0.0, 4.0], 0, 500)
    snap = str(tmp_path / 'one' / 'network-snapshot-000000.pkl')
    net = generate.load_network(snap)
    assert net.init_kwargs['guidance_embed'] is True and net.sampling_spec == dict(clip_denoised=True)

    # generate.py --guidance=w: the network is called with w; without the option, w = 0.
    r = CliRunner().invoke(generate.main, [f'--network={snap}', f'--outdir={tmp_path / "w2"}', '--seeds=0-1', '--steps=4', '--guidance=2'])
    assert r.exit_code == 0, r.output
    w2 = np.stack([np.asarray(PIL.Image.open(tmp_path / 'w2' / f'{i:06d}.png')) for i in range(2)])
    expected = generate.generate_batch(net, [0, 1], 'cpu', model_kwargs=dict(guidance=2.0), num_steps=4)
    assert np.array_equal(w2, expected.permute(0, 2, 3, 1).numpy())
    assert not torch.equal(expected, generate.generate_batch(net, [0, 1], 'cpu', num_steps=4))
    r = CliRunner().invoke(generate.main, [f'--network={files / "teacher.pkl"}', f'--outdir={tmp_path / "x"}', '--guidance=1'])
    assert r.exit_code != 0 and 'no guidance input' in r.output and not (tmp_path / 'x').exists()

    # Stage two: PD of the stage-one snapshot with w carried through.
    r = cli(f'--outdir={tmp_path / "two"}', '--method=pd', f'--teacher={snap}', f'--data={files / "cond.zip"}', '--cond=1',
            '--start-steps=2', '--round-kimg=0.032', *CLI)
    assert r.exit_code != 0 and 'pass --w-range' in r.output
    r = cli(f'--outdir={tmp_path / "two"}', '--method=pd', f'--teacher={snap}', f'--data={files / "cond.zip"}', '--cond=1',
            '--start-steps=2', '--final-round-kimg=0.032', '--w-range=0,4', *CLI)
    assert r.exit_code == 0, r.output
    student = generate.load_network(str(tmp_path / 'two' / 'network-snapshot-000000.pkl'))
    assert student.sampling_spec['num_steps'] == 1 and student.init_kwargs['guidance_embed'] is True
    r = CliRunner().invoke(generate.main, [f'--network={tmp_path / "two" / "network-snapshot-000000.pkl"}',
                                           f'--outdir={tmp_path / "w3"}', '--seeds=0', '--guidance=3'])
    assert r.exit_code == 0 and os.path.isfile(tmp_path / 'w3' / '000000.png'), r.output


@pytest.mark.parametrize('args, message', [
    (['--teacher={teacher}', '--data={cond}'], 'with --cond=1'),
    (['--teacher={uncond}', '--data={cond}', '--cond=1'], 'needs a class-conditional teacher'),
    (['--teacher={exact}', '--data={cond}', '--cond=1'], 'not a GMMDenoiser'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--guide={big}'], '--guide: The guide is 16x16x3'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--guide={dir}/none.pkl', '--dry-run'], '--guide: no such file'),
    (['--teacher={teacher}', '--data={cond}', '--cond=1', '--w-range=1'], 'MIN,MAX'),
    (['--teacher={official}', '--data={cond}', '--cond=1'], f'--guide=PKL|URL, e.g. {CIFAR10_UNCOND} for CIFAR-10'),
    (['--teacher={official}', '--data={cond}', '--cond=1', '--guide=null'], 'without label dropout (label_dropout=0'),
])
def test_cli_bad_input(files, tmp_path, args, message):
    args = [a.format(dir=files, **{k: files / f'{k}.{"zip" if k == "cond" else "pkl"}' for k in
                                   ['teacher', 'official', 'uncond', 'exact', 'big', 'cond']}) for a in args]
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=guided', '--device=cpu', '--batch=8', *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.startswith('Error:')]) == 1
    assert not (tmp_path / 'runs').exists()


def test_null_guide_needs_a_teacher_trained_with_label_dropout():
    """Built from Python too: the zero label of a teacher without label dropout is not an unconditional model."""
    dataset = dnnlib.EasyDict(resolution=8, num_channels=3, label_dim=4)
    for guide in ['null', None]:
        with pytest.raises(ValueError, match=r'label_dropout=0.*--guide=PKL\|URL'):
            GuidedDistillation(tiny_teacher(4), torch.device('cpu'), batch_size=8, dataset=dataset, guide=guide,
                               optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3))
    method = GuidedDistillation(tiny_teacher(4, label_dropout=0.1), torch.device('cpu'), batch_size=8, dataset=dataset,
                                optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3))
    assert method.guide is None  # the default 'null': the teacher with a zero label

# ----------------------------------------------------------------------------
# The README recipes (with the tests' tiny dataset and placeholder files in place of the real ones).

def test_recipe_cifar10_stage_one_and_two(files, tmp_path):
    r = cli(f'--outdir={tmp_path}', '--method=guided', f'--teacher={CIFAR10_COND}', f'--guide={CIFAR10_UNCOND}',
            f'--data={files / "cond.zip"}', '--cond=1', '--batch=512', '--lr=1e-4', '--w-range=0,4', '--duration=20', '--dry-run')
    assert r.exit_code == 0, r.output
    c = printed_options(r.output)
    assert c['method_kwargs']['guide'] == CIFAR10_UNCOND and c['method_kwargs']['guidance_range'] == [0, 4]
    assert c['total_kimg'] == 20000 and c['teacher'] == CIFAR10_COND
    stage_one = tmp_path / 'guided-cifar10.pkl'
    stage_one.write_bytes(b'')  # a dry run checks only that the file exists
    r = cli(f'--outdir={tmp_path}', '--method=pd', f'--teacher={stage_one}', f'--data={files / "cond.zip"}', '--cond=1',
            '--batch=128', '--lr=5e-5', '--start-steps=8192', '--end-steps=1', '--w-range=0,4', '--dry-run')
    assert r.exit_code == 0, r.output
    assert printed_options(r.output)['method_kwargs']['guidance_range'] == [0, 4]
    assert printed_options(r.output)['method_kwargs']['start_steps'] == 8192  # PD's official CIFAR-10 start
    assert os.listdir(tmp_path) == ['guided-cifar10.pkl']


def test_recipe_imagenet64_autoguidance(files, tmp_path):
    weak = tmp_path / 'imagenet64-weak.pkl'
    weak.write_bytes(b'')
    r = cli(f'--outdir={tmp_path}', '--method=guided', f'--teacher={IMAGENET64}', f'--guide={weak}',
            f'--data={files / "cond.zip"}', '--cond=1', '--batch=2048', '--lr=1e-4', '--w-range=0,4', '--duration=50', '--dry-run')
    assert r.exit_code == 0, r.output
    c = printed_options(r.output)
    assert c['method_kwargs']['guide'] == str(weak) and c['batch_size'] == 2048 and c['total_kimg'] == 50000
