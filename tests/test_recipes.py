"""Every `train.py` recipe in the README and demo.sh runs with --dry-run (teachers by URL are not downloaded in a dry run),
and the printed config carries the settings written on the command line."""

import json
import os
import re
import shlex

import numpy as np
import pytest
from click.testing import CliRunner

import train
from dataset_tool import save_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands():
    """Shell commands inside ```bash blocks of README.md that run train.py (continuation lines joined)."""
    text = open(os.path.join(ROOT, 'README.md')).read()
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for cmd in block.replace('\\\n', ' ').splitlines():
            cmd = cmd.split('#')[0].strip()
            if re.search(r'\btrain\.py\b', cmd):
                commands.append(cmd)
    return commands


def demo_commands():
    """The train.py command of demo.sh (the README's first command), its shell variables filled in."""
    text = open(os.path.join(ROOT, 'demo.sh')).read().replace('\\\n', ' ')
    values = dict(re.findall(r'^(PY|OUT|TOY)=(\S+)', text, flags=re.M))
    for _ in range(2):  # TOY is defined through OUT
        text = re.sub(r'\$(PY|OUT|TOY)\b', lambda m: values[m.group(1)], text)
    return [line.strip() for line in text.splitlines() if re.match(r'\s*python3 train\.py', line)]


COMMANDS = readme_commands() + demo_commands()


def fake_dataset(tmp_path, path):
    """A two-image stand-in with the resolution and label count the dataset's name promises."""
    res = int(re.search(r'(\d+)x\d+', path).group(1))
    labels = {'cifar10': [0, 9], 'imagenet': [0, 999]}.get(os.path.basename(path).split('-')[0])
    dest = tmp_path / os.path.basename(path)
    if not dest.exists():
        save_dataset(str(dest), [np.zeros([res, res, 3], np.uint8)] * 2, labels)
    return str(dest)


def stand_in_file(tmp_path, arg):
    """A dry run only checks that local network (and --ref) files exist: make an empty one for paths the reader fills in."""
    m = re.fullmatch(r'--(teacher|guide|transfer|ref)=(?!https?://)(.+)', arg)
    if m is None or m.group(2) == 'null':
        return arg
    path = tmp_path / os.path.basename(m.group(2))
    path.touch()
    return f'--{m.group(1)}={path}'


def test_demo_command_is_found():
    [command] = demo_commands()
    assert '--method=dmd' in command and '--teacher=demo/toy/teacher-unet.pkl' in command and '$' not in command


def test_readme_has_recipes():
    methods = {re.search(r'--method=(\w+)', c).group(1) if '--method' in c else 'edm' for c in COMMANDS}
    assert {'edm', 'dmd', 'disback', 'pd', 'guided', 'kd', 'sid'} <= methods, methods


@pytest.mark.parametrize('command', COMMANDS, ids=[f'recipe{i}' for i in range(len(COMMANDS))])
def test_recipe_dry_run(command, tmp_path):
    args = shlex.split(command)
    args = args[args.index('train.py') + 1:]
    args = [f'--data={fake_dataset(tmp_path, a.split("=", 1)[1])}' if a.startswith('--data=') else a for a in args]
    args = [stand_in_file(tmp_path, a) for a in args]
    args = [a for a in args if not a.startswith('--outdir=')] + [f'--outdir={tmp_path / "runs"}', '--dry-run', '--device=cpu']
    r = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    c = json.loads(r.output.split('Training options:')[1].split('\nOutput directory')[0])
    given = dict(a[2:].split('=', 1) for a in args if a.startswith('--') and '=' in a)
    if 'batch' in given:
        assert c['batch_size'] == int(given['batch'])
    if 'lr' in given:
        m = c['method_kwargs']
        lr = m.get('lr', m.get('optimizer_kwargs', {}).get('lr'))
        assert lr == pytest.approx(float(given['lr']))
    if 'teacher' in given:
        assert c['teacher'] == given['teacher']
    assert not (tmp_path / 'runs').exists()
