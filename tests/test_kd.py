"""KD compression (training/distill/kd.py): student sizes, weight copy, hooks, loss terms, errors, loop and CLI."""

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
import generate
import train
from dataset_tool import save_dataset
from torch_utils import persistence
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.distill import kd
from training.loss import EDMLoss
from training.networks import EDMPrecond, VPPrecond

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SONG = dict(model_type='SongUNet', model_channels=16, channel_mult=[1, 2, 2], num_blocks=3, attn_resolutions=[4],
            dropout=0)
ADM = dict(model_type='DhariwalUNet', model_channels=32, channel_mult=[1, 2], num_blocks=3, attn_resolutions=[4],
           dropout=0)


def make_teacher(arch=SONG, precond=EDMPrecond, label_dim=4, seed=0, **kwargs):
    """A tiny 8x8 teacher with non-trivial weights (the zero-initialised layers are perturbed too)."""
    torch.manual_seed(seed)
    net = precond(img_resolution=8, img_channels=3, label_dim=label_dim, **{**arch, **kwargs})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval().requires_grad_(False)


def count(net, prefixes=None):
    return sum(p.numel() for name, p in net.named_parameters() if prefixes is None or name.startswith(tuple(prefixes)))

# ----------------------------------------------------------------------------
# Sizes of the official configs' students.

def test_official_student_sizes():
    with torch.device('meta'):
        cifar = dnnlib.util.construct_class_by_name(**kd.TEACHER_CONFIGS['cifar10'])
        adm = dnnlib.util.construct_class_by_name(**kd.TEACHER_CONFIGS['imagenet64'])
        students = {(name, v): dnnlib.util.construct_class_by_name(**kd.student_config(t, v))
                    for name, t, variants in [('cifar10', cifar, kd.VARIANTS), ('imagenet64', adm, ['base', 'small'])]
                    for v in variants}
    assert count(cifar) == 55_735_299 and count(adm) == 295_899_267  # EDM's published counts
    sizes = {key: count(net) for key, net in students.items()}
    assert sizes == {('cifar10', 'base'): 35_127_811, ('cifar10', 'small'): 32_239_107, ('cifar10', 'tiny'): 20_754_947,
                     ('imagenet64', 'base'): 229_413_123, ('imagenet64', 'small'): 203_443_971}

    # Independently: the teacher minus the modules the rules drop (the student's last decoder block is the teacher's last).
    enc = lambda res, blocks: [f'model.enc.{r}x{r}_block{i}.' for r in res for i in blocks]
    dec = lambda res, blocks: [f'model.dec.{r}x{r}_block{i}.' for r in res for i in blocks]
    base = enc([32, 16, 8], [2, 3]) + dec([32, 16, 8], [2, 3])
    small = base + ['model.dec.8x8_in0.', 'model.dec.8x8_in1.']
    tiny = small + ['model.enc.8x8_', 'model.dec.8x8_', 'model.dec.16x16_up.']
    assert sizes['cifar10', 'base'] == count(cifar) - count(cifar, base)
    assert sizes['cifar10', 'small'] == count(cifar) - count(cifar, small)
    assert sizes['cifar10', 'tiny'] == count(cifar) - count(cifar, tiny)
    adm_base = enc([64, 32, 16, 8], [2]) + dec([64, 32, 16, 8], [2])
    assert sizes['imagenet64', 'base'] == count(adm) - count(adm, adm_base)
    assert sizes['imagenet64', 'small'] == count(adm) - count(adm, adm_base + ['model.dec.8x8_in0.', 'model.dec.8x8_in1.'])


def test_mid_blocks_keyword_only_removes_in0_in1():
    with torch.device('meta'):
        a = EDMPrecond(img_resolution=8, img_channels=3, **SONG)
        b = EDMPrecond(img_resolution=8, img_channels=3, **SONG, mid_blocks=True)
        c = EDMPrecond(img_resolution=8, img_channels=3, **SONG, mid_blocks=False)
    assert list(a.state_dict()) == list(b.state_dict())
    assert [k for k in a.state_dict() if k not in c.state_dict()] == [k for k in a.state_dict() if '_in0.' in k or '_in1.' in k]
    assert all(k in a.state_dict() for k in c.state_dict())

# ----------------------------------------------------------------------------
# Weight copy.

