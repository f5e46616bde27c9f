"""generate.py: seed lists, file layout and contents, error messages, sampling specs, golden images, torchrun."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from golden import build_golden_net, fill_golden_weights, golden_arrays, golden_config
from training import networks, samplers

REPO = Path(__file__).resolve().parents[1]
ONE_STEP = dict(solver='euler', grid='nested', num_steps=1, sigma_min=0.002, sigma_max=80.0, rho=7)
CHURN = dict(num_steps=3, S_churn=20, S_min=0.01, S_max=60, S_noise=1.007)


def tiny_net(label_dim=0, img_channels=3, seed=0):
    """An 8x8 SongUNet EDM network with random (not zero-initialised) weights, so outputs depend on everything."""
    net = networks.EDMPrecond(8, img_channels, label_dim=label_dim, model_type='SongUNet', model_channels=16,
                              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0)
    return fill_golden_weights(net, seed).eval().requires_grad_(False)


def write_pkl(path, net):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    return str(path)


def read_png(path):
    image = PIL.Image.open(path)
    return image.mode, np.asarray(image)


def run_cli(*args):
    return CliRunner().invoke(generate.main, [str(a) for a in args])

# ----------------------------------------------------------------------------
# Seeds.

def test_cli_malformed_seeds_is_a_usage_error(tmp_path):
    result = run_cli('--network', tmp_path / 'net.pkl', '--outdir', tmp_path / 'out', '--seeds', '0-x')
    assert result.exit_code == 2
    assert "Invalid value for '--seeds'" in result.output and 'malformed item "0-x"' in result.output
    assert not (tmp_path / 'out').exists()

# ----------------------------------------------------------------------------
# Errors.

def test_missing_or_corrupt_network_is_a_one_line_error(tmp_path):
    result = run_cli('--network', tmp_path / 'nope.pkl', '--outdir', tmp_path / 'out', '--device', 'cpu')
    assert result.exit_code == 1
    assert result.output.startswith('Error: Cannot load network') and 'No such file' in result.output
    assert result.output.count('\n') == 1
    (tmp_path / 'junk.pkl').write_bytes(b'this is not a pickle')
    result = run_cli('--network', tmp_path / 'junk.pkl', '--outdir', tmp_path / 'out', '--device', 'cpu')
    assert result.exit_code == 1 and 'corrupt or not a pickle' in result.output
    assert result.output.count('\n') == 1 and not (tmp_path / 'out').exists()


def test_class_on_unconditional_or_out_of_range_is_an_error(tmp_path):
    uncond = write_pkl(tmp_path / 'uncond.pkl', tiny_net())
    result = run_cli('--network', uncond, '--outdir', tmp_path / 'out', '--class', 0, '--device', 'cpu')
    assert result.exit_code == 1 and 'unconditional' in result.output and '--class' in result.output
    cond = write_pkl(tmp_path / 'cond.pkl', tiny_net(label_dim=4))
    result = run_cli('--network', cond, '--outdir', tmp_path / 'out', '--class', 4, '--device', 'cpu')
    assert result.exit_code == 1 and 'out of range' in result.output and '0..3' in result.output
    assert not (tmp_path / 'out').exists()


def test_bad_device_and_steps_fail_before_writing(tmp_path, monkeypatch):
    pkl = write_pkl(tmp_path / 'net.pkl', tiny_net())
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--steps', 1, '--device', 'cpu')
    assert result.exit_code == 1 and 'num_steps >= 2' in result.output and not (tmp_path / 'out').exists()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--device', 'cuda')
    assert result.exit_code == 2 and result.output.splitlines()[-1] == (
        "Error: Invalid value for '--device': CUDA is not available to this PyTorch (a CPU-only build, or no GPU); "
        "use --device=cpu") and not (tmp_path / 'out').exists()


def test_spec_conflicting_flag_is_an_error(tmp_path):
    net = tiny_net()
    net.sampling_spec = dict(ONE_STEP)
    pkl = write_pkl(tmp_path / 'student.pkl', net)
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--S_churn', 5, '--device', 'cpu')
    assert result.exit_code == 1 and "apply only to grid 'edm'" in result.output


def test_edm_ablation_options_bad_values(tmp_path):
    """--disc/--schedule/--scaling take EDM's choices (others are a usage error, exit 2), and only on grid 'edm'."""
    pkl = write_pkl(tmp_path / 'net.pkl', tiny_net())
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--disc', 'karras', '--device', 'cpu')
    assert result.exit_code == 2 and "Invalid value for '--disc'" in result.output
    net = tiny_net()
    net.sampling_spec = dict(ONE_STEP)
    pkl = write_pkl(tmp_path / 'student.pkl', net)
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--scaling', 'vp', '--device', 'cpu')
    assert result.exit_code == 1 and "apply only to grid 'edm'" in result.output
    assert not (tmp_path / 'out').exists()

# ----------------------------------------------------------------------------
# Outputs.

