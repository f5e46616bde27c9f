"""Reliability (docs/RELIABILITY.md): exact resume of every method after SIGTERM, resume option checks, one-line
errors before anything is written, OS write errors, temp files, the run-directory lock, exit codes, safe loading
under fuzzing, --transfer. One test per root cause of issue 15, parametrised over its cases."""

import functools
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(autouse=True)
def no_previews(monkeypatch):
    """No preview grids: their sampling would dominate these tiny runs."""
    monkeypatch.setattr(loop_module, 'training_loop', functools.partial(loop_module.training_loop, preview_grid=0))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """16 labelled 8x8 images; a tiny teacher; a KD teacher with dropout (2 blocks, so KD can remove one); its pairs."""
    root = tmp_path_factory.mktemp('reliability')
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=[8, 8, 3], dtype=np.uint8) for _ in range(16)]
    save_dataset(str(root / 'cond.zip'), images, [i % 4 for i in range(16)])
    torch.manual_seed(0)
    for name, kwargs in [('teacher', {}), ('teacher-kd', dict(num_blocks=2, dropout=0.1)),
                         ('teacher-ld', dict(label_dropout=0.1))]:  # its zero label is a null guide
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
SID_DISBACK = ['--method=sid-disback', '--teacher={teacher}', '--lr=1e-4', '--stage1-kimg=0.024', '--path-nodes=3',
               '--switch-every=2']

# name: (options, total steps, range of the step during which SIGTERM arrives)
RESUME_CASES = {
    'edm': (['--data={data}', '--cond=1', *EDM_NET, '--dropout=0.13', '--augment=0.5', '--workers=1'], 5, (0, 3)),
    'edm-deterministic': (['--data={data}', '--cond=1', *EDM_NET, '--dropout=0.13', '--augment=0.5', '--deterministic'],
                          4, (0, 2)),
    'dmd': (['--method=dmd', '--teacher={teacher}', '--data={data}', '--cond=1', *DMD, '--pairs={pairs}',
             '--reg-loss=l2', '--gan-g=3e-3'], 5, (0, 3)),
    'disback-stage1': (DISBACK, 9, (0, 1)),  # stage 1 is 3 steps
    'disback-stage2': (DISBACK, 9, (3, 7)),
    'disback-plateau': (['--method=disback', '--teacher={teacher}', *DMD, '--stage1-kimg=0.08', '--path-nodes=3',
                         '--switch-every=2', '--stage1-stop=plateau', '--stage1-window=2', '--stage1-tol=0.5'], 12, (1, 6)),
    'pd': (['--method=pd', '--teacher={teacher}', '--data={data}', '--cond=1', '--start-steps=8', '--round-kimg=0.016',
            '--final-round-kimg=0.024', '--lr=1e-3'], 8, (0, 4)),  # rounds of 2, 3, 3 steps: a boundary follows
    'guided': (['--method=guided', '--teacher={teacher_ld}', '--data={data}', '--cond=1', '--lr=1e-3'], 4, (0, 2)),
    'kd': (['--method=kd', '--teacher={teacher_kd}', '--data={data}', '--cond=1', '--kd-variant=base', '--augment=0',
            '--lr=1e-3'], 4, (0, 2)),
    'sid': (['--method=sid', '--teacher={teacher}', '--data={data}', '--cond=1', '--lr=1e-4', '--dropout=0.1'], 5, (0, 3)),  # SiDA's G waits 100 kimg
    'sid-disback-stage1': (SID_DISBACK, 9, (0, 1)),  # stage 1 is 3 steps
    'sid-disback-stage2': (SID_DISBACK, 9, (3, 7)),
}


# Issue 23 item 5: with two accumulation rounds a signal during the step's first round abandons the step (checked
# before the second); the state describes the step's start. PD at its round boundary (step 2 begins round two).
ABANDON_CASES = {'edm': None, 'dmd': None, 'pd': 2, 'sid': None, 'disback-stage2': None}


@pytest.mark.parametrize('name, rounds', [(n, 1) for n in sorted(RESUME_CASES)] + [(n, 2) for n in sorted(ABANDON_CASES)])
def test_sigterm_and_resume_is_bitwise_exact(files, tmp_path, monkeypatch, name, rounds):
    args, steps, (lo, hi) = RESUME_CASES[name]
    args = [a.format(data=files / 'cond.zip', teacher=files / 'teacher.pkl', teacher_kd=files / 'teacher-kd.pkl',
                     teacher_ld=files / 'teacher-ld.pkl', pairs=files / 'pairs') for a in args] + COMMON
    if name != 'pd':  # PD's duration is its rounds
        args.append(f'--duration={(steps * 8 - 0.5) * 1e-6}')
    cut = random.Random(name).randint(lo, hi)  # seeded: a failure reproduces
    if rounds == 2:
        args.append('--batch-gpu=4')
        cut = ABANDON_CASES[name] if ABANDON_CASES[name] is not None else cut

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
    assert latest_state(tmp_path / 'cut')['step'] == (cut + 1 if rounds == 1 else cut)  # the step finished, or abandoned
    seed = json.loads((tmp_path / 'cut' / 'training_options.json').read_text())['seed']

    r = invoke(f'--resume={tmp_path / "cut"}', *args)  # the same options, again without --seed
    assert r.exit_code == 0, r.output
    r = invoke(f'--outdir={tmp_path / "full"}', f'--seed={seed}', *args)
    assert r.exit_code == 0, r.output
    full, resumed = latest_state(tmp_path / 'full'), latest_state(tmp_path / 'cut')
    assert full['step'] == steps
    assert_equal_trees(full, resumed)