@pytest.mark.parametrize('arch', [SONG, ADM], ids=['song', 'adm'])
@pytest.mark.parametrize('variant', kd.VARIANTS)
def test_copied_weights_equal_teachers(arch, variant):
    teacher = make_teacher(arch, channel_mult=[1, 2, 2])
    student = kd.make_student(teacher, variant)
    s, t = student.state_dict(), teacher.state_dict()
    assert student.init_kwargs['num_blocks'] == 2 and count(student) < count(teacher)
    for key, value in s.items():
        # The rule, spelled out: decoder block 2 (the student's last) <- teacher block 3; all else by name.
        src = key.replace('_block2.', '_block3.') if key.startswith('model.dec.') else key
        assert torch.equal(value, t[src]), key
    assert ('model.dec.2x2_in0.conv0.weight' in s) == (variant == 'base')
    assert ('model.enc.2x2_block0.conv0.weight' in s) == (variant != 'tiny')
    assert not any('_block3.' in k for k in s)


def test_student_with_nothing_removed_is_the_teacher():
    for arch, precond in [(SONG, EDMPrecond), (ADM, EDMPrecond), (SONG, VPPrecond)]:
        teacher = make_teacher(arch, precond)
        student = kd.make_student(teacher, num_blocks=3)
        assert type(student) is type(teacher) and student.init_kwargs == teacher.init_kwargs | dict(num_blocks=3)
        x, labels = torch.randn(4, 3, 8, 8), torch.eye(4)
        for sigma in [0.01, 1.0, 40.0]:
            assert torch.equal(student.eval()(x, sigma, labels), teacher(x, sigma, labels))
        rnd = Round(x, labels, StepRandom(0, 0, 4, 'cpu'), 0, 4)
        L_task, L_out, L_feat = kd.kd_terms(student, teacher, kd.feature_pairs(student, teacher), EDMLoss(), x, labels, rnd=rnd)
        assert L_task.shape == (4,) and (L_task > 0).all()
        assert torch.equal(L_out, torch.zeros(4)) and torch.equal(L_feat, torch.zeros(4))


def test_hooks_capture_level_features():
    teacher = make_teacher(SONG)
    student = kd.make_student(teacher, 'small')
    pairs = kd.feature_pairs(student, teacher)
    assert pairs == [('model.enc.8x8_block1', 'model.enc.8x8_block2'), ('model.dec.8x8_block2', 'model.dec.8x8_block3'),
                     ('model.enc.4x4_block1', 'model.enc.4x4_block2'), ('model.dec.4x4_block2', 'model.dec.4x4_block3'),
                     ('model.enc.2x2_block1', 'model.enc.2x2_block2'), ('model.dec.2x2_block2', 'model.dec.2x2_block3')]
    x = torch.randn(5, 3, 8, 8)
    with kd.capture(student, [s for s, _ in pairs]) as f_S, kd.capture(teacher, [t for _, t in pairs]) as f_T:
        student(x, 1.0)
        teacher(x, 1.0)
    channels = {8: 16, 4: 32, 2: 32}
    for s, t in pairs:
        res = int(s.split('.')[2].split('x')[0])
        assert f_S[s].shape == f_T[t].shape == (5, channels[res], res, res), s
    # The hooks are gone afterwards.
    assert all(not m._forward_hooks for m in list(student.modules()) + list(teacher.modules()))


def test_kd_terms_share_sigma_and_noise():
    teacher = make_teacher(SONG)
    student = kd.make_student(teacher, 'base').train()
    x, labels = torch.rand(6, 3, 8, 8) * 2 - 1, torch.eye(4)[torch.arange(6) % 4]
    rnd = Round(x, labels, StepRandom(5, 2, 6, 'cpu'), 0, 6)
    pairs = kd.feature_pairs(student, teacher)
    for feat_norm in [False, True]:
        L_task, L_out, L_feat = kd.kd_terms(student, teacher, pairs, EDMLoss(), x, labels, rnd=rnd, feat_norm=feat_norm)
        # Recompute from the same streams: sigma and noise of EDMLoss, one evaluation of each network.
        sigma = (rnd.randn('loss_sigma', 1, 1, 1) * 1.2 - 1.2).exp()
        x_s = x + rnd.randn('loss_noise', 3, 8, 8) * sigma
        with kd.capture(student, [s for s, _ in pairs]) as f_S, kd.capture(teacher, [t for _, t in pairs]) as f_T:
            D_S, D_T = student(x_s, sigma, labels), teacher(x_s, sigma, labels)
        lam = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
        torch.testing.assert_close(L_task, (lam * (D_S - x) ** 2).mean([1, 2, 3]))
        torch.testing.assert_close(L_out, (lam * (D_S - D_T) ** 2).mean([1, 2, 3]))
        feat = sum((f_S[s] - f_T[t]).square().mean([1, 2, 3]) / (f_T[t].flatten(1).var(1) if feat_norm else 1)
                   for s, t in pairs)
        torch.testing.assert_close(L_feat, feat)
        assert (L_out > 0).all() and (L_feat > 0).all()

# ----------------------------------------------------------------------------
# Errors.

