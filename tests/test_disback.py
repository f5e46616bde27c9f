"""DisBack: the recorded path and backtracking on a closed-form problem, target switching, resume, train.py."""

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import train
from test_dmd import GaussianDenoiser
from torch_utils import misc, persistence
from training import training_loop as loop_module
from training.batching import Round, StepRandom
from training.distill.disback import DisBack, node_path, record_updates, select, thin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
from sync_counter import SyncCounter  # noqa: E402 (the host-sync counter of the GPU check)

MU = torch.tensor([0.3, -0.2, 0.1, 0.5]).reshape(1, 2, 2)  # data N(MU, 0.3^2 I)
T_DATA = 0.3


def gaussian_disback(**kwargs):
    return DisBack(GaussianDenoiser(MU, T_DATA), 'cpu', batch_size=64, sigma_init=0.5, lr=1e-2, fake_steps=3,
                   ema_halflife_kimg=None, max_grad_norm=1e3, **kwargs)


def one_step(method, step, seed=0, batch_size=64):
    method.step([Round(None, None, StepRandom(seed, step, batch_size, 'cpu'), 0, batch_size)], step * batch_size)


def w2(mean_a, std_a, mean_b, std_b):
    """Wasserstein-2 distance between N(mean_a, std_a^2 I) and N(mean_b, std_b^2 I)."""
    return float(((mean_a - mean_b).square().sum() + mean_a.numel() * (std_a - std_b) ** 2).sqrt().detach())


def loaded(path):
    """A Gaussian denoiser holding a path snapshot, loaded strictly."""
    net = GaussianDenoiser(torch.zeros_like(MU), 1.0)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return net

def test_lr_warm_up_restarts_with_stage_two(tmp_path):
    """lr_rampup_kimg warms up stage 1's auxiliary score (at a tenth of the fake score's lr by default), then both
    networks again from the start of stage 2 (whose fake-score optimizer starts afresh)."""
    db = gaussian_disback(run_dir=str(tmp_path), path_nodes=2, path_steps=2, lr_rampup_kimg=0.128, fake_lr=2e-2)
    lrs = []
    for step in range(5):
        one_step(db, step)
        lrs.append((db.opt_G.optimizer.param_groups[0]['lr'], db.opt_fake.optimizer.param_groups[0]['lr']))
    assert lrs == pytest.approx([(1e-2, 0), (1e-2, 1e-3), (0, 0), (0, 1e-2), (0, 2e-2)])

# ----------------------------------------------------------------------------
# The closed-form problem: Gaussian data, exact teacher, Gaussian fake score, affine generator.

