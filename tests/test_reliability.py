"""Reliability (docs/RELIABILITY.md): exact resume of every method after SIGTERM, resume option checks, one-line
errors before anything is written, OS write errors, temp files, the run-directory lock, exit codes, safe loading
under fuzzing, --transfer. One test per root cause of issue 15, parametrised over its cases."""

import functools
import json
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import make_pairs
import train
from dataset_tool import save_dataset
from training import training_loop as loop_module
from training.batching import StepRandom
from training.networks import EDMPrecond

TINY = dict(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16, channel_mult=[1],
            num_blocks=1, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """16 labelled 8x8 images; a tiny teacher; a KD teacher with dropout (2 blocks, so KD can remove one); its pairs."""
    root = tmp_path_factory.mktemp('reliability')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)]
    save_dataset(str(root / 'cond.zip'), images, [i % 4 for i in range(16)])
    torch.manual_seed(0)
    for name, kwargs in [('teacher', {}), ('teacher-kd', dict(num_blocks=2, dropout=0.1))]:
        with open(root / f'{name}.pkl', 'wb') as f:
            pickle.dump(dict(ema=EDMPrecond(**dict(TINY, **kwargs))), f)
    r = CliRunner().invoke(make_pairs.main, [f'--teacher={root / "teacher.pkl"}', f'--outdir={root / "pairs"}',
                                             '--seeds=0-7', '--shard-size=4', '--steps=2', '--device=cpu'])
    assert r.exit_code == 0, r.output
    return root


def invoke(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def latest_state(run_dir):
    return torch.load(loop_module.find_latest_state(str(run_dir)), weights_only=True)


def assert_equal_trees(a, b, where=''):
    """Nested dicts/lists of tensors and plain values, bitwise equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal_trees(a[k], b[k], f'{where}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f'{where}[{i}]')
    else:
        assert a == b, (where, a, b)

# ----------------------------------------------------------------------------
# Root cause 1: exact resume of every method after SIGTERM at a random step, with a seed the first run drew.

COMMON = ['--batch=8', '--tick=0.008', '--snap=1000', '--dump=1000', '--workers=0', '--device=cpu', '--nosubdir']
EDM_NET = ['--arch=ddpmpp', '--cbase=16', '--cres=1', '--lr-rampup=0']
DMD = ['--sigma-init=80', '--lr=1e-4', '--fake-steps=2']
DISBACK = ['--method=disback', '--teacher={teacher}', *DMD, '--stage1-kimg=0.024', '--path-nodes=3', '--switch-every=2']

# name: (options, total steps, range of the step during which SIGTERM arrives)
RESUME_CASES = {
    'edm': (['--data={data}', '--cond=1', *EDM_NET, '--dropout=0.13', '--augment=0.5', '--workers=1'], 5, (0, 3)),
    'dmd': (['--method=dmd', '--teacher={teacher}', '--data={data}', '--cond=1', *DMD, '--pairs={pairs}',
             '--reg-loss=l2', '--gan-g=3e-3'], 5, (0, 3)),
    'disback-stage1': (DISBACK, 9, (0, 1)),  # stage 1 is 3 steps
    'disback-stage2': (DISBACK, 9, (3, 7)),
    'pd': (['--method=pd', '--teacher={teacher}', '--data={data}', '--cond=1', '--start-steps=8', '--round-kimg=0.016',
            '--final-round-kimg=0.024', '--lr=1e-3'], 8, (0, 4)),  # rounds of 2, 3, 3 steps: a boundary follows
    'guided': (['--method=guided', '--teacher={teacher}', '--data={data}', '--cond=1', '--lr=1e-3'], 4, (0, 2)),
    'kd': (['--method=kd', '--teacher={teacher_kd}', '--data={data}', '--cond=1', '--kd-variant=base', '--augment=0',
            '--lr=1e-3'], 4, (0, 2)),
}


@pytest.mark.parametrize('name', sorted(RESUME_CASES))
def test_sigterm_and_resume_is_bitwise_exact(files, tmp_path, monkeypatch, name):
    args, steps, (lo, hi) = RESUME_CASES[name]
    args = [a.format(data=files / 'cond.zip', teacher=files / 'teacher.pkl', teacher_kd=files / 'teacher-kd.pkl',
                     pairs=files / 'pairs') for a in args] + COMMON
    if name != 'pd':  # PD's duration is its rounds
        args.append(f'--duration={(steps * 8 - 0.5) * 1e-6}')
    cut = random.Random(name).randint(lo, hi)  # seeded: a failure reproduces
    # No preview grids: their sampling would dominate these tiny runs.
    monkeypatch.setattr(loop_module, 'training_loop', functools.partial(loop_module.training_loop, preview_grid=0))

    class SigtermDuringStep(StepRandom):
        def __init__(self, seed, step, *rest):
            super().__init__(seed, step, *rest)
            if step == cut:
                os.kill(os.getpid(), signal.SIGTERM)
    with monkeypatch.context() as m:
        m.setattr(loop_module, 'StepRandom', SigtermDuringStep)
        r = invoke(f'--outdir={tmp_path / "cut"}', *args)  # no --seed: the run draws one and records it
    assert r.exit_code == dnnlib.util.EXIT_STOPPED, r.output
    assert f'resume with --resume={tmp_path / "cut"}' in r.output
    assert latest_state(tmp_path / 'cut')['step'] == cut + 1
    seed = json.loads((tmp_path / 'cut' / 'training_options.json').read_text())['seed']

    r = invoke(f'--resume={tmp_path / "cut"}', *args)  # the same options, again without --seed
    assert r.exit_code == 0, r.output
    r = invoke(f'--outdir={tmp_path / "full"}', f'--seed={seed}', *args)
    assert r.exit_code == 0, r.output
    full, resumed = latest_state(tmp_path / 'full'), latest_state(tmp_path / 'cut')
    assert full['step'] == steps
    assert_equal_trees(full, resumed)