@pytest.mark.parametrize('teacher_kwargs, variant, num_blocks, message', [
    (dict(), 'huge', None, 'Invalid KD variant "huge"'),
    (dict(), None, None, 'Give a KD variant'),
    (dict(), None, 4, 'num_blocks=4 must be between 1 and the teacher\'s 3'),
    (dict(), 'base', 0, 'num_blocks=0 must be between 1'),
    (dict(channel_mult=[2]), 'tiny', None, 'only one level'),
    (dict(arch=ADM), 'tiny', None, 'equal channels at the two lowest resolutions'),
    (dict(num_blocks=1), 'base', None, 'removes nothing'),
    (dict(num_blocks=1, mid_blocks=False), 'small', None, 'removes nothing'),
])
def test_bad_variant_teacher_combinations(teacher_kwargs, variant, num_blocks, message):
    teacher = make_teacher(**teacher_kwargs)
    with pytest.raises(ValueError, match=message):
        kd.make_student(teacher, variant, num_blocks)


def test_teacher_must_be_a_project_network():
    from training.toy import GMMDenoiser
    with pytest.raises(ValueError, match='SongUNet or DhariwalUNet'):
        kd.make_student(GMMDenoiser(img_resolution=8, num_components=2), 'base')
    with pytest.raises(ValueError, match='does not record its constructor arguments'):
        kd._init_kwargs(torch.nn.Linear(2, 2))

# ----------------------------------------------------------------------------
# The method in the training loop, its snapshot as a network for generate.py and for further distillation.

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('kd')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)]
    save_dataset(str(root / 'cond.zip'), images, [i % 4 for i in range(16)])
    with open(root / 'teacher.pkl', 'wb') as f:
        pickle.dump(dict(ema=make_teacher()), f)
    with open(root / 'teacher-adm.pkl', 'wb') as f:
        pickle.dump(dict(ema=make_teacher(ADM)), f)
    return root


def run_loop(run_dir, files, total_kimg, resume_state=None, **method_kwargs):
    method_kwargs = dict(class_name='training.distill.kd.KD', variant='small', feat_norm=True,
                         optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), ema_halflife_kimg=0.01,
                         sample_steps=2, **method_kwargs)
    os.makedirs(run_dir, exist_ok=True)
    return loop_module.training_loop(
        run_dir=str(run_dir), method_kwargs=method_kwargs, teacher=str(files / 'teacher.pkl'), seed=1, batch_size=8,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=str(files / 'cond.zip'), use_labels=True),
        total_kimg=total_kimg, kimg_per_tick=0.008, snapshot_ticks=1, state_dump_ticks=1, resume_state=resume_state,
        preview_grid=4, device=torch.device('cpu'))


def test_loop_snapshot_resume_and_reuse(files, tmp_path):
    assert run_loop(tmp_path / 'a', files, total_kimg=0.016)
    lines = [json.loads(l) for l in open(tmp_path / 'a' / 'stats.jsonl')]
    assert all(name in lines[-1] for name in ['Loss/task', 'Loss/out', 'Loss/feat', 'Loss/loss'])

    # Exact resume: one step, then resume for the second, gives the same weights.
    run_loop(tmp_path / 'b', files, total_kimg=0.008)
    run_loop(tmp_path / 'b', files, total_kimg=0.016, resume_state=str(tmp_path / 'b'))
    a = torch.load(loop_module.find_latest_state(str(tmp_path / 'a')), weights_only=True)['method']
    b = torch.load(loop_module.find_latest_state(str(tmp_path / 'b')), weights_only=True)['method']
    for k in a['net']:
        assert torch.equal(a['net'][k], b['net'][k]), k

    # The snapshot is a plain network: safe loader, EDM-style loader, generate.py, and a teacher for KD again.
    path = tmp_path / 'a' / 'network-snapshot-000000.pkl'
    net = persistence.load_network_pkl(str(path))
    assert type(net) is EDMPrecond and net.init_kwargs['mid_blocks'] is False and net.init_kwargs['num_blocks'] == 2
    for k, v in net.state_dict().items():
        assert torch.equal(v, a['ema'][k]), k
    trusted = persistence.load_network_pkl(str(path), allow_code=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(trusted(x, 0.5, torch.eye(4)[:2]), net(x, 0.5, torch.eye(4)[:2]))
    r = CliRunner().invoke(generate.main, [f'--network={path}', f'--outdir={tmp_path / "out"}', '--seeds=0-1',
                                           '--steps=2', '--device=cpu'])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / 'out')) == ['000000.png', '000001.png']
    assert count(kd.make_student(net, 'base')) < count(net)

# ----------------------------------------------------------------------------
# train.py --method=kd.

def cli(files, tmp_path, *args):
    return CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--device=cpu', '--method=kd',
                                           f'--data={files / "cond.zip"}', '--cond=1', '--batch=8', *args])