def test_path_is_monotone_and_backtracking_converges_to_data(tmp_path):
    """Stage 1 records s'_0 = teacher ... s'_N ~ p_G0 moving monotonically (W2 distance) away from the data and
    towards G0's distribution; stage 2 switches the target exactly at generator steps K2, 2 K2, (N-1) K2 (each
    switch changes its weights to the next snapshot, the last to the teacher itself) and converges to the data."""
    N, K1, K2 = 4, 400, 50
    db = gaussian_disback(run_dir=str(tmp_path), path_nodes=N, path_steps=K1, switch_every=K2, fake_lr=1e-2,
                          stage1_lr=1e-2)
    with torch.no_grad():  # G0 away from the data: mean shifted, spread collapsed
        db.G.mean.add_(0.5)
        db.G.log_std.add_(-1.0)
    # G(z) = m + a (s z - m) with a = t^2 / (t^2 + s^2): G0 ~ N((1 - a) m, (a s)^2 I) exactly.
    t2, s = (2 * db.G.log_std).exp().detach(), db.sigma_init
    a = t2 / (t2 + s ** 2)
    g0_mean, g0_std = (1 - a) * db.G.mean.detach(), a * s
    g0 = misc.checksum(db.G)
    for step in range(K1):
        one_step(db, step)
    assert db.stage == 2 and misc.checksum(db.G) == g0  # stage 1 leaves G0 alone
    assert sorted(os.listdir(tmp_path)) == [f'path-{i:03d}.pt' for i in range(N + 1)] + ['path.json']
    path = [loaded(node_path(tmp_path, i)) for i in range(N + 1)]
    assert misc.checksum(path[0]) == misc.checksum(db.real) and misc.checksum(path[N]) == misc.checksum(db.fake)
    to_g0 = [w2(p.mean, p.log_std.exp(), g0_mean, g0_std) for p in path]
    to_data = [w2(p.mean, p.log_std.exp(), MU, T_DATA) for p in path]
    assert all(x > y for x, y in zip(to_g0, to_g0[1:])), to_g0
    assert all(x < y for x, y in zip(to_data, to_data[1:])), to_data
    assert to_g0[N] < 0.03 * to_g0[0], to_g0

    # Stage 2: watch the target's weights after every step.
    db.fake_lr = 2e-2
    seen = [(0, misc.checksum(db.target()))]
    for step in range(K1, K1 + 2400):
        one_step(db, step, seed=1)
        if misc.checksum(db.target()) != seen[-1][1]:
            seen.append((db.num_g_steps, misc.checksum(db.target())))
    assert db.switches == [K2, 2 * K2, 3 * K2] and db.node == 0
    assert [g for g, _ in seen] == [0, K2, 2 * K2, 3 * K2]
    assert [c for _, c in seen] == [misc.checksum(path[i]) for i in (3, 2, 1, 0)]
    assert db.target() is db.real

    db.lr, db.fake_lr = 2e-3, 4e-3  # a second, slower phase removes most of the stochastic jitter (as for DMD)
    for step in range(K1 + 2400, K1 + 4000):
        one_step(db, step, seed=2)
    z = torch.randn([20000, 1, 2, 2], generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        x = db.generate(db.G, z, None)
    assert (x.mean(0) - MU).abs().max() < 0.03, x.mean(0)
    assert abs(x.std(0).mean() - T_DATA) < 0.025, x.std(0).mean()  # approached from below, slowly (as in DMD)


def write_path(path_dir, nodes):
    """A recorded path of Gaussian denoisers: s'_0 = the teacher of gaussian_disback(), then shifted means."""
    os.makedirs(path_dir, exist_ok=True)
    for i in range(nodes + 1):
        net = GaussianDenoiser(MU + 0.1 * i, T_DATA / (1 + i))
        torch.save(net.state_dict(), node_path(path_dir, i))


def test_recorded_path_and_convergence_rule(tmp_path):
    """With --path: s_phi <- s'_N, target s'_{N-1}. The 'converged' rule switches after a K2-step window whose mean
    L_DM fell by less than switch_tol relative to the window before, and never in a node's first window."""
    write_path(tmp_path, 3)
    db = gaussian_disback(path=str(tmp_path), switch_every=2, switch_rule='converged', switch_tol=0.05)
    assert db.stage == 2 and db.num_nodes == 3 and db.node == 2
    assert misc.checksum(db.fake) == misc.checksum(loaded(node_path(tmp_path, 3)))
    assert misc.checksum(db.target()) == misc.checksum(loaded(node_path(tmp_path, 2)))
    for loss in [4, 4, 3, 3, 2.9, 2.9,    # windows 4, 3 (fell 25%), 2.9 (fell 3%): switch to s'_1
                 5, 5, 4, 4, 4, 4]:       # windows 5, 4 (fell 20%), 4 (fell 0%): switch to the teacher
        db._dm_sum = torch.tensor(loss * db.batch_size)
        db.num_g_steps += 1
        db._after_generator_update()
    assert db.switches == [6, 12] and db.node == 0 and db.target() is db.real


def test_bad_recorded_paths(tmp_path):
    write_path(tmp_path / 'gap', 2)
    os.remove(node_path(tmp_path / 'gap', 1))
    with pytest.raises(ValueError, match='none missing'):
        gaussian_disback(path=str(tmp_path / 'gap'))
    write_path(tmp_path / 'other', 2)
    torch.save(GaussianDenoiser(MU, 0.5).state_dict(), node_path(tmp_path / 'other', 0))
    with pytest.raises(ValueError, match='is not this teacher'):
        gaussian_disback(path=str(tmp_path / 'other'))
    write_path(tmp_path / 'keys', 2)
    state = GaussianDenoiser(MU, T_DATA).state_dict()
    torch.save(dict(mu=state['mean'], log_std=state['log_std']), node_path(tmp_path / 'keys', 1))
    with pytest.raises(RuntimeError, match='Missing key'):  # strict: a load matching no keys is an error
        gaussian_disback(path=str(tmp_path / 'keys'))
    with pytest.raises(ValueError, match='run directory'):
        gaussian_disback(path_steps=10)
    with pytest.raises(ValueError, match='path intervals'):
        gaussian_disback(run_dir=str(tmp_path), path_steps=3, path_nodes=4)

# ----------------------------------------------------------------------------
# Stage-1 controls: the path table, node placement, the plateau stop, a resume that replays the end of stage 1.

def shifted_g0(db):
    """G0 away from the data (mean shifted, spread collapsed), and the probe drawn again from it."""
    with torch.no_grad():
        db.G.mean.add_(0.5)
        db.G.log_std.add_(-1.0)
    db.probe = db._make_probe()
    db.probe_teacher = db._probe_outputs(db.real)
    return db


def run_stage1(db, seed=0):
    step = 0
    while db.stage == 1:
        one_step(db, step, seed)
        step += 1
    return step


def path_files(nodes):
    return [f'path-{i:03d}.pt' for i in range(nodes + 1)] + ['path.json']


@pytest.mark.parametrize('offsets, place, warning', [
    ([0, 0.4, 0.7, 1.0], 'even', None),
    ([0, 0.6, 0.8, 1.0], 'even', "Warning: the recorded path is a jump, not a trajectory: its first interval covers "
                                 "60% of the distance from the teacher to s'_N; use --path-place=distance or a lower "
                                 "--stage1-lr"),
    ([0, 1.2, 0.8, 1.0], 'distance', "Warning: the recorded path is a jump, not a trajectory: its first interval "
                                     "covers 120% of the distance from the teacher to s'_N; lower --stage1-lr"),
])
def test_path_table_of_gaussian_nodes(tmp_path, capsys, offsets, place, warning):
    """Nodes N(MU + o_i, T^2): D_i - D_j = s^2 / (T^2 + s^2) (o_i - o_j) at every point, so every distance of the
    table is closed form: |o_i - o_j| c_s per level and |o_i - o_j| sqrt(mean_s c_s^2) over the probe's levels (the
    midpoints of 4 equal parts of the distribution-matching grid indices [20, 980])."""
    N = len(offsets) - 1
    db = gaussian_disback(run_dir=str(tmp_path), path_nodes=N, path_steps=N, path_place=place)
    for i, o in enumerate(offsets):
        torch.save(GaussianDenoiser(MU + o, T_DATA).state_dict(), node_path(tmp_path, i))
    db.fake.load_state_dict(torch.load(node_path(tmp_path, N), weights_only=True))
    db._write_table([0, 5, 9, 12], 12)
    table = json.loads((tmp_path / 'path.json').read_text())
    sigma = db.sigma_grid[[140, 380, 620, 860]].double()
    assert table['sigmas'] == pytest.approx(sigma.tolist())
    c = sigma ** 2 / (T_DATA ** 2 + sigma ** 2)
    total = float(c.square().mean().sqrt())
    for i, node in enumerate(table['nodes']):
        assert node['node'] == i and node['update'] == [0, 5, 9, 12][i]
        assert node['to_teacher_per_sigma'] == pytest.approx((offsets[i] * c).tolist(), rel=1e-5, abs=1e-7)
        assert node['to_teacher'] == pytest.approx(offsets[i] * total, rel=1e-5, abs=1e-7)
        if i > 0:
            assert node['to_prev'] == pytest.approx(abs(offsets[i] - offsets[i - 1]) * total, rel=1e-5)
        if i < N:
            assert node['to_next'] == pytest.approx(abs(offsets[i + 1] - offsets[i]) * total, rel=1e-5)
    assert (table['nodes'][0]['to_prev'], table['nodes'][N]['to_next']) == (None, None)
    assert table['length'] == pytest.approx(sum(abs(b - a) for a, b in zip(offsets, offsets[1:])) * total, rel=1e-5)
    assert table['first_interval_share'] == pytest.approx(offsets[1], rel=1e-5)
    assert table['warning'] == warning
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ['node', 'update', 'to', 'teacher', 'to', 'previous', 'to', 'next']
    assert out[2 + N].split()[:3] == [str(N), '12', f'{offsets[N] * total:.4f}']
    assert [line for line in out if line.startswith('Warning')] == ([warning] if warning else [])


def test_placement_rules():
    """Known updates for a fixed K1; among candidates, the nearest to i/N of the way in time order; thinning drops the
    candidate whose neighbours are closest, never the newest."""
    assert record_updates('even', 4, 400) == [0, 100, 200, 300, 400]
    assert record_updates('geometric', 4, 16) == [0, 2, 4, 8, 16]
    assert record_updates('geometric', 4, 4) == [0, 1, 2, 3, 4]  # strictly increasing, leaving one update per node
    assert select([0, 1, 2, 3, 4, 5, 6, 7, 8], 4) == [1, 3, 5, 7]
    assert select([0, 9, 9.5, 10], 3) == [0, 1, 2]  # a jump: every candidate is taken, in time order
    assert select([0, 1, 3, 4], 2) == [0, 2]  # a tie goes to the earlier candidate
    assert thin([0, 1, 1.1, 2, 4]) == 1
    assert thin([float('-inf'), 0.0, 0.7, 1.4, 1.5]) == 2  # geometric: the teacher at -inf is never a close neighbour


def test_distance_placement_spreads_what_even_placement_bunches(tmp_path):
    """At a high stage-1 lr s' covers most of its distance from the teacher in its first updates: evenly spaced
    updates put s'_1 ... s'_3 at the far end (the table warns); placement by distance puts s'_i near i/N of s'_N's
    distance, at checks of the probe curve. Only the path and its table are left in the run directory."""
    tables = {}
    for place in ['even', 'distance']:
        os.makedirs(tmp_path / place)
        db = shifted_g0(gaussian_disback(run_dir=str(tmp_path / place), path_nodes=4, path_steps=400, fake_lr=1e-2,
                                         stage1_lr=1e-2, path_place=place, stage1_window=20))
        assert run_stage1(db) == 400
        assert sorted(os.listdir(tmp_path / place)) == path_files(4)
        tables[place] = json.loads((tmp_path / place / 'path.json').read_text())
    even, dist = tables['even'], tables['distance']
    assert [n['update'] for n in even['nodes']] == [0, 100, 200, 300, 400]
    assert even['nodes'][1]['to_teacher'] > 0.9 * even['nodes'][4]['to_teacher'] and even['warning'] is not None
    final = dist['nodes'][4]['to_teacher']
    checks = {k: d for k, _loss, d in dist['curve']}
    for i, node in enumerate(dist['nodes'][1:], 1):
        assert node['to_teacher'] == pytest.approx(checks[node['update']], rel=1e-6)
        assert abs(node['to_teacher'] / final - i / 4) < 0.1, (i, node)
    assert dist['first_interval_share'] < 0.25 + 0.1 and dist['warning'] is None  # 1/4 within the nodes' tolerance


def test_plateau_stop(tmp_path):
    """'plateau': stage 1 ends at the first window end at which the probe loss fell by less than stage1_tol
    relative to the previous window end, or at K1; s'_N is s' then."""
    W, tol = 10, 0.02
    os.makedirs(tmp_path / 'a')
    os.makedirs(tmp_path / 'b')
    db = shifted_g0(gaussian_disback(run_dir=str(tmp_path / 'a'), path_nodes=4, path_steps=2000, stage1_lr=2e-3,
                                     stage1_stop='plateau', stage1_window=W, stage1_tol=tol))
    steps = run_stage1(db)
    table = json.loads((tmp_path / 'a' / 'path.json').read_text())
    ends = [loss for k, loss, _d in table['curve'] if k % W == 0]
    fell = [b < (1 - tol) * a for a, b in zip(ends, ends[1:])]
    assert len(ends) >= 4 and fell == [True] * (len(ends) - 2) + [False], ends
    assert steps == table['stage1_updates'] == table['nodes'][4]['update'] == W * len(ends)
    assert misc.checksum(db.fake) == misc.checksum(loaded(node_path(tmp_path / 'a', 4)))
    db = shifted_g0(gaussian_disback(run_dir=str(tmp_path / 'b'), path_nodes=4, path_steps=steps - W // 2,
                                     stage1_lr=2e-3, stage1_stop='plateau', stage1_window=W, stage1_tol=tol))
    assert run_stage1(db) == steps - W // 2  # the cap K1 comes first


def test_resume_replays_the_end_of_stage_one(tmp_path):
    """A state saved in stage 1 whose run went on into stage 2 before it stopped: the resumed run replays the end of
    stage 1, where its chosen candidates are already path nodes and the others deleted, and writes the same path."""
    kwargs = dict(run_dir=str(tmp_path), path_nodes=3, path_steps=40, stage1_lr=1e-2, path_place='distance',
                  stage1_window=8)
    db = shifted_g0(gaussian_disback(**kwargs))
    for step in range(20):
        one_step(db, step)
    state = copy.deepcopy(db.state_dict())
    for step in range(20, 42):
        one_step(db, step)
    assert db.stage == 2 and sorted(os.listdir(tmp_path)) == path_files(3)
    written = {n: (tmp_path / n).read_bytes() for n in path_files(3)}
    resumed = shifted_g0(gaussian_disback(**kwargs))
    resumed.load_state_dict(state)
    for step in range(20, 42):
        one_step(resumed, step)
    assert sorted(os.listdir(tmp_path)) == path_files(3)
    for n in path_files(3)[:-1]:
        a, b = (torch.load(x, weights_only=True) for x in (io_bytes(written[n]), tmp_path / n))
        assert all(torch.equal(a[k], b[k]) for k in a), n
    assert json.loads(written['path.json']) == json.loads((tmp_path / 'path.json').read_text())
    for key in ['G', 'fake']:
        assert all(torch.equal(v, resumed.state_dict()[key][k]) for k, v in db.state_dict()[key].items())


def io_bytes(data):
    import io
    return io.BytesIO(data)


def test_stage1_reads_the_device_only_at_window_ends(tmp_path):
    """Stage 1 measures s' on the probe at every check (updates 1-3, 4, 8, 16, window ends, K1) but reads the
    measurements only at window ends and at its end."""
    db = gaussian_disback(run_dir=str(tmp_path), path_nodes=3, path_steps=30, stage1_window=8)
    reads = []
    for step in range(30):
        with SyncCounter('cpu') as counter:
            one_step(db, step)
        if counter.calls:
            reads.append(step + 1)
    assert reads == [8, 16, 24, 30] and db.stage == 2
    assert [k for k, _loss, _d in json.loads((tmp_path / 'path.json').read_text())['curve']] == \
        [1, 2, 3, 4, 8, 16, 24, 30]


def test_converged_rule_reads_the_device_only_at_window_ends(tmp_path):
    """--switch=converged keeps the window's L_DM sum on the device; it is read at the window's end only."""
    write_path(tmp_path, 3)
    db = gaussian_disback(path=str(tmp_path), switch_every=2, switch_rule='converged', switch_tol=0.5)
    reads, ends = [], []
    for step in range(40):
        prev, switches = db.window_prev, len(db.switches)
        with SyncCounter('cpu') as counter:
            one_step(db, step)
        reads.append(counter.calls)
        ends.append(db.window_prev != prev or len(db.switches) > switches)
    assert sum(ends) >= 4 and db.switches
    assert [bool(r) for r in reads] == ends and all(r == ['__float__'] for r in reads if r)

# ----------------------------------------------------------------------------
# Through train.py with a tiny EDM teacher: one run records and backtracks; resume is exact in both stages.

# Batch 8: stage 1 is 3 steps (N = 3), then 6 generator steps switching every 2: switches at 2 and 4.
ARGS = ['--method=disback', '--batch=8', '--tick=1', '--seed=1', '--device=cpu', '--lr=1e-4', '--nosubdir',
        '--switch-every=2', '--ema=0.5']  # an EMA (not DMD's default) so resume checks it too
STAGE1 = ['--stage1-kimg=0.024', '--path-nodes=3']


def run(outdir, teacher, duration_steps, *args, resume=False):
    args = args or STAGE1
    where = f'--resume={outdir}' if resume else f'--outdir={outdir}'
    r = CliRunner().invoke(train.main, [where, f'--teacher={teacher}', f'--duration={(duration_steps * 8 - 0.5) * 1e-6}', *ARGS,
                                        *args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return torch.load(loop_module.find_latest_state(str(outdir)), weights_only=True)['method']


def path_checksums(teacher_pkl, run_dir, N):
    """Checksums of s'_0 ... s'_N loaded strictly into the teacher's network (plain state dicts), and the teacher."""
    with open(teacher_pkl, 'rb') as f:
        teacher = persistence.load(f)['ema']
    sums = []
    for i in range(N + 1):
        net = copy.deepcopy(teacher)
        net.load_state_dict(torch.load(node_path(run_dir, i), weights_only=True), strict=True)
        sums.append(misc.checksum(net))
    return sums, teacher


def test_cli_records_path_backtracks_and_resumes_exactly(teacher_pkl, tmp_path):
    full = run(tmp_path / 'full', teacher_pkl, 9)
    assert full['stage'] == 2 and full['stage1_done'] == 3 and full['num_g_steps'] == 6
    assert full['switches'] == [2, 4] and full['node'] == 0
    # The path: N+1 plain state dicts that load strictly into the teacher's network, s'_0 = the teacher.
    sums, teacher = path_checksums(teacher_pkl, tmp_path / 'full', 3)
    assert sums[0] == misc.checksum(teacher) and len(set(sums)) == 4

    # Stop in stage 1 (after 2 steps), resume into stage 2 on s'_1 (after 5 steps), resume to the end.
    part = run(tmp_path / 'part', teacher_pkl, 2)
    assert part['stage'] == 1 and part['stage1_done'] == 2
    part = run(tmp_path / 'part', teacher_pkl, 5, resume=True)
    assert part['stage'] == 2 and part['node'] == 1 and part['node_g_steps'] == 0 and part['switches'] == [2]
    part = run(tmp_path / 'part', teacher_pkl, 9, resume=True)
    for key in ['stage', 'stage1_done', 'node', 'node_g_steps', 'switches', 'num_steps', 'num_g_steps']:
        assert part[key] == full[key], key
    for net in ['G', 'fake', 'G_ema']:
        for k in full[net]:
            assert torch.equal(full[net][k], part[net][k]), (net, k)
    for i in range(4):
        a, b = (torch.load(node_path(tmp_path / d, i), weights_only=True) for d in ('full', 'part'))
        assert all(torch.equal(a[k], b[k]) for k in a)

    # Stage 2 alone from the recorded path: fake starts at s'_3, same switching.
    alone = run(tmp_path / 'alone', teacher_pkl, 6, f'--path={tmp_path / "full"}')
    assert alone['stage'] == 2 and alone['stage1_done'] == 0 and alone['switches'] == [2, 4]
    assert not any(n.startswith('path-') for n in os.listdir(tmp_path / 'alone'))


@pytest.mark.parametrize('args, message', [
    ([], 'needs --teacher'),
    (['--teacher={teacher}', '--path={empty}'], 'path-000.pt ... path-N.pt'),
    (['--teacher={teacher}', '--path={missing}'], 'not a directory'),
    (['--teacher={teacher}', '--path={empty}', '--path-nodes=2'], 'no stage 1): drop --path-nodes'),
    (['--teacher={teacher}', '--path={empty}', '--stage1-lr=1e-4', '--path-place=even'], 'drop --stage1-lr, --path-place'),
    (['--teacher={teacher}', '--stage1-kimg=0.01', '--batch=8'], 'fewer than the 4 path intervals'),
])
def test_cli_bad_input_creates_nothing(teacher_pkl, tmp_path, args, message):
    os.makedirs(tmp_path / 'empty')
    args = [a.format(teacher=teacher_pkl, empty=tmp_path / 'empty', missing=tmp_path / 'missing') for a in args]
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--method=disback', '--device=cpu', *args])
    assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / 'runs').exists()

# ----------------------------------------------------------------------------
# The README recipes (EDM's released 64x64 teachers; DMD2's two-time-scale settings; our DisBack schedule).

EDM = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained'
RECIPES = {
    'imagenet64': [f'--teacher={EDM}/edm-imagenet-64x64-cond-adm.pkl', '--batch=280', '--lr=2e-6', '--fake-steps=5',
                   '--ema=0', '--duration=56', '--stage1-kimg=560', '--path-nodes=4', '--switch-every=1000'],
    'ffhq64': [f'--teacher={EDM}/edm-ffhq-64x64-uncond-vp.pkl', '--batch=256', '--lr=5e-6', '--fake-steps=5',
               '--ema=0', '--duration=26', '--stage1-kimg=512', '--path-nodes=4', '--switch-every=1000'],
    'afhqv2-64': [f'--teacher={EDM}/edm-afhqv2-64x64-uncond-vp.pkl', '--batch=256', '--lr=5e-6', '--fake-steps=5',
                  '--ema=0', '--duration=26', '--stage1-kimg=512', '--path-nodes=4', '--switch-every=1000'],
}


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_recipe_dry_run(name, tmp_path):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', '--method=disback', '--dry-run', *RECIPES[name]])
    assert r.exit_code == 0, r.output
    c = json.loads(r.output.split('Training options:')[1].split('Output directory:')[0])
    kw = c['method_kwargs']
    batch = c['batch_size']
    assert kw['class_name'] == 'training.distill.disback.DisBack' and kw['switch_rule'] == 'every'
    assert kw['path_nodes'] == 4 and kw['switch_every'] == 1000 and kw['fake_steps'] == 5
    assert kw['path_steps'] == 2000 and kw['path_steps'] * batch < c['total_kimg'] * 1000
    assert kw['ema_halflife_kimg'] is None and kw['fake_lr'] is None and kw['sigma_init'] == 80
    assert kw['stage1_lr'] == pytest.approx(kw['lr'] / 10) and kw['path_place'] == 'distance'
    assert (kw['stage1_stop'], kw['stage1_window'], kw['stage1_tol']) == ('fixed', 50, 0.01)
    assert c['run_dir'].endswith(f'disback-{c["teacher"].split("/")[-1][:-4]}-path4-gpus1-batch{batch}-fp32')
    assert not os.listdir(tmp_path)

@pytest.mark.parametrize('args, stage1_lr', [([], 5e-6), (['--fake-lr=1e-3'], 1e-4), (['--stage1-lr=3e-5'], 3e-5)])
def test_stage1_lr_is_a_tenth_of_the_fake_score_lr_unless_given(tmp_path, args, stage1_lr):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', '--method=disback', '--dry-run', *RECIPES['ffhq64'][:1],
                                        '--lr=5e-5', *args])
    assert r.exit_code == 0, r.output
    c = json.loads(r.output.split('Training options:')[1].split('Output directory:')[0])
    assert c['method_kwargs']['stage1_lr'] == pytest.approx(stage1_lr)