def test_subdirs_layout_and_pixels(tmp_path):
    net = tiny_net(label_dim=4, seed=1)
    pkl = write_pkl(tmp_path / 'net.pkl', net)
    out = tmp_path / 'out'
    result = run_cli('--network', pkl, '--outdir', out, '--seeds', '998-1001', '--subdirs', '--batch', 3,
                     '--steps', 3, '--S_churn', 20, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob('*') if p.is_file())
    assert files == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png']
    # Same batches as the CLI ([998, 999, 1000], [1001]), from the in-memory copy of the pickled network.
    expected = torch.cat([generate.generate_batch(net, [998, 999, 1000], 'cpu', num_steps=3, S_churn=20),
                          generate.generate_batch(net, [1001], 'cpu', num_steps=3, S_churn=20)])
    for image, seed in zip(expected, range(998, 1002)):
        mode, pixels = read_png(generate.image_path(out, seed, subdirs=True))
        assert mode == 'RGB' and np.array_equal(pixels, image.numpy().transpose(1, 2, 0))
    assert expected.float().std() > 20  # a real image, not a constant


def test_trust_pickle_runs_embedded_source_with_the_same_result(tmp_path):
    pkl = write_pkl(tmp_path / 'net.pkl', tiny_net(label_dim=4, seed=5))
    for outdir, flags in [('safe', []), ('trusted', ['--trust-pickle'])]:
        result = run_cli('--network', pkl, '--outdir', tmp_path / outdir, '--seeds', '7', '--steps', 2, '--device',
                         'cpu', *flags)
        assert result.exit_code == 0, result.output
    assert (tmp_path / 'safe' / '000007.png').read_bytes() == (tmp_path / 'trusted' / '000007.png').read_bytes()
    assert type(generate.load_network(pkl, allow_code=True)).__module__.startswith('_imported_module_')


def test_one_channel_images_are_mode_L(tmp_path):
    paths = generate.generate_images(tiny_net(img_channels=1), [3, 4], tmp_path, batch=2, num_steps=2)
    expected = generate.generate_batch(tiny_net(img_channels=1), [3, 4], 'cpu', num_steps=2)
    for path, image in zip(paths, expected):
        mode, pixels = read_png(path)
        assert mode == 'L' and np.array_equal(pixels, image[0].numpy())


def test_fixed_class_is_one_hot_and_keeps_the_noise_stream():
    calls = []
    class Recorder(torch.nn.Module):
        img_channels, img_resolution, label_dim, sigma_min, sigma_max = 3, 4, 5, 0, float('inf')
        def round_sigma(self, sigma):
            return torch.as_tensor(sigma)
        def forward(self, x, sigma, class_labels=None):
            calls.append((x.clone(), class_labels))
            return torch.zeros_like(x, dtype=torch.float32)
    generate.generate_batch(Recorder(), [0, 1], 'cpu', class_idx=2, **CHURN)
    generate.generate_batch(Recorder(), [0, 1], 'cpu', **CHURN)
    n = 2 * CHURN['num_steps'] - 1
    assert all(torch.equal(c[1], torch.eye(5)[[2, 2]]) for c in calls[:n])
    g = torch.Generator().manual_seed(0)
    torch.randn([3, 4, 4], generator=g)
    assert torch.equal(calls[n][1][0], torch.eye(5)[torch.randint(5, size=[], generator=g)])  # label after latents
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calls[:n], calls[n:]))  # same inputs with or without --class


