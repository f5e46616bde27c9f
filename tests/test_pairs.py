"""make_pairs.py and training/pairs.py: pairs equal generate.py's float output, resume, checksums, torchrun, errors."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import make_pairs
from golden import fill_golden_weights
from training import networks, samplers
from training.pairs import PairSet

REPO = Path(__file__).resolve().parents[1]
ARGS = ['--seeds', '3-9', '--shard-size', '4', '--batch', '3', '--steps', '2', '--device', 'cpu']
BATCHES = [[3], [4, 5, 6], [7], [8, 9]]  # shards 0: 3, 1: 4..7, 2: 8..9, in batches of 3 within each shard
NAMES = [f'shard-{k:05d}.{ext}' for k in range(3) for ext in ('json', 'npy')]


def tiny_net(label_dim=4, seed=0):
    """An 8x8 SongUNet EDM network with random weights, so that outputs depend on every input."""
    net = networks.EDMPrecond(8, 3, label_dim=label_dim, model_type='SongUNet', model_channels=16, channel_mult=[1],
                              num_blocks=1, attn_resolutions=[], dropout=0)
    return fill_golden_weights(net, seed).eval().requires_grad_(False)


def write_pkl(path, net):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    return str(path)


def run_cli(*args):
    return CliRunner().invoke(make_pairs.main, [str(a) for a in args])


def snapshot(path):
    """{file name: (bytes, mtime_ns)} of a directory."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(path).iterdir())}


def sidecar(path, k):
    return json.loads((Path(path) / f'shard-{k:05d}.json').read_text())


@pytest.fixture(scope='module')
def made(tmp_path_factory):
    """A conditional teacher and its pairs for seeds 3..9 (3 shards), made once with the CLI."""
    root = tmp_path_factory.mktemp('pairs')
    net = tiny_net(seed=1)
    pkl = write_pkl(root / 'teacher.pkl', net)
    result = run_cli('--teacher', pkl, '--outdir', root / 'made', *ARGS)
    assert result.exit_code == 0, result.output
    return dict(net=net, pkl=pkl, dir=root / 'made')


def copy_of(made, tmp_path):
    return Path(shutil.copytree(made['dir'], tmp_path / 'pairs'))


def capture_generate(monkeypatch, net, batches, **kwargs):
    """generate.generate_batch on the batches, recording each sampler call's (latents, labels, float output)."""
    calls = []
    sample = samplers.sample
    def recording_sample(net, latents, class_labels, *args, **kw):
        out = sample(net, latents, class_labels, *args, **kw)
        calls.append((latents.clone(), class_labels.clone(), out.clone()))
        return out
    monkeypatch.setattr(samplers, 'sample', recording_sample)
    for seeds in batches:
        generate.generate_batch(net, seeds, 'cpu', num_steps=2, **kwargs)
    return [torch.cat(parts) for parts in zip(*calls)]

# ----------------------------------------------------------------------------
# Contents.

def test_pairs_equal_generate_float_output(made, monkeypatch):
    z_ref, c_ref, y_ref = capture_generate(monkeypatch, made['net'], BATCHES)
    y16 = y_ref.to(torch.float32).numpy().astype(np.float16)
    assert sorted(os.listdir(made['dir'])) == NAMES
    # The files: y rows, labels, checksums, settings.
    teacher_sha = hashlib.sha256(Path(made['pkl']).read_bytes()).hexdigest()
    for k, (lo, hi) in enumerate([(3, 3), (4, 7), (8, 9)]):
        npy = made['dir'] / f'shard-{k:05d}.npy'
        meta = sidecar(made['dir'], k)
        rows = slice(lo - 3, hi - 2)
        assert np.array_equal(np.load(npy), y16[rows]) and np.load(npy).dtype == np.float16
        assert meta == dict(format='edm-distill-pairs-1', seeds=[lo, hi], shape=[hi - lo + 1, 3, 8, 8],
                            labels=c_ref[rows].argmax(1).tolist(), sha256=hashlib.sha256(npy.read_bytes()).hexdigest(),
                            teacher=made['pkl'], teacher_sha256=teacher_sha, label_dim=4, shard_size=4,
                            sampler=dict(solver='heun', grid='edm', num_steps=2, sigma_min=0.002, sigma_max=80, rho=7),
                            rng_device='cpu', precision='fp32', latents_sha256=meta['latents_sha256'], **{'class': None})
    # The reader: z and labels regenerated bit-exactly, y as stored.
    z, y, labels = PairSet(made['dir']).get(range(7))
    assert torch.equal(z, z_ref) and torch.equal(labels, c_ref) and np.array_equal(y.numpy(), y16.astype(np.float32))
    assert y_ref.std() > 0.1 and len(set(c_ref.argmax(1).tolist())) > 1  # real samples, several classes