# ----------------------------------------------------------------------------
# Two processes (gloo): one run directory, one download, stage 2 reads the path on every rank.

LAUNCHER = r'''
import os, sys, time
import train
from training import training_loop

rank = int(os.environ['RANK'])
marker = sys.argv[1]


def wait_for(condition, what):
    deadline = time.time() + 60
    while not condition():
        if time.time() > deadline:
            raise SystemExit(f'rank {rank}: gave up waiting for {what}')
        time.sleep(0.05)


# Rank 1 looks for the next run id only after rank 0 has created its directory (a slow rank, reproduced exactly).
next_run_dir = train.next_run_dir
def late_next_run_dir(outdir, desc):
    if rank == 1:
        wait_for(lambda: os.path.isdir(outdir) and os.listdir(outdir), "rank 0's run directory")
    return next_run_dir(outdir, desc)
train.next_run_dir = late_next_run_dir

# Rank 0 writes the training state only once rank 1 has moved on: no rank may wait in a collective for the write.
save_state, write_state = training_loop._save_state, training_loop._write_state
def noted_save_state(*args):
    path = save_state(*args)
    if rank == 1:
        open(marker, 'w').close()
    return path
def late_write_state(state, path):
    wait_for(lambda: os.path.exists(marker), 'rank 1 to leave _save_state')
    write_state(state, path)
training_loop._save_state, training_loop._write_state = noted_save_state, late_write_state

train.main(sys.argv[2:])
'''