def test_sigterm_during_the_loops_setup_stops_at_the_first_step(files, tmp_path, monkeypatch):
    """train.py catches the signals before the loop builds its networks: a SIGTERM then is kept, not dropped, and
    the run stops at its first step boundary with a state."""
    class SigtermInSetup(loop_module.IndexStream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(loop_module, 'IndexStream', SigtermInSetup)
    r = invoke(f'--outdir={tmp_path / "run"}', *[a.format(data=files / 'cond.zip') for a in BASE])
    assert r.exit_code == dnnlib.util.EXIT_STOPPED and 'Received SIGTERM: training state written' in r.output, r.output
    assert latest_state(tmp_path / 'run')['step'] == 0


def test_deterministic_sets_torch_and_is_checked_on_resume(files, tmp_path, monkeypatch):
    """--deterministic: deterministic algorithms, cuDNN benchmarking off and cuBLAS's workspace setting in the step;
    recorded in training_options.json and, like the options that define the run, refused as a change on resume."""
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    seen = []

    class Recorded(StepRandom):
        def __init__(self, *args):
            super().__init__(*args)
            seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                         os.environ.get('CUBLAS_WORKSPACE_CONFIG')))
    monkeypatch.setattr(loop_module, 'StepRandom', Recorded)
    args = [f'--outdir={tmp_path / "run"}', *[a.format(data=files / 'cond.zip') for a in BASE]]
    r = invoke(*args, '--deterministic')
    assert r.exit_code == 0, r.output
    assert seen == [(True, False, ':4096:8')] * 2
    options = json.loads((tmp_path / 'run' / 'training_options.json').read_text())
    assert options['deterministic'] is True and options['cudnn_benchmark'] is False
    r = invoke(*args, f'--resume={tmp_path / "run"}', '--duration=0.00003')
    assert r.exit_code == 1 and 'deterministic: true -> (absent)' in r.output, r.output
    seen.clear()
    r = invoke(*args, f'--resume={tmp_path / "run"}', '--duration=0.00003', '--deterministic')
    assert r.exit_code == 0 and seen == [(True, False, ':4096:8')] * 2, r.output
    r = invoke(*args, '--deterministic', '--bench=1', '--dry-run')
    assert r.exit_code == 1 and 'Error: --deterministic turns cuDNN benchmarking off' in r.output, r.output
    r = invoke(f'--outdir={tmp_path / "other"}', *[a.format(data=files / 'cond.zip') for a in BASE])
    assert r.exit_code == 0 and seen[-1][0] is False  # the next run in this process is not deterministic
    monkeypatch.setattr(train.distributed, 'init', lambda device: torch.device('cuda'))  # as on a GPU
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)  # one with bf16
    r = invoke(f'--outdir={tmp_path / "dmd"}', '--method=dmd', f'--teacher={files / "teacher.pkl"}',
               f'--pairs={files / "pairs"}', '--deterministic', '--dry-run')
    assert r.exit_code == 1 and 'Error: --deterministic: LPIPS upsamples bilinearly' in r.output, r.output

# ----------------------------------------------------------------------------
# Root cause 3: a resume checks its options against the run's, and its state; what may change is recorded.

BASE = ['--data={data}', '--cond=1', *EDM_NET, '--dropout=0', '--augment=0', '--lr=1e-3', '--seed=3', *COMMON,
        '--dump=1', '--duration=0.0000155']


@pytest.fixture(scope='module')
def base_run(files, tmp_path_factory):
    """Two steps of a tiny EDM run with a state per step (both named training-state-000000.pt)."""
    run_dir = tmp_path_factory.mktemp('base') / 'run'
    r = invoke(f'--outdir={run_dir}', *[a.format(data=files / 'cond.zip') for a in BASE])
    assert r.exit_code == 0, r.output
    return run_dir


def contents(path):
    """{relative name: bytes} of every file under path."""
    return {os.path.relpath(os.path.join(root, n), path): open(os.path.join(root, n), 'rb').read()
            for root, _dirs, names in os.walk(path) for n in names}


def truncate(path, frac=0.5):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:int(len(data) * frac)])


def flip_key_name(path):
    """16 flipped bytes inside a state-dict key name of a training state (issue 26 H): the file stays a readable zip
    whose top-level keys are intact, so only a whole-file check finds it."""
    data = bytearray(open(path, 'rb').read())
    start = re.search(rb'model\.[a-z0-9_.x]{16}', bytes(data)).start()
    data[start:start + 16] = bytes(b ^ 0x20 for b in data[start:start + 16])
    open(path, 'wb').write(data)


def older_and_newer_state(run_dir):
    """A second, newer state: the newest is then training-state-000001.pt, the older one 000000."""
    shutil.copy(run_dir / 'training-state-000000.pt', run_dir / 'training-state-000001.pt')
    shutil.copy(run_dir / 'training-state-000000.pt.sha256', run_dir / 'training-state-000001.pt.sha256')


