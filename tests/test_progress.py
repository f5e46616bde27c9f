"""Watching a run: the tick line's losses and ETA, running means across ranks, and the commands' progress bars (on a
terminal only, so logs stay clean)."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import dnnlib
import fid
import generate
import make_pairs
import toy
import train
from test_dmd import DMD_ARGS
from test_fid import random_images, write_images
from test_generate import tiny_net, write_pkl
from torch_utils import training_stats

# ----------------------------------------------------------------------------
# The tick line.

def test_loss_peek_without_resetting_and_flag_all_nonfinite():
    training_stats.collect()  # start clean
    training_stats.report('Loss/a', torch.tensor([1.0, 2.0, float('nan')]))
    training_stats.report('Loss/b', torch.tensor([float('inf')]))
    training_stats.report('Other/c', 5.0)
    peek = training_stats.collect(prefix='Loss/', reset=False)
    assert {name: v['mean'] for name, v in peek.items()} == {'Loss/a': 1.5, 'Loss/b': None}
    stats = training_stats.collect()  # untouched by the peek
    assert stats['Loss/a'] == dict(num=2, mean=1.5, std=0.5, nonfinite=1) and stats['Other/c']['mean'] == 5.0
    assert training_stats.collect(prefix='Loss/', reset=False) == {}


def test_tick_line_shows_the_methods_losses_and_the_eta(teacher_pkl, tmp_path):
    duration = 0.000024  # three ticks of 8 images
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', f'--duration={duration}',
                                        '--nosubdir', *DMD_ARGS], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    ticks = [line for line in r.output.splitlines() if line.startswith('tick ')]
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert len(ticks) == len(stats) == 3
    for line, s in zip(ticks, stats):
        losses = sorted(name for name in s if name.startswith('Loss/'))
        assert {'Loss/G_dm', 'Loss/fake'} <= set(losses)
        tokens = line.split('cpumem')[1].split()[1:]  # after cpumem's own value
        shown = list(zip(tokens[::2], tokens[1::2]))
        assert shown[:-1] == [(name[5:], f'{s[name]["mean"]:.4g}') for name in losses]
        remaining = max(duration * 1e6 - s['Progress/kimg']['mean'] * 1000, 0)
        assert shown[-1] == ('eta', dnnlib.util.format_time(remaining / 1000 * s['Timing/sec_per_kimg']['mean']))
    assert ticks[-1].endswith('eta 0s')

# ----------------------------------------------------------------------------
# Progress bars.

@pytest.fixture
def terminal(monkeypatch):
    """Pretend stdout and stderr are a terminal (under CliRunner they are not)."""
    monkeypatch.setattr(dnnlib.util, '_on_terminal', lambda: True)
    monkeypatch.delenv('TQDM_DISABLE', raising=False)
    monkeypatch.delenv('RANK', raising=False)


def bar_lines(result):
    """The completed tqdm bars on stderr: 'DESC: 100%|...| N/N [...]'."""
    return [part.strip() for part in re.split(r'[\r\n]', result.stderr) if re.search(r'100%\|.*\| \d+/\d+ \[', part)]


def run(cli, *args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_commands_show_progress_bars_on_a_terminal(tmp_path, terminal):
    pkl = write_pkl(tmp_path / 'net.pkl', tiny_net(label_dim=4))
    r = run(generate.main, '--network', pkl, '--outdir', tmp_path / 'out', '--seeds', '0-4', '--batch', 2,
            '--steps', 2, '--device', 'cpu')
    assert r.exit_code == 0 and bar_lines(r)[-1].startswith('Generating: 100%') and '5/5' in bar_lines(r)[-1], r.stderr
    assert 'Batch ' not in r.output  # the bar replaced the per-batch lines

    images = write_images(tmp_path / 'images', random_images(6, [3, 4, 4], seed=0))
    r = run(fid.main, 'ref', '--data', images, '--dest', tmp_path / 'ref.npz', '--detector', 'pixels', '--workers', 0)
    assert r.exit_code == 0 and '6/6' in bar_lines(r)[-1], r.stderr
    r = run(fid.main, 'pr', '--images', images, '--data', images, '--num-images', 6, '--detector', 'pixels',
            '--workers', 0)
    assert [line.split(':')[0] for line in bar_lines(r)][-2:] == ['Generated features', 'Real features'], r.stderr

    r = run(make_pairs.main, '--teacher', pkl, '--outdir', tmp_path / 'pairs', '--seeds', '0-4', '--shard-size', 2,
            '--steps', 2, '--device', 'cpu')
    assert r.exit_code == 0 and bar_lines(r)[-1].startswith('Making pairs: 100%') and '5/5' in bar_lines(r)[-1]
    assert 'Shard ' not in r.output

    arrays = np.random.default_rng(0).integers(0, 256, [3, 4, 4, 3], dtype=np.uint8)
    folder = tmp_path / 'folder'
    folder.mkdir()
    for i, a in enumerate(arrays):
        dataset_tool.PIL.Image.fromarray(a).save(folder / f'{i}.png')
    r = run(dataset_tool.main, '--source', folder, '--dest', tmp_path / 'ds.zip')
    assert r.exit_code == 0 and '3/3' in bar_lines(r)[-1], r.stderr

    r = run(toy.cli, 'build', '--outdir', tmp_path / 'toy', '--resolution', 4, '--channels', 1, '--K', 2,
            '--num-images', 10, '--fit-kimg', 0.006, '--fit-batch', 2, '--fit-channels', 4, '--fit-mult', 1)
    assert r.exit_code == 0 and bar_lines(r)[-1].startswith('Fitting: 100%') and '3/3' in bar_lines(r)[-1], r.stderr
    assert 'loss=' in bar_lines(r)[-1] and 'last loss' in r.stdout


@pytest.mark.parametrize('setting', ['not a terminal', 'TQDM_DISABLE=1', 'rank 1'])
def test_no_bars_in_logs_with_the_option_or_on_other_ranks(tmp_path, monkeypatch, setting):
    if setting != 'not a terminal':
        monkeypatch.setattr(dnnlib.util, '_on_terminal', lambda: True)
    if setting == 'TQDM_DISABLE=1':
        monkeypatch.setenv('TQDM_DISABLE', '1')
    if setting == 'rank 1':
        monkeypatch.setenv('RANK', '1')
    pkl = write_pkl(tmp_path / 'net.pkl', tiny_net())
    r = run(generate.main, '--network', pkl, '--outdir', tmp_path / 'out', '--seeds', '0-2', '--steps', 2,
            '--device', 'cpu')
    assert r.exit_code == 0 and r.stderr == '', r.stderr
    assert r.stdout.splitlines() == ['Generating 3 images to "' + str(tmp_path / 'out') + '" with 1 process(es), fp32...',
                                     'Done.']
