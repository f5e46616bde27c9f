"""Command-line values: torch_utils/options.py's types, and a property test over every numeric option of every
command: random finite, non-finite and huge values end in exit code 0, 1 or 2 with at most one `Error:` line, no
traceback, and nothing written for a refused value."""

import importlib
import math
import os
import random
import re
import shutil
import tomllib

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dataset_tool import save_dataset
from torch_utils import options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# The types.

def test_float_refuses_non_finite_values_naming_the_option():
    @click.command()
    @click.option('--lr', type=options.Float(min=0, min_open=True))
    @click.option('--alpha', type=options.Float())
    def cmd(lr, alpha):
        click.echo(f'{lr} {alpha}')
    for args, line in [(['--lr=nan'], "Error: Invalid value for '--lr': 'nan' is not a finite number"),
                       (['--lr=inf'], "Error: Invalid value for '--lr': 'inf' is not a finite number"),
                       (['--lr=1e999'], "Error: Invalid value for '--lr': '1e999' is not a finite number"),
                       (['--alpha=-inf'], "Error: Invalid value for '--alpha': '-inf' is not a finite number"),
                       (['--lr=0'], "Error: Invalid value for '--lr': 0.0 is not in the range 0<x<=1000000000000.0."),
                       (['--alpha=-2e12'], "Error: Invalid value for '--alpha': -2000000000000.0 is not in the range "
                                           "-1000000000000.0<=x<=1000000000000.0.")]:
        r = CliRunner().invoke(cmd, args)
        assert r.exit_code == 2 and r.output.splitlines()[-1] == line, r.output
    r = CliRunner().invoke(cmd, ['--lr=1e-300', '--alpha=-1e12'])
    assert r.exit_code == 0 and r.output == '1e-300 -1000000000000.0\n'


def test_int_bounds():
    assert options.SEED.max == 2**32 - 1 and options.Int(min=1).max == 2**31 - 1  # seeds as EDM's: numpy's 32-bit
    @click.command()
    @click.option('--seed', type=options.SEED)
    def cmd(seed):
        click.echo(seed)
    assert CliRunner().invoke(cmd, [f'--seed={2**32 - 1}']).output == f'{2**32 - 1}\n'
    r = CliRunner().invoke(cmd, ['--seed=12345678901234567890123'])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == (
        "Error: Invalid value for '--seed': 12345678901234567890123 is not in the range 0<=x<=4294967295.")


def test_parse_int_list():
    assert options.parse_int_list('0-3,7') == [0, 1, 2, 3, 7]
    assert options.parse_int_list('5') == [5]
    assert options.parse_int_list('10-10, 2') == [10, 2]
    for bad, hint in [('', 'malformed'), ('1,,2', 'malformed'), ('a', 'malformed'), ('-1', 'malformed'),
                      ('1-2-3', 'malformed'), ('1.5', 'malformed'), ('3-1', 'smaller bound first')]:
        with pytest.raises(ValueError, match=hint):
            options.parse_int_list(bad)
    with pytest.raises(ValueError, match=r'"0-4294967296" in "0-4294967296" is outside \[0, 4294967295\]'):
        options.parse_int_list('0-4294967296', max=options.MAX_SEED)
    with pytest.raises(ValueError, match='"0-4294967295" has more than 16777216 items'):  # refused before it is made
        options.parse_int_list('0-4294967295', max=options.MAX_SEED)
    with pytest.raises(ValueError, match=r'"0" in "1,0" is outside \[1, 2147483647\]'):
        options.parse_int_list('1,0', min=1)


def test_cres_and_device_errors_name_the_option(tmp_path, monkeypatch):
    import train
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--cres=a,b', '--dry-run'])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == ("Error: Invalid value for '--cres': malformed item "
        "\"a\" in \"a,b\": use comma-separated non-negative integers and inclusive ranges, e.g. 0-63,100")
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # as a CPU-only build
    r = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', '--device=cuda'])
    assert r.exit_code == 2 and r.output.splitlines()[-1] == ("Error: Invalid value for '--device': CUDA is not "
        "available to this PyTorch (a CPU-only build, or no GPU); use --device=cpu")
    assert os.listdir(tmp_path) == []

# ----------------------------------------------------------------------------
# Every numeric option of every command.

def commands():
    """{'fid calc': click command, ...}: the leaf commands of every script of pyproject.toml's py-modules, from the
    entry point its `if __name__ == '__main__':` calls, so that a new script, subcommand or option is covered."""
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        scripts = tomllib.load(f)['tool']['setuptools']['py-modules']
    found = {}
    def walk(name, cmd):
        if isinstance(cmd, click.Group):
            for sub_name, sub in cmd.commands.items():
                walk(f'{name} {sub_name}', sub)
        else:
            found[name] = cmd
    for script in scripts:
        with open(os.path.join(ROOT, f'{script}.py')) as f:
            entry = re.search(r"^if __name__ == '__main__':\s*\n\s+(\w+)\(\)", f.read(), re.M).group(1)
        walk(script, getattr(importlib.import_module(script), entry))
    return found


def numeric_options(cmd):
    return [p for p in cmd.params if isinstance(p, click.Option) and isinstance(p.type, (click.types.IntParamType,
                                                                                           click.types.FloatParamType))]


def stop(*_args, **_kwargs):
    """Stands in for the function that starts a command's real work: the values got past every check before it."""
    raise click.exceptions.Exit(0)