def test_state_checksum_matches_after_a_kill_at_any_moment(tmp_path, monkeypatch):
    """A state is replaced between two writes of its checksum file: killed before, between or after them, the file
    under the state's name matches its checksum file (issue 26 H)."""
    path = str(tmp_path / 'training-state-000000.pt')
    state = lambda v: dict(method=dict(w=torch.full([1000], float(v))), cur_nimg=0, cur_tick=0, tick_start_nimg=0,
                           step=v, world_size=1, rng=[])
    loop_module._write_state(state(1), path)
    assert len(open(path + '.sha256').read().splitlines()) == 1 and loop_module.state_problem(path) is None
    replace = os.replace

    def killed_at_state_replace(src, dst):
        if dst == path:
            raise KeyboardInterrupt  # as a kill between the two checksum writes
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', killed_at_state_replace)
    with pytest.raises(KeyboardInterrupt):
        loop_module._write_state(state(2), path)
    monkeypatch.setattr(os, 'replace', replace)
    assert len(open(path + '.sha256').read().splitlines()) == 2  # the new content's hash and the old one's
    assert loop_module.state_problem(path) is None and latest_state(tmp_path)['step'] == 1
    loop_module._write_state(state(3), path)
    assert len(open(path + '.sha256').read().splitlines()) == 1
    assert loop_module.state_problem(path) is None and latest_state(tmp_path)['step'] == 3
    open(path + '.sha256', 'w').write('0' * 64 + '  training-state-000000.pt\n')
    assert loop_module.state_problem(path).startswith('checksum mismatch')


# name: (change to the run directory, extra options, exit code, text expected in the output)
RESUME_CHECKS = {
    'lr': (None, ['--lr=2e-3'], 0, 'Resuming from'),  # a lower lr after a divergence, or a final phase: accepted
    'batch and seed': (None, ['--batch=16', '--seed=5'], 1, 'batch_size: 8 -> 16; seed: 3 -> 5'),
    'precond and cbase': (None, ['--precond=vp', '--cbase=32'], 1, 'VPPrecond"; method_kwargs.network_kwargs.model_channels: 16 -> 32)'),
    'cond': (None, ['--cond=0'], 1, 'dataset_kwargs.use_labels: true -> false'),
    'precision': (None, ['--precision=bf16'], 1, 'precision: "fp32" -> "bf16"'),  # the states' loss scale and numerics
    'method': (None, ['--method=dmd', '--teacher={teacher}'], 1, 'method_kwargs.class_name: "training.teacher.EDM" -> "training.distill.dmd.DMD"'),
    'no states': (lambda d: os.remove(d / 'training-state-000000.pt'), [], 1, 'no training-state-*.pt in'),
    'all states damaged': (lambda d: truncate(d / 'training-state-000000.pt'), [], 1, 'none of the 1 training-state-*.pt'),
    'named state damaged': (lambda d: truncate(d / 'training-state-000000.pt'), ['--resume={state}'], 1,
                            'training-state-000000.pt" is not a complete training state (checksum mismatch: '),
    'newest state key flipped': (lambda d: (older_and_newer_state(d), flip_key_name(d / 'training-state-000001.pt')), [],
                                 0, 'Skipping "training-state-000001.pt": not a complete training state (checksum'),
    'named state key flipped': (lambda d: flip_key_name(d / 'training-state-000000.pt'), ['--resume={state}'], 1,
                                'training-state-000000.pt" is not a complete training state (checksum'),
    'newest state without checksum': (lambda d: (older_and_newer_state(d), os.remove(d / 'training-state-000001.pt.sha256')),
                                      [], 0, 'Skipping "training-state-000001.pt": not a complete training state (no checksum'),
    'not a run': (lambda d: os.remove(d / 'training_options.json'), [], 1, 'has no training_options.json'),
    'newest state damaged': (lambda d: (older_and_newer_state(d), truncate(d / 'training-state-000001.pt')), [], 0,
                             'Skipping "training-state-000001.pt": not a complete training state'),
    'torn stats line': (lambda d: open(d / 'stats.jsonl', 'a').write('{"Progress/kimg": {"me'), [], 0, 'Resuming from'),
    'accepted changes': (None, ['--duration=0.0000235', '--tick=0.016', '--snap=2', '--dump=2', '--batch-gpu=4',
                                '--workers=1'], 0, 'Resuming from'),
}


@pytest.mark.parametrize('name', sorted(RESUME_CHECKS))
def test_resume_checks_options_and_states(files, base_run, tmp_path, name):
    change, extra, code, text = RESUME_CHECKS[name]
    run_dir = Path(shutil.copytree(base_run, tmp_path / 'run'))
    if change is not None:
        change(run_dir)
    before = contents(run_dir)
    args = [a.format(data=files / 'cond.zip', teacher=files / 'teacher.pkl', state=run_dir / 'training-state-000000.pt')
            for a in BASE + extra]
    r = invoke(f'--resume={run_dir}', *args)
    assert r.exit_code == code and text in r.output, r.output
    if code != 0:
        assert r.output.startswith('Error: ') and len(r.output.strip().splitlines()) == 1, r.output
        assert contents(run_dir) == before  # refused before anything was written
        return
    kimgs = [json.loads(line)['Progress/kimg']['mean'] for line in open(run_dir / 'stats.jsonl')]
    assert kimgs == sorted(kimgs) and kimgs[-1] == pytest.approx(0.016 if name != 'accepted changes' else 0.024)
    (record,) = [json.loads(line) for line in open(run_dir / 'resumes.jsonl')]
    assert record['state'] == 'training-state-000000.pt'
    if name == 'accepted changes':
        assert sorted(record['changed']) == ['batch_gpu', 'data_loader_kwargs.num_workers',
                                             'data_loader_kwargs.prefetch_factor', 'kimg_per_tick', 'snapshot_ticks',
                                             'state_dump_ticks', 'total_kimg']
        assert record['changed']['batch_gpu'] == [8, 4]
    elif name == 'lr':
        assert record['changed'] == {'method_kwargs.optimizer_kwargs.lr': [0.001, 0.002]}
    else:
        assert record['changed'] == {}

