"""The importable API: generate.load_network / generate_batch / save_image_grid give what generate.py writes, students
load by URL, and `pip install -e .` makes the modules importable from any directory."""

import os
import shutil
import subprocess
import sys
import tomllib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import generate
from test_disback import CountingServer
from test_generate import ONE_STEP, tiny_net, write_pkl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = list(range(6))


@pytest.fixture
def student_pkl(tmp_path):
    """A one-step conditional student snapshot: its sampling spec travels with it."""
    net = tiny_net(label_dim=4, seed=5)
    net.sampling_spec = dict(ONE_STEP)
    return write_pkl(tmp_path / 'student.pkl', net)


def cli_images(network, outdir, *extra):
    result = CliRunner().invoke(generate.main, ['--network', str(network), '--outdir', str(outdir), '--seeds', '0-5',
                                                '--batch', '4', '--device', 'cpu', *extra])
    assert result.exit_code == 0, result.output
    return np.stack([np.asarray(PIL.Image.open(generate.image_path(outdir, s))).transpose(2, 0, 1) for s in SEEDS])


def test_api_returns_what_generate_py_writes(student_pkl, tmp_path):
    net = generate.load_network(student_pkl)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert np.array_equal(generate.generate_batch(net, SEEDS).numpy(), cli_images(student_pkl, tmp_path / 'random'))
    # One class for all seeds, or one per seed: image k depends only on seed k and its class.
    by_class = {c: cli_images(student_pkl, tmp_path / f'class{c}', '--class', str(c)) for c in (1, 3)}
    assert np.array_equal(generate.generate_batch(net, SEEDS, class_idx=1).numpy(), by_class[1])
    classes = [1, 3, 3, 1, 1, 3]
    mixed = generate.generate_batch(net, SEEDS, class_idx=classes).numpy()
    assert all(np.array_equal(mixed[k], by_class[c][k]) for k, c in enumerate(classes))
    with pytest.raises(ValueError, match='2 classes for 6 seeds'):
        generate.generate_batch(net, SEEDS, class_idx=[1, 2])
    with pytest.raises(ValueError, match='--class=4 is out of range'):
        generate.generate_batch(net, SEEDS, class_idx=[1, 2, 3, 4, 0, 0])


def test_student_by_url_file_and_http(student_pkl, tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    expected = cli_images(student_pkl, tmp_path / 'local')
    assert np.array_equal(cli_images(f'file://{student_pkl}', tmp_path / 'file'), expected)
    server = CountingServer(student_pkl, delay=0)
    try:
        url = server.url.replace('teacher.pkl', 'student.pkl')
        assert np.array_equal(cli_images(url, tmp_path / 'http'), expected)
        assert np.array_equal(generate.generate_batch(generate.load_network(url), SEEDS).numpy(), expected)
        assert server.gets == 1  # the second load reads the download cache
    finally:
        server.close()


NOTEBOOK = '''
import sys
import generate                                                           # from site-packages, not from this folder
net = generate.load_network(sys.argv[1], device='cpu')                    # a one-step student: snapshot path or URL
images = generate.generate_batch(net, seeds=list(range(6)), device='cpu', class_idx=[1, 3, 3, 1, 1, 3])
generate.save_image_grid(images, 'grid.png', grid_w=3, grid_h=2)
print(generate.__file__)
'''


def test_editable_install_imports_from_any_directory(student_pkl, tmp_path):
    """`pip install -e .` into a fresh virtual environment (system packages visible, so torch is not reinstalled;
    no network: no index, no build isolation), then the README's notebook lines in another directory."""
    src = tmp_path / 'src'  # a copy of what pyproject.toml names, so the install writes nothing into the checkout
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        setup = tomllib.load(f)['tool']['setuptools']
    for package in (p for p in setup['packages'] if '.' not in p):
        shutil.copytree(os.path.join(REPO, package), src / package, ignore=shutil.ignore_patterns('__pycache__'))
    for name in ['pyproject.toml'] + [f'{m}.py' for m in setup['py-modules']]:
        shutil.copy(os.path.join(REPO, name), src / name)
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--system-site-packages', '--without-pip', str(venv)], check=True)
    python = str(venv / 'bin' / 'python')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    install = subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-build-isolation',
                              '-e', str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / 'notebook'
    elsewhere.mkdir()
    (elsewhere / 'notebook.py').write_text(NOTEBOOK)
    run = subprocess.run([python, 'notebook.py', student_pkl], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(src / 'generate.py')
    # The grid holds what generate.py writes for those seeds and classes, row by row.
    by_class = {c: cli_images(student_pkl, tmp_path / f'class{c}', '--class', str(c)) for c in (1, 3)}
    expected = np.stack([by_class[c][k] for k, c in enumerate([1, 3, 3, 1, 1, 3])])
    grid = np.asarray(PIL.Image.open(elsewhere / 'grid.png'))
    assert np.array_equal(grid, expected.reshape(2, 3, 3, 8, 8).transpose(0, 3, 1, 4, 2).reshape(16, 24, 3))


def test_api_and_generate_py_sample_a_use_fp16_student_alike(tmp_path, monkeypatch):
    """One code path for EDM's rule (networks.edm_precision: use_fp16 means fp16 on CUDA): generate_batch outside any
    precision block and generate.py's --precision=auto run a use_fp16 student the same way. The CUDA answer is
    emulated on the CPU by a reduced precision CPU autocast has (bf16): the images agree bitwise, and differ from
    fp32's, so both did go through the rule."""
    from training import networks
    net = tiny_net(label_dim=4, seed=5)
    net.use_fp16 = True
    net.sampling_spec = dict(ONE_STEP)
    pkl = write_pkl(tmp_path / 'fp16-student.pkl', net)
    fp32 = cli_images(pkl, tmp_path / 'fp32', '--precision=fp32')
    monkeypatch.setattr(networks, 'edm_precision', lambda net, device: 'bf16' if net.use_fp16 else 'fp32')
    api = generate.generate_batch(generate.load_network(pkl), SEEDS).numpy()
    assert np.array_equal(api, cli_images(pkl, tmp_path / 'auto'))
    assert not np.array_equal(api, fp32)