class CountingServer:
    """A local HTTP server for one file that counts GET requests and answers each after a delay, so that
    concurrent downloads overlap."""

    def __init__(self, path, delay=2.0):
        import http.server
        import threading
        data, self.gets = open(path, 'rb').read(), 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.gets += 1
                time.sleep(delay)
                self.send_response(200)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/teacher.pkl'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_two_processes_share_run_directory_download_and_path(teacher_pkl, tmp_path):
    (tmp_path / 'launch.py').write_text(LAUNCHER)
    server = CountingServer(teacher_pkl)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT, DNNLIB_CACHE_DIR=str(tmp_path / 'cache'))
    args = [f'--outdir={tmp_path / "runs"}', f'--teacher={server.url}', f'--duration={(5 * 8 - 0.5) * 1e-6}',
            *[a for a in ARGS if a != '--nosubdir'], *STAGE1]
    try:
        proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                               str(tmp_path / 'launch.py'), str(tmp_path / 'marker'), *args],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = os.listdir(tmp_path / 'runs')  # rank 1 used rank 0's directory
    state = torch.load(loop_module.find_latest_state(str(tmp_path / 'runs' / run_dir)), weights_only=True)['method']
    assert state['stage'] == 2 and state['switches'] == [2]  # both ranks read path-002.pt and path-001.pt
    assert server.gets == 1  # rank 0 downloaded the teacher; rank 1 read the cached file