# ----------------------------------------------------------------------------
# Root cause 4: bad input found before the run directory exists, as one line.

def damaged_zip(files, tmp_path):
    """cond.zip with one byte of image 3's PNG data flipped (its CRC no longer matches)."""
    import zipfile
    path = tmp_path / 'damaged.zip'
    data = bytearray((files / 'cond.zip').read_bytes())
    with zipfile.ZipFile(files / 'cond.zip') as zf:
        info = zf.getinfo('00000/img00000003.png')
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def mixed_folder(files, tmp_path):
    """cond.zip unpacked, with one image replaced by a 16x16 one."""
    import zipfile
    import PIL.Image
    with zipfile.ZipFile(files / 'cond.zip') as zf:
        zf.extractall(tmp_path / 'mixed')
    PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(tmp_path / 'mixed' / '00000' / 'img00000005.png')
    return tmp_path / 'mixed'


def flipped_shard(files, tmp_path):
    path = Path(shutil.copytree(files / 'pairs', tmp_path / 'pairs'))
    data = bytearray((path / 'shard-00001.npy').read_bytes())
    data[-3] ^= 0xFF
    (path / 'shard-00001.npy').write_bytes(bytes(data))
    return path


def foreign_pairs(files, tmp_path):
    """Pairs whose sidecars name another teacher (same shapes)."""
    path = Path(shutil.copytree(files / 'pairs', tmp_path / 'pairs'))
    for sidecar in path.glob('shard-*.json'):
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps(dict(meta, teacher_sha256='0' * 64, teacher='other.pkl')))
    return path


def offline(monkeypatch, tmp_path):
    import requests
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    def refuse(*args, **kwargs):
        raise requests.ConnectionError('network is unreachable')
    monkeypatch.setattr(requests.Session, 'get', refuse)


def not_vgg(files, tmp_path):
    torch.save({'features.0.weight': torch.zeros(3)}, tmp_path / 'not-vgg.pth')
    return tmp_path / 'not-vgg.pth'


def ref_npz(tmp_path):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(3), sigma=np.eye(3))
    return tmp_path / 'ref.npz'


DMD_CLI = ['--method=dmd', '--teacher={teacher}', '--batch=8', '--device=cpu']
# name: (options, text expected in the one-line error); {x} names a file the test makes
BAD_INPUT = {
    'damaged zip member': (['--data={damaged}', *EDM_NET], '"00000/img00000003.png" in'),
    'mixed image shapes': (['--data={mixed}', *EDM_NET], 'Image "00000/img00000005.png"'),
    'dmd teacher vs data': ([*DMD_CLI, '--data={data}', '--cond=0', '--gan-g=3e-3'],
                            '--teacher: network is 8x8x3 with 4 labels, but the data is 8x8x3 with 0 labels'),
    'sid teacher vs data': ([*DMD_CLI, '--method=sid', '--data={data}', '--cond=0', '--gan-g=1e-4'],
                            '--teacher: network is 8x8x3 with 4 labels, but the data is 8x8x3 with 0 labels'),
    'disback teacher vs data': ([*DMD_CLI, '--method=disback', '--data={data}', '--cond=0', '--gan-g=3e-3'],
                                '--teacher: network is 8x8x3 with 4 labels, but the data is 8x8x3 with 0 labels'),
    'pairs missing': ([*DMD_CLI, '--pairs={missing}'], '--pairs: No pair shards in'),
    'pairs damaged': ([*DMD_CLI, '--pairs={flipped}', '--reg-loss=l2'], 'Checksum mismatch'),
    'pairs foreign': ([*DMD_CLI, '--pairs={foreign}', '--reg-loss=l2'], 'holds pairs of another teacher (other.pkl)'),
    'lpips offline': ([*DMD_CLI, '--pairs={pairs}'], '--lpips-vgg=PATH --lpips-lin=PATH'),
    'lpips missing': ([*DMD_CLI, '--pairs={pairs}', '--lpips-vgg={missing}', '--lpips-lin={missing}'], 'No such file'),
    'lpips not vgg': ([*DMD_CLI, '--pairs={pairs}', '--lpips-vgg={notvgg}', '--lpips-lin={notvgg}'], 'features.0.weight'),
    'inception offline': ([*DMD_CLI, '--metrics=fid1k', '--ref={ref}'], '--detector: Cannot download the Inception'),
    'resume empty dir': (['--resume={empty}', '--data={data}', *EDM_NET], 'has no training_options.json'),
    'transfer into dmd': ([*DMD_CLI, '--transfer={teacher}'], '--transfer initialises --method=edm only'),
}


@pytest.mark.parametrize('name', sorted(BAD_INPUT))
def test_bad_input_is_one_line_before_any_directory(files, tmp_path, monkeypatch, name):
    args, text = BAD_INPUT[name]
    made = dict(data=files / 'cond.zip', teacher=files / 'teacher.pkl', pairs=files / 'pairs', missing=tmp_path / 'none',
                empty=tmp_path / 'empty')
    os.makedirs(made['empty'])
    makers = dict(damaged=damaged_zip, mixed=mixed_folder, flipped=flipped_shard, foreign=foreign_pairs, notvgg=not_vgg)
    made.update({k: f(files, tmp_path) for k, f in makers.items() if f'{{{k}}}' in ''.join(args)})
    if '{ref}' in ''.join(args):
        made['ref'] = ref_npz(tmp_path)
    if 'offline' in name:
        offline(monkeypatch, tmp_path)
    r = invoke(f'--outdir={tmp_path / "runs"}', *[a.format(**made) for a in args])
    lines = [line for line in r.output.splitlines() if not line.startswith('Downloading ')]  # open_url's progress
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith('Error: ') and text in lines[0], r.output
    assert not (tmp_path / 'runs').exists() and os.listdir(made['empty']) == []

