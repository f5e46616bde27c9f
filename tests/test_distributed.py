"""torch_utils/distributed.py and the command lines under torchrun: collective timeout, option names, rank 0 first."""

import contextlib
import datetime
import functools
import io
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
import generate
import make_pairs
import train
from torch_utils import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# The collective timeout.

def test_timeout_from_environment(monkeypatch):
    seen = {}
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.distributed, 'new_group', lambda **kwargs: seen.update(stop_group=kwargs))
    monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # init makes a traceback end the process at once
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.delenv('EDM_DISTILL_TIMEOUT_MIN', raising=False)
    distributed.init('cpu')
    assert seen['timeout'] == datetime.timedelta(minutes=60) and seen['backend'] == 'gloo'
    assert seen['stop_group'] == dict(backend='gloo', timeout=datetime.timedelta(minutes=60))
    monkeypatch.setenv('EDM_DISTILL_TIMEOUT_MIN', '180')
    distributed.init('cpu')
    assert seen['timeout'] == datetime.timedelta(hours=3)
    for bad in ['soon', '0', '-5', 'inf', 'nan']:
        monkeypatch.setenv('EDM_DISTILL_TIMEOUT_MIN', bad)
        with pytest.raises(ValueError, match=f'EDM_DISTILL_TIMEOUT_MIN="{bad}" is not a number of minutes'):
            distributed.init('cpu')
    r = CliRunner().invoke(train.main, ['--outdir=x', '--dry-run'])
    assert r.exit_code != 0 and 'Error: EDM_DISTILL_TIMEOUT_MIN="nan"' in r.output, r.output

# ----------------------------------------------------------------------------
# A run that ends with its peers leaves the group, then exits past the interpreter's teardown, where gloo's C++
# threads aborted 2 of about 37 finished two-process runs (SIGABRT, exit -6: CI failed on it).

@pytest.mark.parametrize('stop, code', [(False, 0), (True, 75)])
def test_a_finished_rank_leaves_the_group_with_its_exit_code(monkeypatch, tmp_path, stop, code):
    calls = []
    monkeypatch.setattr(train, '_main', lambda opts: not stop)
    monkeypatch.setattr(distributed, 'shutdown', lambda c: calls.append(c))  # one process: returns
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', '--dry-run'])
    assert r.exit_code == code and calls == [code], (r.output, calls)


def test_shutdown_drops_the_stop_group_then_exits(monkeypatch):
    calls = []

    class Exited(Exception):
        pass

    def exit_now(code):
        calls.append(('exit', code))
        raise Exited
    monkeypatch.setattr(distributed, '_cpu_group', object())
    monkeypatch.setattr(distributed, 'exit_now', exit_now)
    monkeypatch.setattr(distributed, 'is_distributed', lambda: True)
    monkeypatch.setattr(torch.distributed, 'destroy_process_group', lambda: calls.append(distributed._cpu_group))
    with pytest.raises(Exited):
        distributed.shutdown(75)
    assert calls == [None, ('exit', 75)]
    monkeypatch.setattr(distributed, 'is_distributed', lambda: False)
    distributed.shutdown(0)  # one process: nothing to leave, and it goes on
    assert len(calls) == 2


# ----------------------------------------------------------------------------
# Option names: torchrun parses the whole command line and rejects any abbreviation of its own options that is
# ambiguous (e.g. EDM's `fid.py calc --num`, which could be --numa-binding or --numa_binding).

def long_options(command, prefix=()):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from long_options(sub, (*prefix, name))
        return
    for param in command.params:
        if not param.hidden:
            yield from ((prefix, o) for o in param.opts + param.secondary_opts if o.startswith('--'))


def test_every_option_passes_torchrun():
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()
    rejected = []
    for script in [train, generate, make_pairs, fid]:
        for prefix, option in long_options(script.main):
            with contextlib.redirect_stderr(io.StringIO()) as err:
                try:
                    args = parser.parse_args([f'{script.__name__}.py', *prefix, f'{option}=1'])
                    assert args.training_script_args == [*prefix, f'{option}=1']
                except SystemExit:
                    rejected.append(f'{script.__name__}.py {" ".join(prefix)} {option}: {err.getvalue().splitlines()[-1]}')
    assert not rejected, rejected
    assert sum(1 for _ in long_options(fid.main)) > 10  # the check saw the options