def test_cli_dry_run_recipe(files, tmp_path):
    r = cli(files, tmp_path, f'--teacher={files / "teacher.pkl"}', '--kd-variant=tiny', '--kd-feat=0.5',
            '--kd-feat-norm=1', '--dry-run')
    assert r.exit_code == 0, r.output
    options = json.loads(r.output[r.output.index('{'):r.output.index('\n}\n') + 2])
    m = options['method_kwargs']
    assert m['class_name'] == 'training.distill.kd.KD' and m['variant'] == 'tiny' and m['num_blocks'] is None
    assert (m['lambda_out'], m['lambda_feat'], m['feat_norm']) == (1, 0.5, True)
    assert m['optimizer_kwargs']['lr'] == 1e-4 and m['lr_rampup_kimg'] == 0 and m['max_grad_norm'] is None
    assert m['augment_kwargs']['p'] == 0.12  # EDM's setting; the method drops it for teachers without augment labels
    assert options['run_dir'].endswith('kd-teacher-tiny-gpus1-batch8-fp32')
    assert not (tmp_path / 'runs').exists()
    r = cli(files, tmp_path, f'--teacher={files / "teacher.pkl"}', '--grad-clip=1', '--lr=5e-5', '--dry-run')  # BK-SDM's
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index('{'):r.output.index('\n}\n') + 2])['method_kwargs']
    assert m['max_grad_norm'] == 1 and m['optimizer_kwargs']['lr'] == 5e-5


@pytest.mark.parametrize('args, message', [
    ([], 'needs --teacher'),
    (['--teacher={adm}', '--kd-variant=tiny'], 'equal channels'),
    (['--teacher={song}', '--num-blocks=5'], 'num_blocks=5'),
    (['--teacher={song}', '--transfer={song}'], 'drop --transfer'),
    (['--teacher={song}', '--cond=0'], 'with 4 labels'),
])
def test_cli_bad_input_creates_nothing(files, tmp_path, args, message):
    args = [a.format(song=files / 'teacher.pkl', adm=files / 'teacher-adm.pkl') for a in args]
    r = cli(files, tmp_path, *args)
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / 'runs').exists()


def test_augment_pipe_only_for_teachers_with_augment_labels():
    augment = dict(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                   aniso=1, translate_frac=1)
    ds = type('DS', (), dict(resolution=8, num_channels=3, label_dim=4))()
    plain = kd.KD('cpu', 8, make_teacher(), ds, augment_kwargs=augment)
    augmented = kd.KD('cpu', 8, make_teacher(augment_dim=9), ds, augment_kwargs=augment)
    assert plain.augment_pipe is None
    assert augmented.augment_pipe is not None and augmented.augment_pipe.p == 0.12

# ----------------------------------------------------------------------------
# Two processes (gloo) give the weights of one process, with the official teachers' kind of dropout (0.10).

KD_LOOP = r'''
import sys
import torch
from torch_utils import distributed
from training import training_loop

files, out = sys.argv[1:]
distributed.init('cpu')
training_loop.training_loop(
    run_dir=out, teacher=f'{files}/teacher-dropout.pkl', seed=1, batch_size=8, total_kimg=0.008, kimg_per_tick=0.008,
    method_kwargs=dict(class_name='training.distill.kd.KD', variant='small', ema_halflife_kimg=0.01,
                       optimizer_kwargs=dict(class_name='torch.optim.SGD', lr=0.05)),
    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=f'{files}/cond.zip', use_labels=True),
    snapshot_ticks=None, state_dump_ticks=1, preview_grid=0, device=torch.device('cpu'))
distributed.shutdown()
'''


def test_two_processes_match_one_with_dropout(files, tmp_path):
    teacher = make_teacher(dropout=0.10)
    with open(files / 'teacher-dropout.pkl', 'wb') as f:
        pickle.dump(dict(ema=teacher), f)
    (tmp_path / 'loop.py').write_text(KD_LOOP)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    for name, launcher in [('one', []), ('two', ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'])]:
        os.makedirs(tmp_path / name)
        proc = subprocess.run([sys.executable, *launcher, str(tmp_path / 'loop.py'), str(files), str(tmp_path / name)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (torch.load(loop_module.find_latest_state(str(tmp_path / n)), weights_only=True)['method']['net']
                for n in ('one', 'two'))
    init = kd.make_student(teacher, 'small')
    assert init.model.enc['8x8_block0'].dropout == 0.10
    init = init.state_dict()
    change = max((one[k] - init[k]).abs().max() for k in one)
    diff = max((one[k] - two[k]).abs().max() for k in one)
    assert change > 1e-3 and diff < 1e-4 * change, (change, diff)
