"""torch_utils/distributed.py and the command lines under torchrun: collective timeout, option names, rank 0 first."""

import contextlib
import datetime
import io
import os
import subprocess
import sys

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
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.delenv('EDM_DISTILL_TIMEOUT_MIN', raising=False)
    distributed.init('cpu')
    assert seen['timeout'] == datetime.timedelta(minutes=60) and seen['backend'] == 'gloo'
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