@pytest.fixture(scope='module')
def files(tmp_path_factory, teacher_pkl):
    """A tiny labelled 8x8 dataset, reference statistics of its pixels and a toy problem's reference.npz."""
    root = tmp_path_factory.mktemp('inputs')
    images = np.random.default_rng(0).integers(0, 256, size=[8, 8, 8, 3], dtype=np.uint8)
    save_dataset(str(root / 'data.zip'), list(images), [i % 4 for i in range(8)], [f'c{i}' for i in range(4)])
    np.savez(root / 'ref.npz', mu=np.zeros(192), sigma=np.eye(192))
    return dict(data=str(root / 'data.zip'), ref=str(root / 'ref.npz'), teacher=str(teacher_pkl))


def setups(f, out):
    """{command: (arguments that reach the command's work, [(module, function) replaced by stop()])}."""
    import train
    return {
        'train': (lambda rnd: [f'--outdir={out}', f'--method={rnd.choice(sorted(train.METHODS))}', f'--data={f["data"]}',
                               f'--teacher={f["teacher"]}', '--device=cpu', '--dry-run'], []),
        'generate': (lambda rnd: [f'--network={f["teacher"]}', f'--outdir={out}', '--seeds=0-1', '--device=cpu'],
                     [('generate', 'generate_images')]),
        'make_pairs': (lambda rnd: [f'--teacher={f["teacher"]}', f'--outdir={out}', '--seeds=0-1', '--device=cpu'],
                       [('training.pairs', 'shards_to_make')]),
        'fid calc': (lambda rnd: [f'--images={f["data"]}', f'--ref={f["ref"]}', '--detector=pixels'], []),
        'fid ref': (lambda rnd: [f'--data={f["data"]}', f'--dest={out}/ref.npz', '--detector=pixels'], []),
        'fid is': (lambda rnd: [f'--images={f["data"]}', '--detector=pixels'], []),
        'fid pr': (lambda rnd: [f'--images={f["data"]}', f'--data={f["data"]}', '--detector=pixels'], []),
        'toy build': (lambda rnd: [f'--outdir={out}'], [('toy', 'build')]),
        'toy metrics': (lambda rnd: [f'--problem={out}', f'--network={f["teacher"]}'], [('toy', 'load_reference')]),
        'dataset_tool': (lambda rnd: [f'--source={f["data"]}', f'--dest={out}/data.zip'], [('dataset_tool', 'open_source')]),
    }


def values(param, rnd):
    """Random finite values in and around the option's range, non-finite ones and huge ones, as text."""
    if isinstance(param.type, click.types.FloatParamType):
        finite = [f'{rnd.choice([-1, 1]) * 10 ** rnd.uniform(-8, 8):.6g}' for _ in range(3)] + ['0']
        return finite + ['nan', 'inf', '-inf', 'NaN', '1e999', '1e308', '-1e308']
    finite = [str(rnd.randint(-5, 5)), str(rnd.randint(0, 2**rnd.randint(1, 40)))]
    return finite + [str(2**31), str(2**32), str(2**64), '1' + '0' * 22, '-' + '9' * 23, 'nan', '1e3']


def test_every_numeric_option_gives_a_clean_exit(files, tmp_path, monkeypatch):
    """For metric-time commands the work is stubbed out (stop()), train.py uses --dry-run: what is tested is every
    check between the command line and the work. Non-finite floats and ints past their bound are exit code 2 naming
    the option."""
    monkeypatch.setenv('TQDM_DISABLE', '1')
    monkeypatch.setattr('training.metrics.compute_feature_stats', stop)  # fid.py's work
    monkeypatch.setattr('training.metrics.compute_features', stop)
    out = tmp_path / 'out'
    found, table = commands(), setups(files, out)
    covered = {name for name, cmd in found.items() if numeric_options(cmd)}
    assert covered <= table.keys(), f'give these commands a setup here: {sorted(covered - table.keys())}'
    rnd = random.Random(0)
    checked = 0
    for name in sorted(covered):
        base, stubs = table[name]
        for module, function in stubs:
            monkeypatch.setattr(importlib.import_module(module), function, stop)
        for param in numeric_options(found[name]):
            if isinstance(param.type, click.types.FloatParamType):  # one type for every float option
                assert isinstance(param.type, options.Float), f'{name} {param.opts[0]}: use torch_utils.options.Float'
            else:
                assert param.type.max is not None, f'{name} {param.opts[0]}: give it an upper bound (options.Int)'
            for value in values(param, rnd):
                args = [*base(rnd), f'{param.opts[0]}={value}']
                r = CliRunner().invoke(found[name], args)
                what = f'{name} {" ".join(args)}:\n{r.output}'
                assert r.exception is None or isinstance(r.exception, SystemExit), what + repr(r.exception)
                assert r.exit_code in (0, 1, 2) and 'Traceback' not in r.output, what
                errors = [line for line in r.output.splitlines() if line.startswith('Error:')]
                assert len(errors) <= 1 and (r.exit_code == 0) == (not errors), what
                number = float(value)
                if (not math.isfinite(number) or (param.type.max is not None and number > param.type.max)
                        or (param.type.min is not None and number < param.type.min)):
                    assert r.exit_code == 2 and param.opts[0] in errors[0], what
                if r.exit_code != 0 or name == 'train':  # refused, or a dry run: nothing written
                    assert not out.exists(), what
                if out.exists():
                    shutil.rmtree(out)
                checked += 1
    assert checked > 500