# ----------------------------------------------------------------------------
# --path-place=official: DisBack's released schedule (SYZhang0805/DisBack).

def official_options(tmp_path, method, *args):
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--method={method}', '--dry-run', '--path-place=official',
                                        *RECIPES['imagenet64'][:1], *args])
    return r, (json.loads(r.output.split('Training options:')[1].split('Output directory:')[0]) if r.exit_code == 0 else None)


def test_official_schedule(tmp_path):
    """Facts from the official scripts: the degradation script (experiments/sdxl/degradation_*.sh) runs main/
    degradation.py with `--guidance_lr 5e-7 --generator_lr 5e-7` (stage-1 lr = the generator's) and `--log_iters
    100` (a path snapshot every 100 stage-1 iterations, saved by `self.step % self.log_iters == 0`); main/train_sd.py
    `train()` loads the snapshot `ckpt_num -= 100` back `if index % self.args.interval == 0` with `--interval 1000`,
    where an iteration is one fake-score update (`--dfake_gen_update_ratio 5`: G every 5th), so 200 G updates."""
    r, c = official_options(tmp_path, 'disback', '--batch=280', '--lr=2e-6', '--fake-steps=5', '--stage1-kimg=560')
    assert r.exit_code == 0, r.output
    kw = c['method_kwargs']
    assert kw['path_steps'] == 2000 and kw['path_nodes'] == 20 and kw['path_place'] == 'even'
    assert record_updates('even', kw['path_nodes'], kw['path_steps']) == list(range(0, 2001, 100))
    assert kw['stage1_lr'] == kw['lr'] == 2e-6
    assert kw['switch_every'] * kw['fake_steps'] == 1000 and kw['switch_every'] == 200
    r, c = official_options(tmp_path, 'sid-disback', '--batch=256', '--stage1-kimg=25.6')  # SiD: one fake update per G
    assert r.exit_code == 0, r.output
    assert (c['method_kwargs']['path_nodes'], c['method_kwargs']['switch_every']) == (1, 1000)


@pytest.mark.parametrize('args, message', [
    (['--path-nodes=4'], 'drop --path-nodes'),
    (['--stage1-lr=1e-6', '--switch-every=10'], 'drop --stage1-lr, --switch-every'),
    (['--batch=256', '--stage1-kimg=30'], 'use --stage1-kimg=25.6 (100 updates)'),
])
def test_official_schedule_refusals(tmp_path, args, message):
    r, _ = official_options(tmp_path / 'runs', 'disback', *args)
    assert r.exit_code == 1 and message in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / 'runs').exists()
