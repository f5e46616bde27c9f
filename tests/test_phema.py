"""Post-hoc EMA (training/phema.py, train.py --phema, reconstruct_phema.py): profile algebra against closed forms, the
tracker against the profile integral, reconstruction of tracked profiles, exact resume, one-line errors."""

import os
import signal

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import reconstruct_phema
import train
import test_training
from torch_utils import persistence
from training import phema
from training import training_loop as loop_module

data = test_training.data  # the fixture: 16 labelled 8x8 images
run_loop = test_training.run_loop


def test_std_to_exp_matches_edm2():
    # EDM2's post-hoc EMA (NVlabs/edm2:training/phema.py, commit 4bf8162): std 0.050 gives gamma 16.9722, std 0.100 gives 6.9372.
    assert abs(phema.std_to_exp(0.05) - 16.9722) < 1e-4 and abs(phema.std_to_exp(0.1) - 6.9372) < 1e-4
    for std in [0.01, 0.05, 0.1, 0.2, 0.28]:
        assert abs(phema.exp_to_std(phema.std_to_exp(std)) - std) < 1e-12
    for bad in [0, -0.1, 0.29]:
        with pytest.raises(ValueError, match='out of range'):
            phema.std_to_exp(bad)


@pytest.mark.parametrize('Ta, sa, Tb, sb', [(1000, 0.05, 1000, 0.1), (600, 0.1, 1000, 0.05), (1000, 0.2, 300, 0.03)])
def test_profile_inner_product_against_quadrature(Ta, sa, Tb, sb):
    ga, gb = phema.std_to_exp(sa), phema.std_to_exp(sb)
    t = np.linspace(0, min(Ta, Tb), 200001)
    f = (ga + 1) * t ** ga / Ta ** (ga + 1) * (gb + 1) * t ** gb / Tb ** (gb + 1)
    quad = np.sum((f[1:] + f[:-1]) / 2 * np.diff(t))
    assert abs(phema.profile_inner(Ta, sa, Tb, sb) / quad - 1) < 1e-6


def test_tracker_is_the_profile_integral_of_piecewise_constant_weights():
    # theta_j on ((j-1)D, jD] -> EMA at K steps = sum_j theta_j (j^(g+1) - (j-1)^(g+1)) / K^(g+1) (integral of p theta).
    net = torch.nn.Linear(1, 1, bias=False)
    tracker = phema.PowerFunctionEMA(net, [0.05, 0.1])
    K, D = 40, 16
    theta = np.random.default_rng(0).standard_normal(K).cumsum()
    for j in range(1, K + 1):
        net.weight.data.fill_(theta[j - 1])
        tracker.update(net, j * D, D)
    for std, ema in zip(tracker.stds, tracker.emas):
        g = phema.std_to_exp(std)
        j = np.arange(1, K + 1, dtype=np.float64)
        expected = np.sum(theta * (j ** (g + 1) - (j - 1) ** (g + 1))) / K ** (g + 1)
        assert abs(ema['weight'].item() - expected) < 1e-5


def test_reconstruction_closed_forms():
    Ts = [k * 1000 for k in range(1, 9)]
    in_T, in_std = [T for T in Ts for _ in (0, 1)], [s for _ in Ts for s in (0.05, 0.1)]
    # A tracked profile is reconstructed by itself alone.
    X = phema.solve_coefficients(in_T, in_std, [5000, 8000], [0.1, 0.05])
    np.testing.assert_allclose(X[:, 0], np.eye(16)[9], atol=1e-6)
    np.testing.assert_allclose(X[:, 1], np.eye(16)[14], atol=1e-6)
    # Weights moving linearly, theta(t) = t: a profile (g, T) holds T (g+1)/(g+2); targets between the tracked stds
    # come out within 0.5% (the least-squares fit of the profile, not an identity).
    value = lambda T, std: T * (phema.std_to_exp(std) + 1) / (phema.std_to_exp(std) + 2)
    stored = np.array([value(T, s) for T, s in zip(in_T, in_std)])
    for T, std in [(8000, 0.075), (6000, 0.075), (8000, 0.12), (5500, 0.05)]:
        X = phema.solve_coefficients(in_T, in_std, [T], [std])[:, 0]
        assert abs(X.sum() - 1) < 1e-12  # constants exactly
        assert abs(X @ stored / value(T, std) - 1) < 5e-3