# ----------------------------------------------------------------------------
# Root cause 5: malformed dataset.json labels, in the training reader and in dataset_tool.py, as one line.

LABELS_JSON = {
    'flat list': '{"labels": [0, 1, 2, 3]}',
    'top-level list': '[["a.png", 0], ["b.png", 1]]',
    'one-element entries': '{"labels": [["a.png"], ["b.png"]]}',
    'invalid json': '{"labels": [["a.png", 0],',
}


@pytest.mark.parametrize('tool', ['train', 'dataset_tool'])
@pytest.mark.parametrize('name', sorted(LABELS_JSON))
def test_malformed_labels_name_the_file_and_the_fix(tmp_path, tool, name):
    import dataset_tool
    import PIL.Image
    src = tmp_path / 'src'
    src.mkdir()
    for n in ['a', 'b']:
        PIL.Image.fromarray(np.zeros([8, 8, 3], np.uint8)).save(src / f'{n}.png')
    (src / 'dataset.json').write_text(LABELS_JSON[name])
    if tool == 'train':
        r = invoke(f'--outdir={tmp_path / "runs"}', f'--data={src}', '--cond=1', '--device=cpu')
    else:
        r = CliRunner().invoke(dataset_tool.main, [f'--source={src}', f'--dest={tmp_path / "runs.zip"}'])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f'dataset.json in "{src}"' in r.output and 'write it as {"labels": [["00000/img00000000.png", 6]' in r.output
    assert not any(p.name.startswith('runs') for p in tmp_path.iterdir())

# ----------------------------------------------------------------------------
# Root cause 6: OS write errors (full disk, read-only output) in every command line, as one line; what was
# written before stays complete and no temp file is left.

def tool_commands(files, out):
    """tool: (click command, arguments writing under `out`, fsync calls that succeed before a full disk)."""
    import dataset_tool
    import generate
    import toy
    return {
        'train': (train.main, [f'--outdir={out}', '--nosubdir', *[a.format(data=files / 'cond.zip') for a in BASE]], 1),
        'generate': (generate.main, [f'--network={files / "teacher.pkl"}', f'--outdir={out}', '--seeds=0-2', '--steps=2',
                                     '--batch=1', '--device=cpu'], 1),
        'make_pairs': (make_pairs.main, [f'--teacher={files / "teacher.pkl"}', f'--outdir={out}', '--seeds=0-7',
                                         '--shard-size=4', '--steps=2', '--device=cpu'], 2),
        'dataset_tool': (dataset_tool.main, [f'--source={files / "cond.zip"}', f'--dest={out / "data.zip"}'], 0),
        'toy': (toy.cli, ['build', f'--outdir={out}', '--resolution=8', '--K=2', '--num-images=4', '--fit-kimg=0'], 1),
    }


def assert_complete(tool, out):
    """The files a tool wrote before the failure are whole; no temp file is left."""
    from training.pairs import PairSet
    import PIL.Image
    names = sorted(os.listdir(out)) if out.exists() else []
    assert not [n for n in names if n.endswith('.tmp')], names
    if tool == 'train':
        assert json.loads((out / 'training_options.json').read_text())['seed'] == 3
        assert not [n for n in names if n.startswith(('network-snapshot', 'training-state'))]
    elif tool == 'generate':
        assert names == ['000000.png'] and PIL.Image.open(out / '000000.png').size == (8, 8)
    elif tool == 'make_pairs':
        assert names == ['shard-00000.json', 'shard-00000.npy'] and len(PairSet(out)) == 4
    elif tool == 'dataset_tool':
        assert names == []
    else:
        assert names == ['reference.npz'] and np.load(out / 'reference.npz')['mu'].shape == (3 * 8 * 8,)


@pytest.mark.parametrize('fault', ['full disk', 'read-only'])
@pytest.mark.parametrize('tool', ['train', 'generate', 'make_pairs', 'dataset_tool', 'toy'])
def test_os_write_errors_are_one_line(files, tmp_path, monkeypatch, tool, fault):
    import errno
    import tempfile
    out = tmp_path / 'out'
    command, args, fsyncs_ok = tool_commands(files, out)[tool]
    if fault == 'full disk':
        calls = []
        def fsync(fd):
            calls.append(fd)
            if len(calls) > fsyncs_ok:
                raise OSError(errno.ENOSPC, 'No space left on device')
        monkeypatch.setattr(os, 'fsync', fsync)
        expected = 'No space left on device; free disk space'
    else:  # nothing can be created under out
        def refuse(real):
            def fn(*a, **kw):
                path = kw.get('dir', a[0] if a else None)
                if str(path).startswith(str(out)):
                    raise OSError(errno.EROFS, 'Read-only file system', path)
                return real(*a, **kw)
            return fn
        monkeypatch.setattr(os, 'makedirs', refuse(os.makedirs))
        monkeypatch.setattr(tempfile, 'mkstemp', refuse(tempfile.mkstemp))
        expected = 'Read-only file system; the file system is read-only; write elsewhere'
    r = CliRunner().invoke(command, [str(a) for a in args])
    errors = [line for line in r.output.splitlines() if line.startswith('Error')]  # beside the tool's progress lines
    assert r.exit_code == 1 and len(errors) == 1 and 'Traceback' not in r.output, r.output
    assert errors[0].startswith(f'Error: "{out}') and expected in errors[0], r.output
    if fault == 'full disk':
        assert_complete(tool, out)

