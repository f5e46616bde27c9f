"""Sampling EDM2 networks: EDM2's defaults (32 Heun steps) and autoguidance, against the reference sampler's output
(NVlabs/edm2 generate_images.py at 4bf8162 on the fixture networks, tests/fixtures/edm2/README.md)."""

import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from test_networks_edm2 import FIXTURES, golden_net
from training import samplers

SAMPLER = np.load(FIXTURES / 'edm2_sampler_golden.npz')
SEEDS = [0, 1, 2, 3]


def nets():
    return [golden_net(cfg).eval().requires_grad_(False) for cfg in 'bc']


def assert_images_match(images, cfg):
    """uint8 images equal the reference's. Our sampler state is float64, the reference's float32 (they differ by ~2e-6
    in x), so a pixel whose reference value lies within 1e-5 of a quantisation step may be off by one."""
    ref, x = SAMPLER[f'{cfg}/uint8'], SAMPLER[f'{cfg}/x'].astype(np.float64)
    diff = np.abs(np.asarray(images, dtype=np.int64) - ref)
    v = x * 127.5 + 128
    on_edge = np.abs(v - np.round(v)) < 127.5 * 1e-5
    assert diff.max() <= 1 and not (diff[~on_edge]).any()


@pytest.mark.parametrize('num_steps, guidance', [(8, 1.0), (8, 1.7), (32, 1.0), (32, 1.7)])
def test_golden_edm2_sampler_with_autoguidance(num_steps, guidance):
    net, gnet = nets()
    pair = samplers.Autoguided(net, gnet, guidance)
    assert samplers.sampler_settings(pair)['num_steps'] == 32 and samplers.sampler_settings(net)['num_steps'] == 32
    cfg = f'steps{num_steps}_guidance{guidance}'
    rnd = samplers.StackedRandomGenerator('cpu', SEEDS)
    latents = rnd.randn([4, 3, 16, 16])
    labels = torch.eye(10)[rnd.randint(10, size=[4])]
    assert np.array_equal(latents.numpy(), SAMPLER['noise']) and np.array_equal(labels.numpy(), SAMPLER['labels'])
    x = samplers.sample(pair, latents, labels, rnd.randn_like, num_steps=None if num_steps == 32 else num_steps)
    np.testing.assert_allclose(x.numpy(), SAMPLER[f'{cfg}/x'], rtol=0, atol=1e-5)
    assert_images_match(generate.generate_batch(pair, SEEDS, num_steps=num_steps).numpy(), cfg)


def test_guidance_one_is_the_network_alone():
    net, gnet = nets()
    gnet.unet.out_gain.data.fill_(float('nan'))  # never evaluated at w = 1
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(samplers.Autoguided(net, gnet, 1.0)(x, torch.tensor([1.0, 2.0])), net(x, torch.tensor([1.0, 2.0])))


def test_cli_autoguidance_writes_the_reference_images(tmp_path):
    paths = []
    for name, net in zip(['net', 'gnet'], nets()):
        paths.append(tmp_path / f'{name}.pkl')
        paths[-1].write_bytes(pickle.dumps(dict(ema=net)))
    args = ['--network', paths[0], '--guide-net', paths[1], '--guidance', 1.7, '--steps', 8, '--seeds', '0-3',
            '--outdir', tmp_path / 'out', '--device', 'cpu']
    result = CliRunner().invoke(generate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    images = [np.asarray(PIL.Image.open(tmp_path / 'out' / f'{s:06d}.png')).transpose(2, 0, 1) for s in SEEDS]
    assert_images_match(np.stack(images), 'steps8_guidance1.7')


def test_cli_guide_net_errors(tmp_path):
    net, gnet = nets()
    (tmp_path / 'net.pkl').write_bytes(pickle.dumps(dict(ema=net)))
    base = ['--network', tmp_path / 'net.pkl', '--outdir', tmp_path / 'out', '--device', 'cpu', '--seeds', '0']
    result = CliRunner().invoke(generate.main, [str(a) for a in base + ['--guide-net', tmp_path / 'net.pkl']])
    assert result.exit_code == 1 and 'Error: --guide-net needs --guidance=W' in result.output
    other = golden_net('a')  # unconditional: a different task
    (tmp_path / 'other.pkl').write_bytes(pickle.dumps(dict(ema=other)))
    result = CliRunner().invoke(generate.main, [str(a) for a in base + ['--guide-net', tmp_path / 'other.pkl', '--guidance', 2]])
    assert result.exit_code == 1 and 'Cannot load guiding network' in result.output and 'same task' in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / 'out').exists()