def test_torchrun_fid_calc(tmp_path):
    import PIL.Image
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / 'images')
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 256, [4, 4, 3], dtype=np.uint8)).save(tmp_path / 'images' / f'{i:06d}.png')
    assert CliRunner().invoke(fid.main, ['ref', f'--data={tmp_path / "images"}', f'--dest={tmp_path / "ref.npz"}',
                                                       '--detector=pixels', '--workers=0']).exit_code == 0
    one = CliRunner().invoke(fid.main, ['calc', f'--images={tmp_path / "images"}', f'--ref={tmp_path / "ref.npz"}',
                                                      '--num-images=5', '--detector=pixels', '--workers=0'])
    assert one.exit_code == 0, one.output
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'fid.py',
                          'calc', f'--images={tmp_path / "images"}', f'--ref={tmp_path / "ref.npz"}', '--num-images=5',
                          '--detector=pixels', '--workers=0'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-2000:]
    assert float(two.stdout.splitlines()[-1]) == pytest.approx(float(one.output.splitlines()[-1]), rel=1e-6)


def test_dataset_verified_in_shares_and_every_rank_stops_with_the_same_line(tmp_path):
    """Under torchrun each rank reads every W-th image; a bad image in rank 1's share stops both ranks with one line
    before any directory exists (rank 0 alone would never see it)."""
    import PIL.Image
    from dataset_tool import save_dataset
    rng = np.random.default_rng(0)
    save_dataset(str(tmp_path / 'data'), [rng.integers(0, 256, [8, 8, 3], dtype=np.uint8) for _ in range(8)], None)
    PIL.Image.fromarray(np.zeros([16, 16, 3], np.uint8)).save(tmp_path / 'data' / '00000' / 'img00000005.png')
    p = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                        f'--outdir={tmp_path / "runs"}', f'--data={tmp_path / "data"}', '--device=cpu', '--batch=8'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [l for l in p.stdout.splitlines() + p.stderr.splitlines() if l.startswith('Error: ')]
    assert p.returncode != 0 and len(lines) == 2 and len(set(lines)) == 1, p.stdout + p.stderr
    assert 'img00000005.png' in lines[0] and not (tmp_path / 'runs').exists()

# ----------------------------------------------------------------------------
# A rank that fails ends the job in seconds: it prints its one line and exits without destroy_process_group, whose
# NCCL version waits for the peers' collectives (PyTorch >= 2.6) while the peers wait for the failed rank.

FAULTY_TRAIN = '''
import errno, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import dnnlib
import train
from torch_utils import distributed
from training import training_loop
from training.batching import StepRandom

def like_nccl(group=None):  # gloo's returns at once; NCCL's waits for peers that wait for this rank: for ever
    time.sleep(3600)
torch.distributed.destroy_process_group = like_nccl

class OutOfMemoryOnRank1(StepRandom):
    def __init__(self, seed, step, *rest):
        super().__init__(seed, step, *rest)
        if step == 1 and distributed.get_rank() == 1:
            print(f'FAULT AT {time.time()}', flush=True)
            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity '
                                         'of 79.19 GiB of which 1.06 GiB is free. Of the allocated memory ...')

atomic_write = dnnlib.util.atomic_write
def disk_full_in_state_writes(path, *args, **kwargs):  # only rank 0 writes
    if os.path.basename(path).startswith('training-state-'):
        print(f'FAULT AT {time.time()}', flush=True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return atomic_write(path, *args, **kwargs)

if os.environ['FAULT'] == 'rank 1 out of memory':
    training_loop.StepRandom = OutOfMemoryOnRank1
else:
    dnnlib.util.atomic_write = disk_full_in_state_writes
train.main()
'''