# ----------------------------------------------------------------------------
# Root cause 7: a temp file left by kill -9 is hidden and ends in .tmp: no reader takes it for data, and train.py
# removes the ones in its run directory on start and on resume.

ROOT = Path(__file__).resolve().parents[1]
KILLED_WRITE = ('import os, signal, sys; import dnnlib.util; '
                'dnnlib.util.atomic_write(sys.argv[1], lambda f: (f.write(b"\\x89PNG"), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))')


def killed_write(path):
    """atomic_write(path) killed with SIGKILL halfway: path is as before (absent, or its old bytes); returns the temp
    file it left."""
    before = set(os.listdir(path.parent))
    old = path.read_bytes() if path.exists() else None
    r = subprocess.run([sys.executable, '-c', KILLED_WRITE, str(path)], cwd=ROOT)
    assert r.returncode == -signal.SIGKILL and (path.read_bytes() if path.exists() else None) == old
    (left,) = set(os.listdir(path.parent)) - before
    assert left.startswith(f'.{path.name}.') and left.endswith('.tmp')
    return path.parent / left


@pytest.mark.parametrize('reader', ['ImageFolderDataset', 'dataset_tool', 'train start', 'train resume'])
def test_temp_files_of_a_killed_write_are_never_outputs(files, base_run, tmp_path, reader):
    import dataset_tool
    import PIL.Image
    from training.dataset import ImageFolderDataset
    if reader in ('ImageFolderDataset', 'dataset_tool'):
        folder = tmp_path / 'images'
        folder.mkdir()
        for i in range(2):
            PIL.Image.fromarray(np.full([8, 8, 3], i, np.uint8)).save(folder / f'{i:06d}.png')
        killed_write(folder / '000002.png')
        if reader == 'ImageFolderDataset':  # also what fid.py calc reads images with
            assert len(ImageFolderDataset(str(folder))) == 2
        else:
            r = CliRunner().invoke(dataset_tool.main, [f'--source={folder}', f'--dest={tmp_path / "d.zip"}'])
            assert r.exit_code == 0 and 'Wrote 2 images' in r.output, r.output
        return
    if reader == 'train start':  # a run killed while writing its options: the directory holds no run yet
        run_dir = tmp_path / 'run'
        run_dir.mkdir()
        left = killed_write(run_dir / 'training_options.json')
    else:
        run_dir = Path(shutil.copytree(base_run, tmp_path / 'run'))
        left = killed_write(run_dir / 'network-snapshot-000000.pkl')
    args = [a.format(data=files / 'cond.zip') for a in BASE]
    where = f'--outdir={run_dir}' if reader == 'train start' else f'--resume={run_dir}'  # BASE has --nosubdir
    r = invoke(where, *args)
    assert r.exit_code == 0 and f'Removed 1 temp file(s) left by a killed run: {left.name}' in r.output, r.output
    assert not left.exists()

# ----------------------------------------------------------------------------
# Root cause 8: one run at a time in a run directory; the lock dies with its process, even under kill -9.

LOCK_HOLDER = 'import sys, time; from training import run_dir; f = run_dir.lock(sys.argv[1]); print("locked", flush=True); time.sleep(60)'


