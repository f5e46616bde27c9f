"""plot.py (run directory -> PNG) and train.py --tensorboard (event files with stats.jsonl's numbers)."""

import glob
import json
import math
import os
import sys

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import plot
import train
from test_dmd import DMD_ARGS


def stat(mean):
    return dict(num=4, mean=mean, std=0.0)


def write_run(path, torn_last_line=True):
    """A run directory with three ticks (one loss all non-finite in the second), an FID and a PR metric file."""
    os.makedirs(path)
    ticks = [{'Progress/kimg': stat(k), 'Loss/G_dm': stat(g), 'Loss/fake': stat(f), 'Timing/sec_per_kimg': stat(t),
              'Timing/maintenance_sec': stat(0.5), 'timestamp': 1.0}
             for k, g, f, t in [(1, 0.5, 0.2, 10), (2, None, 0.1, 11), (3, 0.3, 0.05, 12)]]
    ticks[1]['Loss/G_dm']['nonfinite'] = 4
    ticks[1]['Loss/G_reg'] = stat(0.7)  # reported in one tick only
    text = ''.join(json.dumps(t) + '\n' for t in ticks) + ('{"Progress/kimg": {"num"' if torn_last_line else '')
    (path / 'stats.jsonl').write_text(text)
    (path / 'metric-fid1k.jsonl').write_text(''.join(json.dumps(dict(kimg=k, results=dict(fid1k=v), timestamp=0)) + '\n'
                                                     for k, v in [(1, 30.0), (3, 20.0)]))
    (path / 'metric-pr1k.jsonl').write_text(json.dumps(dict(kimg=3, results=dict(pr1k_precision=0.7, pr1k_recall=0.4),
                                                            timestamp=0)) + '\n')
    return path


def same(a, b):
    return len(a) == len(b) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))


def test_read_run_series_nulls_and_torn_lines(tmp_path):
    run = plot.read_run(write_run(tmp_path / 'run'))
    x, y = run['stats']['Loss/G_dm']
    assert x == [1, 2, 3] and same(y, [0.5, math.nan, 0.3])  # null: a gap
    assert run['stats']['Loss/fake'] == ([1, 2, 3], [0.2, 0.1, 0.05]) and run['stats']['Loss/G_reg'] == ([2], [0.7])
    assert run['metrics'] == {'fid1k': dict(kimg=[1, 3], fid1k=[30.0, 20.0]),
                              'pr1k': dict(kimg=[3], pr1k_precision=[0.7], pr1k_recall=[0.4])}
    # A bad line that is not the last one is an error naming it.
    bad = tmp_path / 'bad'
    write_run(bad, torn_last_line=False)
    lines = (bad / 'stats.jsonl').read_text().splitlines()
    (bad / 'stats.jsonl').write_text('\n'.join([lines[0], 'garbage', *lines[1:]]) + '\n')
    with pytest.raises(ValueError, match='line 2 is not JSON'):
        plot.read_run(bad)


def test_cli_writes_one_png_with_a_panel_each(tmp_path):
    run_dir = write_run(tmp_path / 'run')
    r = CliRunner().invoke(plot.main, [f'--run={run_dir}'])
    assert r.exit_code == 0 and r.output == f'Wrote "{run_dir / "plot.png"}"\n', r.output
    with PIL.Image.open(run_dir / 'plot.png') as image:
        # Four panels (losses, fid1k, pr1k, timing) in 3 columns of 4.2 x 3.2 inches, 2 rows, at 80 dpi.
        assert image.format == 'PNG' and image.size == (1008, 512)
        assert len(image.convert('RGB').getcolors(1 << 16)) > 10  # drawn, not blank
    assert sorted(os.listdir(run_dir)) == ['metric-fid1k.jsonl', 'metric-pr1k.jsonl', 'plot.png', 'stats.jsonl']


def test_resume_truncates_metric_files_like_stats(tmp_path):
    """A resume from the state at 2 kimg drops the metric lines logged after it, as it drops stats.jsonl's."""
    from training.training_loop import _truncate_stats
    run_dir = write_run(tmp_path / 'run', torn_last_line=False)
    for name in ('stats.jsonl', 'metric-fid1k.jsonl', 'metric-pr1k.jsonl'):
        _truncate_stats(run_dir / name, 2000)
    run = plot.read_run(run_dir)
    assert run['stats']['Progress/kimg'][0] == [1, 2] and run['metrics'] == {'fid1k': dict(kimg=[1], fid1k=[30.0]), 'pr1k': dict(kimg=[])}


def test_cli_errors_are_one_line(tmp_path, monkeypatch):
    r = CliRunner().invoke(plot.main, [f'--run={tmp_path}'])
    assert r.exit_code == 1 and r.output == f'Error: No stats.jsonl in "{tmp_path}": pass a run directory of train.py\n'
    (tmp_path / 'stats.jsonl').write_text('')
    r = CliRunner().invoke(plot.main, [f'--run={tmp_path}'])
    assert r.exit_code == 1 and 'has no ticks yet' in r.output
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as if not installed
    r = CliRunner().invoke(plot.main, [f'--run={write_run(tmp_path / "run")}'])
    assert r.exit_code == 1 and r.output == 'Error: plot.py needs matplotlib: pip install matplotlib\n'