def run_torchrun(args, env, timeout):
    """torchrun ARGS, killed with its workers if it outlives `timeout`: (exit code, output, end time); exit code None
    on a timeout."""
    p = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *args], cwd=ROOT, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out, time.time()
    except subprocess.TimeoutExpired:
        kill_with_children(p.pid)
        return None, p.communicate()[0], time.time()


def kill_with_children(pid):
    """SIGKILL a process and its descendants (torchrun starts its workers in sessions of their own)."""
    import psutil
    parent = psutil.Process(pid)
    for proc in [*parent.children(recursive=True), parent]:
        proc.kill()


@pytest.mark.parametrize('fault, line', [
    ('rank 1 out of memory', 'Error: CUDA out of memory. Tried to allocate 2.00 GiB; lower --batch-gpu'),
    ('rank 0 disk full in a state write', 'training-state-000000.pt": No space left on device; free disk space')],
    ids=['rank-1-out-of-memory', 'rank-0-disk-full-in-state-write'])
def test_a_failing_rank_ends_the_job_in_seconds(tmp_path, fault, line):
    from dataset_tool import save_dataset
    rng = np.random.default_rng(0)
    save_dataset(str(tmp_path / 'data.zip'), [rng.integers(0, 256, [8, 8, 3], dtype=np.uint8) for _ in range(8)], None)
    (tmp_path / 'faulty_train.py').write_text(FAULTY_TRAIN)
    env = dict(os.environ, OMP_NUM_THREADS='1', FAULT=fault, EDM_DISTILL_TIMEOUT_MIN='0.5')
    code, out, end = run_torchrun(['--standalone', '--nproc_per_node=2', str(tmp_path / 'faulty_train.py'),
                                   f'--outdir={tmp_path / "run"}', f'--data={tmp_path / "data.zip"}', '--device=cpu',
                                   '--batch=8', '--cbase=16', '--cres=1', '--duration=0.00004', '--tick=0.008',
                                   '--dump=1', '--snap=1000', '--workers=0', '--nosubdir'], env, timeout=120)
    faults = [float(l.split()[-1]) for l in out.splitlines() if l.startswith('FAULT AT ')]
    errors = [l for l in out.splitlines() if l.startswith('Error: ')]
    assert code == 1 and len(faults) == 1 and end - faults[0] < 30, (code, out[-3000:])
    assert len(errors) == 1 and line in errors[0], out[-3000:]

# ----------------------------------------------------------------------------
# Several nodes, on one machine: the README's two-node commands, addresses changed, one gloo process per "node".

def readme_node_commands(port, static_port):
    """The torchrun options of the README's "Several nodes" commands for two one-process nodes on this machine:
    (c10d rendezvous options, [static options of node 0, of node 1])."""
    section = open(os.path.join(ROOT, 'README.md')).read().split('### Several nodes')[1]
    block = section.split('```bash')[1].split('```')[0]
    words = shlex.split(' '.join(l.rstrip('\\') for l in block.splitlines() if not l.startswith('#')))
    rdzv = words[1:words.index('train.py')]
    assert words[0] == 'torchrun' and '--nproc_per_node=8' in rdzv and '--rdzv_endpoint=node01:29500' in rdzv, rdzv
    local = {'--nproc_per_node=8': '--nproc_per_node=1', '--rdzv_endpoint=node01:29500': f'--rdzv_endpoint=127.0.0.1:{port}'}
    rdzv = [local.get(w, w) for w in rdzv]
    m = re.search(r'`--node_rank=0` on node01 and\s+`--node_rank=1` on node02, each with `(--master_addr=node01) '
                  r'(--master_port=29500)`', section)
    assert m is not None, 'the README\'s static alternative changed: update this test'
    static = [w for w in rdzv if not w.startswith('--rdzv')] + ['--master_addr=127.0.0.1', f'--master_port={static_port}']
    return rdzv, [[*static, f'--node_rank={r}'] for r in (0, 1)]


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_nodes(node_args, train_args, tmp_path, name):
    """One torchrun agent per node, outputs in tmp_path/name-N.txt: [(process, output path)]."""
    env = dict(os.environ, OMP_NUM_THREADS='1', EDM_DISTILL_TIMEOUT_MIN='1')
    nodes = []
    for i, args in enumerate(node_args):
        out = tmp_path / f'{name}-{i}.txt'
        with open(out, 'w') as f:
            nodes.append((subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', *args, 'train.py', *train_args],
                                           cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), out))
    return nodes