@pytest.mark.parametrize('case', ['second nosubdir run', 'second resume', 'holder killed'])
def test_run_directory_lock(files, base_run, tmp_path, case):
    run_dir = Path(shutil.copytree(base_run, tmp_path / 'run'))
    if case == 'second nosubdir run':  # the holder is a run starting in a fresh directory (a run's own is refused)
        os.remove(run_dir / 'training_options.json')
    holder = subprocess.Popen([sys.executable, '-c', LOCK_HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        if case == 'holder killed':
            holder.kill()  # SIGKILL: no clean-up runs, the kernel releases the lock
            holder.wait()
        before = contents(run_dir)
        args = [a.format(data=files / 'cond.zip') for a in BASE] + ['--duration=0.0000235']
        r = invoke(f'--outdir={run_dir}' if case == 'second nosubdir run' else f'--resume={run_dir}', *args)
    finally:
        holder.kill()
        holder.wait()
    if case == 'holder killed':
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 1 and r.output.startswith(f'Error: "{run_dir}" is in use by another run (pid {holder.pid} on '), r.output
    assert len(r.output.strip().splitlines()) == 1
    after = contents(run_dir)
    assert after == {**before, '.lock': after['.lock']}  # nothing else written

# ----------------------------------------------------------------------------
# Root cause 9: exit codes a scheduler can act on (README, "Exit codes").

@pytest.mark.parametrize('case, code', [('finished', 0), ('SIGTERM', dnnlib.util.EXIT_STOPPED),
                                        ('SIGINT', dnnlib.util.EXIT_STOPPED), ('usage', 2), ('bad input', 1)])
def test_exit_codes(files, tmp_path, monkeypatch, case, code):
    args = [a.format(data=files / 'cond.zip') for a in BASE]
    if case.startswith('SIG'):
        class SignalDuringStep(StepRandom):
            def __init__(self, *a):
                super().__init__(*a)
                os.kill(os.getpid(), getattr(signal, case))
        monkeypatch.setattr(loop_module, 'StepRandom', SignalDuringStep)
    if case == 'usage':
        args.append('--batch=eight')
    if case == 'bad input':
        args.append(f'--data={tmp_path / "missing.zip"}')
    r = invoke(f'--outdir={tmp_path / "run"}', *args)
    assert r.exit_code == code, r.output
    if code == dnnlib.util.EXIT_STOPPED:
        assert latest_state(tmp_path / 'run')['step'] == 1
        assert f'Received {case}: training state written' in r.output

SIGNAL_IN_SHUTDOWN = '''
import functools, os, signal, sys
sys.path.insert(0, os.getcwd())
import train
from torch_utils import distributed
from training import training_loop
from training.batching import StepRandom

training_loop.training_loop = functools.partial(training_loop.training_loop, preview_grid=0)  # as no_previews

shutdown = distributed.shutdown
def signalled_shutdown(code=0):  # a scheduler's SIGTERM after "Exiting..." (or after "Received SIGTERM")
    os.kill(os.getpid(), signal.SIGTERM)
    shutdown(code)
distributed.shutdown = signalled_shutdown

class SigtermDuringStep(StepRandom):
    def __init__(self, *args):
        super().__init__(*args)
        os.kill(os.getpid(), signal.SIGTERM)
if sys.argv.pop(1) == 'stopped':
    training_loop.StepRandom = SigtermDuringStep
train.main()
'''


@pytest.mark.parametrize('case, code', [('finished', 0), ('stopped', dnnlib.util.EXIT_STOPPED)])
def test_sigterm_during_shutdown_keeps_the_exit_code(files, tmp_path, case, code):
    """A signal after the loop, while train.py shuts down, is caught like one during it: the exit code stays 0 or 75
    (it was 143, the default handlers being back)."""
    args = [a.format(data=files / 'cond.zip') for a in BASE]
    p = subprocess.run([sys.executable, '-c', SIGNAL_IN_SHUTDOWN, case, f'--outdir={tmp_path / "run"}', *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == code, p.stdout[-2000:] + p.stderr[-2000:]
    assert ('Exiting...' if case == 'finished' else 'Received SIGTERM: training state written') in p.stdout

# ----------------------------------------------------------------------------
# The safe loader: every malformed file is a PickleLoadError (seeded fuzzing of a snapshot the tests made).

def structural_positions(data):
    """Byte positions that hold pickle structure: opcodes and their short arguments, and the first bytes of long
    ones (tensor blobs, module source), so that flips hit what the loader interprets rather than weight values."""
    import pickletools
    ops = list(pickletools.genops(data))
    out = []
    for i, (_op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        out += range(pos, min(end, pos + 64))
    return out


def crafted(name):
    """An EDM-protocol snapshot whose network state has a public key its class defines as a property."""
    net = EDMPrecond(**TINY)
    net.__dict__[name] = dict(net.init_kwargs) if name == 'init_kwargs' else ()
    return pickle.dumps(dict(ema=net))


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')  # torch, reading a garbled tensor blob
@pytest.mark.parametrize('kind', ['truncations', 'byte flips', 'crafted init_kwargs', 'crafted init_args'])
def test_safe_loader_raises_only_pickle_load_error(base_run, kind):
    import io
    from torch_utils import persistence
    data = (base_run / 'network-snapshot-000000.pkl').read_bytes()
    rng = random.Random(kind)
    if kind == 'truncations':
        cases = [data[:rng.randrange(len(data))] for _ in range(40)]
    elif kind == 'byte flips':
        positions = structural_positions(data)
        cases = []
        for _ in range(80):
            b = bytearray(data)
            for p in rng.sample(positions, rng.randint(1, 3)):
                b[p] ^= 1 << rng.randrange(8)
            cases.append(bytes(b))
    else:
        cases = [crafted(kind.split()[1])]
    outcomes = []
    for case in cases:
        try:
            persistence.load(io.BytesIO(case))
            outcomes.append('loaded')  # a flip that left the structure intact (e.g. in a name nobody checks)
        except persistence.PickleLoadError as e:
            assert '\n' not in str(e)
            outcomes.append('refused')
    assert outcomes.count('refused') >= len(cases) // 2, outcomes  # most damage is found, none escapes as another error
    if kind.startswith('crafted'):
        assert outcomes == ['refused']

# ----------------------------------------------------------------------------
# --transfer: EDM's copy_params_and_buffers(require_all=False), and no EMA ramp-up for transfer runs.

@pytest.mark.parametrize('case', ['augment labels added', 'other channels'])
def test_transfer_copies_the_matching_tensors(files, base_run, tmp_path, monkeypatch, case):
    from torch_utils import persistence
    from training.teacher import EDM
    source = base_run / 'network-snapshot-000000.pkl'  # trained without augmentation: no map_augment
    built = []
    monkeypatch.setattr(EDM, 'step', lambda self, rounds, cur_nimg: built.append(self))  # keep the initial weights
    extra = ['--augment=0.12'] if case == 'augment labels added' else ['--cbase=32']
    args = [a.format(data=files / 'cond.zip') for a in BASE] + [*extra, f'--transfer={source}']
    r = invoke(f'--outdir={tmp_path / "run"}', *args)
    if case == 'other channels':
        assert r.exit_code == 1 and r.output.startswith('Error: --transfer: ') and 'have other shapes' in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / 'run').exists()
        return
    assert r.exit_code == 0, r.output
    assert '--transfer: kept the initial model.map_augment.weight (not in the pickle)' in r.output
    options = json.loads((tmp_path / 'run' / 'training_options.json').read_text())
    assert options['method_kwargs']['ema_rampup_ratio'] is None and options['method_kwargs']['network_kwargs']['augment_dim'] == 9
    assert built[0].ema.rampup_ratio is None
    net = built[0].net.state_dict()
    with open(source, 'rb') as f:
        theirs = persistence.load(f)['ema'].state_dict()
    assert sorted(set(net) - set(theirs)) == ['model.map_augment.weight']
    assert all(torch.equal(net[k], theirs[k]) for k in theirs)

# ----------------------------------------------------------------------------
# A new run into a directory that holds a run (issue 26 I): refused up front, the old run intact and resumable.

@pytest.mark.parametrize('case', ['finished run', 'stopped run'])
def test_new_run_into_a_run_directory_is_refused(files, base_run, tmp_path, case):
    run_dir = Path(shutil.copytree(base_run, tmp_path / 'run'))
    if case == 'stopped run':  # a run stopped before its first state: its options and log alone
        for name in os.listdir(run_dir):
            if name not in ('training_options.json', 'log.txt', '.lock'):
                os.remove(run_dir / name)
    before = contents(run_dir)
    r = invoke(f'--outdir={run_dir}', *[a.format(data=files / 'cond.zip') for a in BASE])
    assert r.exit_code == 1 and r.output.startswith(f'Error: --outdir: "{run_dir}" holds a run'), r.output
    assert 'use --resume, or another --outdir' in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert contents(run_dir) == before  # nothing written, not even the lock

# ----------------------------------------------------------------------------
# State writes at ImageNet scale (issue 23 item 5): a background write from a CPU copy, nothing stored that the next
# update does not read.

def small_state(step, w):
    return dict(method=dict(w=w), cur_nimg=0, cur_tick=0, tick_start_nimg=0, step=step, world_size=1, rng=[])


def test_state_writer_writes_a_copy_in_the_background_one_at_a_time(tmp_path, monkeypatch):
    import threading
    import time
    gate = threading.Event()
    done = []
    write_state = loop_module._write_state

    def gated_write(state, path):
        gate.wait(10)
        write_state(state, path)
        done.append(os.path.basename(path))
    monkeypatch.setattr(loop_module, '_write_state', gated_write)
    writer = loop_module._StateWriter()
    w = torch.zeros(1000)
    writer.write(small_state(1, w), str(tmp_path / 'training-state-000001.pt'))
    w.fill_(7)  # training goes on, changing the weights in place
    assert done == [] and not (tmp_path / 'training-state-000001.pt').exists()  # written in the background
    threading.Timer(0.3, gate.set).start()
    start = time.monotonic()
    writer.write(small_state(2, w), str(tmp_path / 'training-state-000002.pt'))  # waits for the first write
    assert time.monotonic() - start > 0.2 and done == ['training-state-000001.pt']
    writer.wait()
    assert done == ['training-state-000001.pt', 'training-state-000002.pt']
    first = torch.load(tmp_path / 'training-state-000001.pt', weights_only=True)
    assert first['step'] == 1 and torch.equal(first['method']['w'], torch.zeros(1000))  # the copy made at write()
    assert latest_state(tmp_path)['step'] == 2 and torch.equal(latest_state(tmp_path)['method']['w'], w)

    def full_disk(state, path):
        raise OSError(28, 'No space left on device', path)
    monkeypatch.setattr(loop_module, '_write_state', full_disk)
    writer.write(small_state(3, w), str(tmp_path / 'training-state-000003.pt'))
    with pytest.raises(OSError, match='No space left'):  # reported to the main thread
        writer.wait()
    writer.wait()  # once


def test_sigterm_exit_waits_for_the_state_write(files, tmp_path, monkeypatch):
    import time
    write_state = loop_module._write_state
    monkeypatch.setattr(loop_module, '_write_state', lambda state, path: (time.sleep(0.5), write_state(state, path)))

    class SigtermDuringStep(StepRandom):
        def __init__(self, *a):
            super().__init__(*a)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(loop_module, 'StepRandom', SigtermDuringStep)
    r = invoke(f'--outdir={tmp_path / "run"}', *[a.format(data=files / 'cond.zip') for a in BASE], '--tick=1')  # no tick
    assert r.exit_code == dnnlib.util.EXIT_STOPPED, r.output
    assert loop_module.state_problem(str(tmp_path / 'run' / 'training-state-000000.pt')) is None  # whole when we exit
    assert latest_state(tmp_path / 'run')['step'] == 1


@pytest.mark.parametrize('beta1', [0.0, 0.9])
def test_first_moments_the_next_update_does_not_read_are_not_stored(beta1):
    """With beta1 = 0 (SiD) Adam's first moment is the last gradient, replaced before it is read: the state leaves it
    out and a resumed updater continues bitwise equal."""
    from training import optim
    torch.manual_seed(0)
    nets = [torch.nn.Linear(4, 4) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    grads = [torch.randn(20) for _ in range(3)]
    make = lambda net: optim.Updater(net.parameters(), 'net', class_name='torch.optim.AdamW', lr=1e-2,
                                     betas=(beta1, 0.999), weight_decay=0)
    full, part = make(nets[0]), make(nets[1])
    for i, g in enumerate(grads):
        if i == 1:  # part: saved and resumed into a fresh updater
            state = part.state_dict()
            assert all(('exp_avg' in s) == (beta1 != 0) for s in state['optimizer']['state'].values())
            part = make(nets[1])
            part.load_state_dict(state)
        for u in (full, part):
            u._grad_buffer().copy_(g)
            u.step(1e-2)
    assert all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters()))