def test_fixed_class_pairs_equal_generate_with_class(made, tmp_path, monkeypatch):
    result = run_cli('--teacher', made['pkl'], '--outdir', tmp_path, '--class', 2, '--seeds', '5-6', '--shard-size', 4,
                     '--steps', 2, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    z_ref, c_ref, y_ref = capture_generate(monkeypatch, made['net'], [[5, 6]], class_idx=2)
    pairs = PairSet(tmp_path)
    z, y, labels = pairs.get([0, 1])
    assert pairs.class_idx == 2 and sidecar(tmp_path, 1)['labels'] == [2, 2]
    assert torch.equal(z, z_ref) and torch.equal(labels, torch.eye(4)[[2, 2]]) and torch.equal(c_ref, labels)
    assert np.array_equal(y.numpy(), y_ref.to(torch.float32).numpy().astype(np.float16).astype(np.float32))


def test_unconditional_teacher_has_no_labels(tmp_path):
    pkl = write_pkl(tmp_path / 'uncond.pkl', tiny_net(label_dim=0, seed=2))
    result = run_cli('--teacher', pkl, '--outdir', tmp_path / 'out', '--seeds', '0-1', '--steps', 2, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    pairs = PairSet(tmp_path / 'out')
    z, y, labels = pairs.get([1])
    g = torch.Generator().manual_seed(1)
    assert labels is None and pairs.label_dim == 0 and sidecar(tmp_path / 'out', 0)['labels'] is None
    assert torch.equal(z[0], torch.randn([3, 8, 8], generator=g))
    result = run_cli('--teacher', pkl, '--outdir', tmp_path / 'cls', '--seeds', '0-1', '--class', 0, '--device', 'cpu')
    assert result.exit_code == 1 and 'unconditional' in result.output and not (tmp_path / 'cls').exists()


def test_get_arbitrary_indices_across_shards(made):
    pairs = PairSet(made['dir'])
    assert (len(pairs), pairs.resolution, pairs.channels, pairs.label_dim) == (7, 8, 3, 4)
    assert pairs.seeds.tolist() == list(range(3, 10)) and pairs.sampler['num_steps'] == 2
    indices = [5, 0, 5, 3, 1, 6]
    z, y, labels = pairs.get(indices)
    assert z.dtype == y.dtype == labels.dtype == torch.float32 and z.shape == y.shape == (6, 3, 8, 8)
    files = {k: np.load(made['dir'] / f'shard-{k:05d}.npy') for k in range(3)}
    for row, i in enumerate(indices):
        seed = 3 + i
        g = torch.Generator().manual_seed(seed)  # latents first, then the label, from the seed's own stream
        assert torch.equal(z[row], torch.randn([3, 8, 8], generator=g))
        assert torch.equal(labels[row], torch.eye(4)[torch.randint(4, size=[], generator=g)])
        k = seed // 4
        assert np.array_equal(y[row].numpy(), files[k][seed - max(3, 4 * k)].astype(np.float32))
    assert [x.shape for x in pairs.get([])] == [(0, 3, 8, 8), (0, 3, 8, 8), (0, 4)]
    with pytest.raises(IndexError, match=r'got 0\.\.7, .* has 7 pairs \(0\.\.6\)'):
        pairs.get([0, 7])

# ----------------------------------------------------------------------------
# Resume and checksums.

def test_resume_redoes_only_missing_or_corrupt_shards(made, tmp_path):
    pairs_dir = copy_of(made, tmp_path)
    original = snapshot(pairs_dir)
    for p in pairs_dir.iterdir():
        os.utime(p, ns=(10 ** 18, 10 ** 18))
    npy = pairs_dir / 'shard-00000.npy'
    npy.write_bytes(npy.read_bytes()[:-1] + bytes([npy.read_bytes()[-1] ^ 1]))  # one flipped bit
    (pairs_dir / 'shard-00002.json').unlink()                                  # an interrupted shard
    with pytest.raises(ValueError) as e:
        PairSet(pairs_dir)
    assert str(e.value) == (f'Checksum mismatch in "{npy}" (corrupt or partly written); delete it and re-run '
                            f'make_pairs.py to regenerate it')
    assert len(PairSet(pairs_dir, verify=False)) == 5  # shard 2 (2 pairs) is incomplete, so not served

    result = run_cli('--teacher', made['pkl'], '--outdir', pairs_dir, *ARGS)
    assert result.exit_code == 0, result.output
    assert '1 of 3 shards complete' in result.output and 'making 2 with 1 process(es)' in result.output
    after = snapshot(pairs_dir)
    assert sorted(after) == NAMES
    for name, (data, mtime) in after.items():
        assert data == original[name][0]
        assert (mtime == 10 ** 18) == name.startswith('shard-00001')  # only shards 0 and 2 were written
    assert len(PairSet(pairs_dir)) == 7


def test_extending_the_range_redoes_only_the_partial_shard(made, tmp_path):
    pairs_dir = copy_of(made, tmp_path)
    for p in pairs_dir.iterdir():
        os.utime(p, ns=(10 ** 18, 10 ** 18))
    result = run_cli('--teacher', made['pkl'], '--outdir', pairs_dir, *ARGS[2:], '--seeds', '3-12')
    assert result.exit_code == 0, result.output
    assert '2 of 4 shards complete' in result.output
    after = snapshot(pairs_dir)
    assert [sidecar(pairs_dir, k)['seeds'] for k in range(4)] == [[3, 3], [4, 7], [8, 11], [12, 12]]
    assert [name for name, (_, mtime) in after.items() if mtime == 10 ** 18] == NAMES[:4]
    pairs = PairSet(pairs_dir)
    _, y, _ = pairs.get(range(7))
    assert len(pairs) == 10 and np.array_equal(y.numpy(), PairSet(made['dir']).get(range(7))[1].numpy())


def test_tampered_latents_or_labels_are_detected(made, tmp_path):
    pairs_dir = copy_of(made, tmp_path)
    path = pairs_dir / 'shard-00001.json'
    meta = json.loads(path.read_text())
    path.write_text(json.dumps(dict(meta, labels=meta['labels'][:2] + [(meta['labels'][2] + 1) % 4, meta['labels'][3]])))
    with pytest.raises(ValueError, match=r'Labels regenerated from the seeds differ .* in shard-00001.npy \(seed 6\)'):
        PairSet(pairs_dir)  # seed 6: the third row of shard 1, found on opening (get() never reads the device back)
    path.write_text(json.dumps(dict(meta, latents_sha256='0' * 64)))
    with pytest.raises(ValueError, match=r'^Seed 4 of shard-00001.npy regenerates different latents'):
        PairSet(pairs_dir)

# ----------------------------------------------------------------------------
# Errors.

def test_mixing_settings_in_one_directory_is_refused(made, tmp_path):
    pairs_dir = copy_of(made, tmp_path)
    before = snapshot(pairs_dir)
    other = write_pkl(tmp_path / 'other.pkl', tiny_net(seed=7))
    cases = [(['--teacher', other, *ARGS], 'different teacher_sha256'),
             (['--teacher', made['pkl'], *ARGS, '--steps', 3], 'different sampler num_steps (shard-00000.json: 2, this run: 3)'),
             (['--teacher', made['pkl'], *ARGS, '--solver', 'euler'], "different sampler solver (shard-00000.json: heun, this run: euler)"),
             (['--teacher', made['pkl'], *ARGS, '--shard-size', 5], 'different shard_size'),
             (['--teacher', made['pkl'], *ARGS, '--class', 1], 'different class (shard-00000.json: None, this run: 1)'),
             (['--teacher', made['pkl'], *ARGS, '--seeds', '10-13'], 'shard-00002 in')]
    for args, message in cases:
        result = run_cli(*args, '--outdir', pairs_dir)
        assert result.exit_code == 1 and message in result.output and result.output.count('\n') == 1, result.output
    assert 'holds seeds 8-9, outside this run\'s 10-11' in result.output
    assert snapshot(pairs_dir) == before


def test_stochastic_sampler_and_bad_seeds_are_refused(made, tmp_path):
    result = run_cli('--teacher', made['pkl'], '--outdir', tmp_path / 'out', *ARGS, '--S_churn', 1)
    assert result.exit_code == 1 and result.output == ('Error: Pairs need the deterministic sampler, but S_churn=1.0: '
                                                       'use --S_churn=0\n')
    net = tiny_net()
    net.sampling_spec = dict(S_churn=40)
    result = run_cli('--teacher', write_pkl(tmp_path / 'churn.pkl', net), '--outdir', tmp_path / 'out', *ARGS)
    assert result.exit_code == 1 and 'S_churn=40' in result.output
    result = run_cli('--teacher', made['pkl'], '--outdir', tmp_path / 'out', *ARGS, '--seeds', '0-3,5')
    assert result.exit_code == 2 and 'not one contiguous range' in result.output
    assert not (tmp_path / 'out').exists()


def test_missing_teacher_is_one_line_and_writes_nothing(tmp_path):
    result = run_cli('--teacher', tmp_path / 'nope.pkl', '--outdir', tmp_path / 'out', *ARGS)
    assert result.exit_code == 1 and result.output.count('\n') == 1, result.output
    assert result.output.startswith(f'Error: Cannot load teacher "{tmp_path / "nope.pkl"}"') and 'No such file' in result.output
    assert not (tmp_path / 'out').exists()


def test_reader_errors(made, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        PairSet(tmp_path)
    assert str(e.value) == (f'No pair shards in "{tmp_path}"; make them with `python make_pairs.py --teacher=PKL '
                            f'--seeds=0-99999 --outdir={tmp_path}`')
    pairs = PairSet(made['dir'])
    pairs.check_teacher(made['net'])
    with pytest.raises(ValueError, match=r'are 3x8x8 with label_dim 4, the teacher is 3x8x8 with label_dim 0'):
        pairs.check_teacher(tiny_net(label_dim=0))
    pairs_dir = copy_of(made, tmp_path)
    (pairs_dir / 'shard-00001.npy').unlink()
    with pytest.raises(FileNotFoundError, match='shard-00001.npy is missing next to its sidecar'):
        PairSet(pairs_dir)

# ----------------------------------------------------------------------------
# Processes.

def test_torchrun_two_processes_write_the_same_shards(made, tmp_path):
    args = ['make_pairs.py', '--teacher', made['pkl'], '--seeds', '0-9', '--shard-size', '3', '--batch', '2',
            '--steps', '2', '--device', 'cpu']
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, *args, '--outdir', str(tmp_path / 'one')], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args,
                          '--outdir', str(tmp_path / 'two')], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    assert 'making 4 with 2 process(es)' in two.stdout and two.stdout.count('Done.') == 1
    names = sorted(os.listdir(tmp_path / 'one'))
    assert names == [f'shard-{k:05d}.{ext}' for k in range(4) for ext in ('json', 'npy')]
    assert sorted(os.listdir(tmp_path / 'two')) == names
    for name in names:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes()


# Three ranks, one shard each. Rank 1 finishes first and must exit while rank 0 still works (no final barrier);
# rank 2 finishes last, after rank 0 has begun watching the directory, and rank 0 must wait for its shard.
UNEVEN_RANKS = r'''
import os, sys, time
import make_pairs
from torch_utils import distributed
from training import pairs

rank, tmp = int(os.environ['RANK']), sys.argv[1]
mark = lambda name: open(os.path.join(tmp, name), 'w').close()
def wait_for(name):
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(tmp, name)):
        if time.time() > deadline:
            raise SystemExit(f'rank {rank} gave up waiting for {name}')
        time.sleep(0.05)

make_shard, shards_to_make = pairs.make_shard, pairs.shards_to_make
def late_make_shard(net, outdir, k, *args, **kwargs):
    wait_for({0: 'rank1-exited', 1: 'start', 2: 'rank0-watches'}[rank])
    make_shard(net, outdir, k, *args, **kwargs)
def noted_shards_to_make(outdir, plan, config):
    if rank == 0 and len(plan) < 3:  # not the first scan (of the whole plan): rank 0 watches the others' shards
        mark('rank0-watches')
    return shards_to_make(outdir, plan, config)
pairs.make_shard, pairs.shards_to_make = late_make_shard, noted_shards_to_make
make_pairs.POLL_S = 0.1

def marks():
    if rank == 1:
        mark('rank1-exited')
    if rank == 0 and os.path.exists(os.path.join(sys.argv[-1], 'shard-00002.json')):
        mark('rank0-saw-shard-2')
exit_now = distributed.exit_now
def marked_exit_now(code):  # a finished rank leaves the group, then ends here (distributed.shutdown)
    marks()
    exit_now(code)
distributed.exit_now = marked_exit_now
mark('start')
try:
    make_pairs.main(sys.argv[2:])
finally:
    marks()
'''


def test_torchrun_ranks_finish_at_their_own_pace(made, tmp_path):
    (tmp_path / 'launch.py').write_text(UNEVEN_RANKS)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=3',
                           str(tmp_path / 'launch.py'), str(tmp_path), '--teacher', made['pkl'], '--seeds', '0-8',
                           '--shard-size', '3', '--batch', '3', '--steps', '2', '--device', 'cpu', '--outdir',
                           str(tmp_path / 'pairs')], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('Done.') == 1 and (tmp_path / 'rank0-saw-shard-2').exists()
    assert len(PairSet(tmp_path / 'pairs')) == 9