def phema_run(run_dir, data_path, total_kimg, **kwargs):
    """A tiny EDM run, 1000 images a step and a tick (snapshot names count kimg), with two tracked profiles."""
    return run_loop(run_dir, data_path, total_kimg, kimg_per_tick=1, batch_size=1000, phema_stds=[0.05, 0.1], **kwargs)


def test_phema_snapshots_resume_and_reconstruction(data, tmp_path, monkeypatch):
    phema_run(tmp_path / 'full', data / 'cond.zip', total_kimg=2)
    names = sorted(os.listdir(tmp_path / 'full'))
    for kimg in [1, 2]:
        assert {f'network-snapshot-{kimg:06d}-0.050.pkl', f'network-snapshot-{kimg:06d}-0.100.pkl'} <= set(names)
    full = torch.load(loop_module.find_latest_state(str(tmp_path / 'full')), weights_only=True)['phema']

    # Exact resume covers the profiles: stopped after step 1 (its state written), resumed to the end.
    from training.teacher import EDM
    orig_step, calls = EDM.step, []
    def step_then_signal(self, rounds, cur_nimg):
        orig_step(self, rounds, cur_nimg)
        calls.append(cur_nimg)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(EDM, 'step', step_then_signal)
    assert phema_run(tmp_path / 'cut', data / 'cond.zip', total_kimg=2) is False
    monkeypatch.setattr(EDM, 'step', orig_step)
    phema_run(tmp_path / 'cut', data / 'cond.zip', total_kimg=2, resume_state=str(tmp_path / 'cut'))
    cut = torch.load(loop_module.find_latest_state(str(tmp_path / 'cut')), weights_only=True)['phema']
    assert cut['stds'] == full['stds'] == [0.05, 0.1]
    for a, b in zip(full['emas'], cut['emas']):
        assert all(torch.equal(a[k], b[k]) for k in a)

    # Reconstructing a tracked profile gives it back; another length is written too, with the snapshot's layout.
    result = CliRunner().invoke(reconstruct_phema.main, ['--indir', str(tmp_path / 'full'), '--outdir', str(tmp_path / 'out'),
                                                         '--outstd', '0.100,0.070', '--outkimg', '2'])
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'full' / 'network-snapshot-000002-0.100.pkl', 'rb') as f:
        tracked = persistence.load(f)
    with open(tmp_path / 'out' / 'phema-000002-0.100.pkl', 'rb') as f:
        rebuilt = persistence.load(f)
    assert rebuilt['phema'] == dict(std=0.1, nimg=2000) and tracked['phema'] == dict(std=0.1, nimg=2000)
    for (name, a), b in zip(tracked['ema'].state_dict().items(), rebuilt['ema'].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert (tmp_path / 'out' / 'phema-000002-0.070.pkl').exists()

    # Resuming a profile-tracking state with other stds, or without any, is a one-line error.
    with pytest.raises(Exception, match=r'tracks post-hoc EMA stds \[0.05, 0.1\], this run \[0.05\]: pass --phema=0.050,0.100'):
        run_loop(tmp_path / 'full', data / 'cond.zip', 3, kimg_per_tick=1, batch_size=1000, phema_stds=[0.05],
                 resume_state=str(tmp_path / 'full'))
    plain = tmp_path / 'plain'
    run_loop(plain, data / 'cond.zip', total_kimg=0.016)
    with pytest.raises(Exception, match='has no post-hoc EMA profiles \\(written without --phema\\)'):
        run_loop(plain, data / 'cond.zip', 0.032, phema_stds=[0.05], resume_state=str(plain))


def test_cli_errors(tmp_path):
    for value, message in [('0.05,abc', 'is not a list of numbers'), ('0.3', 'out of range'), ('0.05,0.0501', 'repeats a std')]:
        result = CliRunner().invoke(train.main, ['--data', 'x.zip', f'--phema={value}', '-n'])
        assert result.exit_code == 2 and message in result.output
    os.makedirs(tmp_path / 'empty')
    result = CliRunner().invoke(reconstruct_phema.main, ['--indir', str(tmp_path / 'empty'), '--outdir', str(tmp_path / 'o'), '--outstd', '0.1'])
    assert result.exit_code == 1 and 'has no network-snapshot-KIMG-STD.pkl files: train with --phema' in result.output
    assert not (tmp_path / 'o').exists()