def test_hlines_are_drawn_in_their_curves_panel_and_colour(tmp_path, monkeypatch):
    import matplotlib.axes
    drawn, axhline = [], matplotlib.axes.Axes.axhline
    def record(ax, y, **kwargs):
        drawn.append((ax, y, kwargs))
        return axhline(ax, y, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, 'axhline', record)
    run_dir = write_run(tmp_path / 'run')
    r = CliRunner().invoke(plot.main, [f'--run={run_dir}', '--hline=fid1k:teacher=25', '--hline=pr1k_recall:teacher=0.5',
                                       '--hline=fid1k:floor=12.5', '--hline=G_dm:floor=1e-1'])
    assert r.exit_code == 0, r.output
    got = [(ax.get_title(), y, kwargs['linestyle'], kwargs['label']) for ax, y, kwargs in drawn]
    # Each in the panel of its curve; one line style per label, in the order the labels were first given.
    assert got == [('losses', 0.1, ':', 'floor 0.1'), ('fid1k', 25.0, '--', 'teacher 25'),
                   ('fid1k', 12.5, ':', 'floor 12.5'), ('pr1k', 0.5, '--', 'teacher 0.5')]
    for ax, _, kwargs in drawn:  # in the colour of the curve it refers to
        curve = {line.get_label(): line.get_color() for line in ax.get_lines()}
        name = {'fid1k': 'fid1k', 'pr1k': 'pr1k_recall', 'losses': 'G_dm'}[ax.get_title()]
        assert kwargs['color'] == curve[name]


@pytest.mark.parametrize('hline, message', [
    ('fid1k=25', '--hline="fid1k=25" is not NAME:LABEL=VALUE with a finite VALUE, e.g. --hline=fid2k:teacher=1.81'),
    ('fid1k:teacher=nan', '--hline="fid1k:teacher=nan" is not NAME:LABEL=VALUE with a finite VALUE, e.g. --hline=fid2k:teacher=1.81'),
    ('fid1k:teacher=x', '--hline="fid1k:teacher=x" is not NAME:LABEL=VALUE with a finite VALUE, e.g. --hline=fid2k:teacher=1.81'),
    ('fid50k:teacher=2', '--hline names "fid50k", which this run does not plot; its curves are G_dm, G_reg, fake, fid1k, '
                         'maintenance_sec, pr1k_precision, pr1k_recall, sec_per_kimg'),
])
def test_hline_errors_are_one_line(tmp_path, hline, message):
    run_dir = write_run(tmp_path / 'run')
    r = CliRunner().invoke(plot.main, [f'--run={run_dir}', f'--hline={hline}'])
    assert r.exit_code == 1 and r.output == f'Error: {message}\n'
    assert not (run_dir / 'plot.png').exists()


# ----------------------------------------------------------------------------

def scalars(run_dir):
    """{tag: [(step, value)]} of a run directory's event files, as TensorBoard shows them (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def test_tensorboard_events_equal_stats_and_resume_hides_dropped_ticks(teacher_pkl, tmp_path):
    np.savez(tmp_path / 'ref.npz', mu=np.zeros(192), sigma=np.eye(192))
    args = [f'--outdir={tmp_path}', f'--teacher={teacher_pkl}', '--nosubdir', *DMD_ARGS, '--tensorboard',
            '--metrics=fid1k', f'--ref={tmp_path / "ref.npz"}', '--detector=pixels']
    r = CliRunner().invoke(train.main, [*args, '--duration=0.000016'], catch_exceptions=False)  # 2 ticks of 8
    assert r.exit_code == 0, r.output
    state = tmp_path / 'state-16.pt'
    os.rename(tmp_path / 'training-state-000000.pt', state)
    os.rename(tmp_path / 'training-state-000000.pt.sha256', f'{state}.sha256')  # a state moves with its checksum file
    r = CliRunner().invoke(train.main, [*args, '--duration=0.000024', f'--resume={state}'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    expected = {}
    for tick in stats:
        for name, value in tick.items():
            if name != 'timestamp':
                expected.setdefault(name, []).append((round(tick['Progress/kimg']['mean'] * 1000), value['mean']))
    got = scalars(tmp_path)
    assert got.keys() == expected.keys() and [step for step, _ in got['Loss/G_dm']] == [8, 16, 24]
    for name in expected:
        assert got[name] == [(step, pytest.approx(v, rel=1e-6)) for step, v in expected[name]]  # float32 in events

    # As if killed after the third tick's statistics but before its state: resuming from the state at 16 images
    # drops that tick from stats.jsonl, TensorBoard hides its events (purge_step), and the resumed run logs it again.
    r = CliRunner().invoke(train.main, [*args, '--duration=0.000024', f'--resume={state}'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 3
    assert [step for step, _ in scalars(tmp_path)['Loss/G_dm']] == [8, 16, 24]
    assert [json.loads(line)['kimg'] for line in open(tmp_path / 'metric-fid1k.jsonl')] == [0.008, 0.016, 0.024]


def test_tensorboard_missing_is_one_line_before_any_directory(teacher_pkl, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if tensorboard were not installed
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--teacher={teacher_pkl}', *DMD_ARGS,
                                        '--tensorboard'])
    assert r.exit_code == 1 and r.output.splitlines()[-1] == ('Error: --tensorboard needs the tensorboard package: '
                                                              'pip install tensorboard'), r.output
    assert not (tmp_path / 'runs').exists() and not glob.glob(str(tmp_path / '**' / 'events.*'), recursive=True)
