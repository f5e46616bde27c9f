"""DisBack on SiD (--method=sid-disback): the walk is SiD's real score (closed form), the recorded path, target
switching and convergence on Gaussians, train.py. Exact resume in both stages: tests/test_reliability.py."""

import json
import os

import pytest
import torch
from click.testing import CliRunner

import train
from test_disback import MU, T_DATA, loaded, one_step, path_checksums, path_files, write_path
from test_dmd import GaussianDenoiser, generator_moments
from test_sid import expected_gradient
from torch_utils import misc
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.distill.disback import SiDDisBack, node_path


def gaussian_sid_disback(**kwargs):
    return SiDDisBack(GaussianDenoiser(MU, T_DATA), 'cpu', batch_size=64, ema_halflife_kimg=None, **kwargs)


def test_stage2_sid_loss_uses_the_current_node_as_its_real_score(tmp_path):
    """On a recorded path of Gaussian nodes N(MU + 0.1 i, (T / (1 + i))^2), the SiD generator gradient equals the
    closed form of tests/test_sid.py with y_r the current node's exact denoiser: s'_2, then s'_1 after a switch, then
    the teacher; with any other node as y_r the closed form does not match."""
    write_path(tmp_path, 3)
    db = gaussian_sid_disback(path=str(tmp_path), switch_every=1)
    with torch.no_grad():  # a fake score unlike every node (it starts as s'_3)
        db.fake.mean.fill_(0.1)
        db.fake.log_std.fill_(-1.5)
    nodes = [loaded(node_path(tmp_path, i)) for i in range(4)]
    r = Round(None, None, StepRandom(0, 0, 256, 'cpu'), 0, 256)
    x0 = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    for node in (2, 1, 0):
        assert db.node == node
        x = x0.clone().requires_grad_(True)
        db.distribution_matching_loss(x, r, None).sum().backward()
        for i, net in enumerate(nodes):
            expected = expected_gradient(net, db.fake, x, r, db.alpha)
            if i == node:
                torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)
            else:
                assert (x.grad - expected).abs().max() > 1e-2, (node, i)
        if node > 0:
            db._switch()
    assert db.target() is db.real


def test_path_switches_and_convergence_to_data(tmp_path):
    """Stage 1 writes s'_0 = teacher ... s'_N = the auxiliary score on G0's samples (G0 untouched); stage 2 switches
    the target exactly at generator steps K2, 2 K2, 3 K2, each switch loading the next node's weights (checksums), the
    last to the teacher itself; SiD's generator then reaches the data."""
    N, K1, K2 = 4, 200, 50
    db = gaussian_sid_disback(run_dir=str(tmp_path), path_nodes=N, path_steps=K1, switch_every=K2, lr=1e-2,
                              fake_lr=2e-2, stage1_lr=1e-2)
    with torch.no_grad():  # G0 away from the data: mean shifted, spread collapsed
        db.G.mean.add_(0.5)
        db.G.log_std.add_(-1.0)
    g0 = misc.checksum(db.G)
    for step in range(K1):
        one_step(db, step)
    assert db.stage == 2 and misc.checksum(db.G) == g0 and db.num_g_steps == 0
    assert sorted(os.listdir(tmp_path)) == path_files(N)
    path = [loaded(node_path(tmp_path, i)) for i in range(N + 1)]
    assert misc.checksum(path[0]) == misc.checksum(db.real) and misc.checksum(path[N]) == misc.checksum(db.fake)
    assert len({misc.checksum(p) for p in path}) == N + 1
    mean0, std0 = generator_moments(db)
    assert (path[N].mean - mean0).abs().max() < 0.01 and std0 < path[N].log_std.exp() < T_DATA / 3  # towards p_G0

    seen = [(0, misc.checksum(db.target()))]
    for step in range(K1, K1 + 400):
        one_step(db, step, seed=1)
        if misc.checksum(db.target()) != seen[-1][1]:
            seen.append((db.num_g_steps, misc.checksum(db.target())))
    assert db.switches == [K2, 2 * K2, 3 * K2] and db.node == 0 and db.target() is db.real
    assert seen == [(0, misc.checksum(path[3]))] + [((3 - i) * K2, misc.checksum(path[i])) for i in (2, 1, 0)]

    db.lr, db.fake_lr = 1e-3, 2e-3  # a slower phase removes most of the stochastic jitter (as in tests/test_sid.py)
    for step in range(K1 + 400, K1 + 1200):
        one_step(db, step, seed=2)
    mean, std = generator_moments(db)
    assert (mean - MU).abs().max() < 0.03, mean
    assert abs(std - T_DATA) < 0.02, std