def test_same_seed_alone_and_inside_a_batch():
    net = tiny_net(label_dim=4, seed=2)
    seeds = [11, 3, 500, 2 ** 32 + 7, 9]
    batch = generate.generate_batch(net, seeds, 'cpu', **CHURN)
    alone = torch.cat([generate.generate_batch(net, [s], 'cpu', **CHURN) for s in seeds])
    # Pixels agree; float32 CPU kernels may round differently by batch size, allow a rare 1-level flip.
    diff = (batch.int() - alone.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    assert torch.equal(alone[3], generate.generate_batch(net, [7], 'cpu', **CHURN)[0])  # seed % 2**32


def test_sampling_spec_is_honoured_without_flags(tmp_path):
    net = tiny_net(label_dim=4, seed=3)
    net.sampling_spec = dict(ONE_STEP)
    pkl = write_pkl(tmp_path / 'student.pkl', net)
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--seeds', '0-4', '--batch', 2, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    # One network evaluation per batch, on the loaded network.
    loaded = generate.load_network(pkl)
    assert loaded.sampling_spec == ONE_STEP
    calls = []
    loaded.register_forward_pre_hook(lambda module, args: calls.append(args[1]))
    paths = generate.generate_images(loaded, list(range(5)), tmp_path / 'again', batch=2)
    assert [float(s) for s in calls] == [80.0] * 3
    # Each image is the quantised D(80 z; 80, c) with z and c from the seed's generator.
    for seed, path in zip(range(5), paths):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn([1, 3, 8, 8], generator=g)
        c = torch.eye(4)[torch.randint(4, size=[1], generator=g)]
        D = net(80.0 * z, torch.tensor(80.0), c)
        expected = (D * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].numpy().transpose(1, 2, 0)
        assert np.array_equal(read_png(path)[1], expected)
        assert np.array_equal(read_png(tmp_path / 'out' / f'{seed:06d}.png')[1], expected)


def test_save_image_grid_layout(tmp_path):
    images = np.arange(6 * 3 * 2 * 4, dtype=np.uint8).reshape(6, 3, 2, 4)
    generate.save_image_grid(images, tmp_path / 'grid.png', grid_w=3, grid_h=2)
    mode, grid = read_png(tmp_path / 'grid.png')
    assert mode == 'RGB' and grid.shape == (4, 12, 3)
    for k in range(6):
        r, c = divmod(k, 3)
        assert np.array_equal(grid[r * 2 : (r + 1) * 2, c * 4 : (c + 1) * 4], images[k].transpose(1, 2, 0))
    with pytest.raises(ValueError, match='Expected 4 images'):
        generate.save_image_grid(images, tmp_path / 'bad.png', grid_w=2, grid_h=2)

# ----------------------------------------------------------------------------
# Reference images and processes.

def test_golden_heun_images():
    settings = {k: v for k, v in golden_config()['sampler'].items() if k not in ('network', 'note')}
    net = build_golden_net(golden_config()['sampler']['network'])
    ref = golden_arrays('sampler')
    images = generate.generate_batch(net, ref['seeds'].tolist(), 'cpu', **settings)
    diff = np.abs(images.numpy().transpose(0, 2, 3, 1).astype(int) - ref['images'].astype(int))
    # Observed: identical. Float kernels may differ from the reference machine's: allow rare 1-level flips.
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert samplers.sampler_settings(net, **settings)['solver'] == 'heun'


def test_ablation_defaults_reproduce_the_golden_heun_images(tmp_path):
    """EDM's ablation options at their defaults (--solver=heun --disc=edm --schedule=linear --scaling=none) give the
    default sampler's pixels bit for bit, hence EDM's reference images (churn on)."""
    settings = {k: v for k, v in golden_config()['sampler'].items() if k not in ('network', 'note')}
    net = build_golden_net(golden_config()['sampler']['network'])
    ref = golden_arrays('sampler')
    seeds = ref['seeds'].tolist()
    default = generate.generate_batch(net, seeds, 'cpu', **settings)
    explicit = generate.generate_batch(net, seeds, 'cpu', discretization='edm', schedule='linear', scaling='none',
                                       **dict(settings, solver='heun'))
    assert torch.equal(default, explicit)
    diff = np.abs(explicit.numpy().transpose(0, 2, 3, 1).astype(int) - ref['images'].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # as test_golden_heun_images


@pytest.mark.parametrize('args', [
    ['--disc', 'vp'], ['--disc', 've', '--schedule', 've'], ['--disc', 'iddpm', '--steps', '4'], ['--scaling', 'vp'],
    ['--solver', 'euler', '--disc', 'vp', '--schedule', 'vp', '--scaling', 'vp', '--steps', '8'],  # EDM README, Fig. 2a
])
def test_edm_ablation_options_reach_the_sampler(tmp_path, args):
    """generate.py --disc/--schedule/--scaling/--solver write what the sampler gives for those settings (their
    formulas are checked in closed form in tests/test_samplers.py), and differ from the default."""
    net = tiny_net(label_dim=4, seed=2)
    pkl = write_pkl(tmp_path / 'net.pkl', net)
    result = run_cli('--network', pkl, '--outdir', tmp_path / 'out', '--seeds', '0-1', '--steps', '5', *args, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    names = dict(disc='discretization', steps='num_steps')
    kwargs = {'num_steps': 5, **{names.get(k[2:], k[2:]): int(v) if k == '--steps' else v for k, v in zip(args[::2], args[1::2])}}
    expected = generate.generate_batch(net, [0, 1], 'cpu', **kwargs)
    for seed in [0, 1]:
        assert np.array_equal(read_png(tmp_path / 'out' / f'{seed:06d}.png')[1], expected[seed].numpy().transpose(1, 2, 0))
    assert not torch.equal(expected, generate.generate_batch(net, [0, 1], 'cpu', num_steps=kwargs['num_steps']))


def test_torchrun_two_processes_write_the_same_pngs(tmp_path):
    pkl = write_pkl(tmp_path / 'net.pkl', tiny_net(label_dim=4, seed=4))
    args = ['--network', pkl, '--seeds', '0-4', '--batch', '2', '--steps', '2', '--S_churn', '10', '--device', 'cpu']
    result = run_cli(*args, '--outdir', tmp_path / 'one')
    assert result.exit_code == 0, result.output
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           'generate.py', *args, '--outdir', str(tmp_path / 'two')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('Generating 5 images') == 1 and 'with 2 process(es)' in proc.stdout  # rank 0 prints
    one = sorted(os.listdir(tmp_path / 'one'))
    assert one == [f'{s:06d}.png' for s in range(5)] and sorted(os.listdir(tmp_path / 'two')) == one
    for name in one:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes()