def wait_nodes(nodes, timeout):
    """The agents' exit codes and their outputs joined; every process is killed after `timeout` seconds."""
    deadline = time.time() + timeout
    codes = []
    for p, _out in nodes:
        try:
            codes.append(p.wait(timeout=max(deadline - time.time(), 0.1)))
        except subprocess.TimeoutExpired:
            kill_with_children(p.pid)
            codes.append(None)
    return codes, '\n'.join(out.read_text() for _p, out in nodes)


def test_two_nodes_equal_one_process_and_stop_together(tmp_path, monkeypatch):
    """Two torchrun agents as two nodes (c10d rendezvous, then the static form; gloo, with the stop agreement's own
    gloo group): SIGTERM to one node's agent stops both with one training state, and the resumed run ends bitwise
    equal to one process with the same global batch (split in two accumulation rounds, as the two nodes split it)."""
    from dataset_tool import save_dataset
    from training import training_loop as loop_module
    rng = np.random.default_rng(0)
    save_dataset(str(tmp_path / 'data.zip'), [rng.integers(0, 256, [8, 8, 3], dtype=np.uint8) for _ in range(16)],
                 [i % 4 for i in range(16)])
    steps = 12
    args = [f'--data={tmp_path / "data.zip"}', '--cond=1', '--cbase=16', '--cres=1', '--dropout=0.13', '--augment=0.5',
            '--batch=8', f'--duration={(steps * 8 - 0.5) * 1e-6}', '--tick=0.008', '--snap=1000', '--dump=1000',
            '--workers=0', '--device=cpu', '--seed=1', '--nosubdir']
    rdzv, static = readme_node_commands(free_port(), free_port())
    nodes = start_nodes([rdzv, rdzv], [f'--outdir={tmp_path / "two"}', *args], tmp_path, 'cut')
    while not any(l.startswith('tick ') for _p, out in nodes for l in out.read_text().splitlines()):
        assert all(p.poll() is None for p, _out in nodes), 'a node ended before training'
        time.sleep(0.05)
    nodes[1][0].send_signal(signal.SIGTERM)  # to the agent, which passes it to its worker
    codes, out = wait_nodes(nodes, timeout=60)  # torchrun exits with 1 for its worker's 75 (README, exit codes)
    assert codes == [1, 1] and f'resume with --resume={tmp_path / "two"}' in out, (codes, out[-3000:])
    cut = torch.load(loop_module.find_latest_state(str(tmp_path / 'two')), weights_only=True)
    assert cut['world_size'] == 2 and 0 < cut['step'] < steps

    nodes = start_nodes(static, [f'--outdir={tmp_path / "two"}', f'--resume={tmp_path / "two"}', *args], tmp_path,
                        'resume')
    # Meanwhile (it only overlaps the resume's start), one process in this one.
    monkeypatch.setattr(loop_module, 'training_loop', functools.partial(loop_module.training_loop, preview_grid=0))
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "one"}', '--batch-gpu=4', *args])
    assert r.exit_code == 0, r.output
    one = torch.load(loop_module.find_latest_state(str(tmp_path / 'one')), weights_only=True)
    codes, out = wait_nodes(nodes, timeout=60)
    assert codes == [0, 0], (codes, out[-3000:])
    two = torch.load(loop_module.find_latest_state(str(tmp_path / 'two')), weights_only=True)
    assert two['step'] == steps and tensors(one['method']).keys() == tensors(two['method']).keys()
    for k, v in tensors(one['method']).items():
        assert torch.equal(v, tensors(two['method'])[k]), k


def tensors(tree, prefix=''):
    """{dotted path: tensor} of nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, sub in items for k, v in tensors(sub, f'{prefix}.{key}').items()}