def test_converged_rule_is_refused():
    with pytest.raises(ValueError, match='SiD\'s loss is no measure of convergence'):
        gaussian_sid_disback(path='unused', switch_rule='converged')

# ----------------------------------------------------------------------------
# train.py --method=sid-disback with a tiny EDM teacher.

# Batch 8: stage 1 is 3 steps (N = 3), then 6 generator steps switching every 2: switches at 2 and 4.
ARGS = ['--method=sid-disback', '--batch=8', '--tick=1', '--seed=1', '--device=cpu', '--lr=1e-4', '--nosubdir',
        '--switch-every=2']
STAGE1 = ['--stage1-kimg=0.024', '--path-nodes=3']


def run(outdir, teacher, steps, *args):
    r = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--teacher={teacher}', f'--duration={(steps * 8 - 0.5) * 1e-6}',
                                        *ARGS, *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return torch.load(loop_module.find_latest_state(str(outdir)), weights_only=True)['method']


def test_cli_records_the_path_and_backtracks(teacher_pkl, tmp_path):
    """SiD's options and defaults with DisBack's; stage 1 writes the path (strict state dicts of the teacher's network,
    s'_0 = the teacher), stage 2 switches at 2 and 4; --path reuses it with the same switches."""
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', *ARGS, *STAGE1, '--dry-run'])
    assert r.exit_code == 0, r.output
    kw = json.loads(r.output.split('Training options:')[1].split('Output directory')[0])['method_kwargs']
    assert kw['class_name'] == 'training.distill.disback.SiDDisBack'
    assert (kw['sigma_init'], kw['alpha'], kw['t_max'], kw['g_beta1'], kw['fake_sigma']) == (2.5, 1.2, 800, 0, 'lognormal')
    assert (kw['path_nodes'], kw['path_steps'], kw['switch_every'], kw['switch_rule']) == (3, 3, 2, 'every')
    assert kw['stage1_lr'] == pytest.approx(1e-5) and 'fake_steps' not in kw

    full = run(tmp_path / 'full', teacher_pkl, 9, *STAGE1)
    assert full['stage'] == 2 and full['stage1_done'] == 3 and full['num_g_steps'] == 6
    assert full['switches'] == [2, 4] and full['node'] == 0
    sums, teacher = path_checksums(teacher_pkl, tmp_path / 'full', 3)
    assert sums[0] == misc.checksum(teacher) and len(set(sums)) == 4

    alone = run(tmp_path / 'alone', teacher_pkl, 6, f'--path={tmp_path / "full"}')
    assert alone['stage'] == 2 and alone['stage1_done'] == 0 and alone['switches'] == [2, 4]
    assert not any(n.startswith('path-') for n in os.listdir(tmp_path / 'alone'))


@pytest.mark.parametrize('args, message', [
    ([], '--method=sid-disback needs --teacher'),
    (['--teacher={teacher}', '--switch=converged'], 'use --switch=every with --method=sid-disback'),
    (['--teacher={teacher}', '--fake-steps=2'], '--fake-steps is a DMD option'),
    (['--teacher={teacher}', '--path={empty}', '--stage1-lr=1e-4'], 'no stage 1): drop --stage1-lr'),
])
def test_cli_bad_input_is_one_line_before_any_directory(teacher_pkl, tmp_path, args, message):
    os.makedirs(tmp_path / 'empty')
    args = [a.format(teacher=teacher_pkl, empty=tmp_path / 'empty') for a in args]
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=sid-disback', '--device=cpu', *args])
    assert r.exit_code == 1 and r.output.startswith('Error: ') and len(r.output.strip().splitlines()) == 1, r.output
    assert message in r.output
    assert not (tmp_path / 'runs').exists()
