"""LPIPS-VGG, L2 and pseudo-Huber distances against direct computations written independently here."""

import pytest
import requests
import torch
import torch.nn.functional as F

from conftest import _VGG_CFG
from training import distances


def reference_lpips(x, y, vgg, lin):
    """LPIPS written from the paper: scale, VGG taps before each pool and at the end, normalise, weigh, average."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    def taps(h):
        out, index = [], 0
        for v in _VGG_CFG:
            if v == 'M':
                out.append(h)
                h = F.max_pool2d(h, 2)
                index += 1
            else:
                h = F.relu(F.conv2d(h, vgg[f'features.{index}.weight'], vgg[f'features.{index}.bias'], padding=1))
                index += 2
        return out + [h]
    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(zip(taps((x - shift) / scale), taps((y - shift) / scale))):
        a = a / (torch.sqrt((a ** 2).sum(1, keepdim=True)) + 1e-10)
        b = b / (torch.sqrt((b ** 2).sum(1, keepdim=True)) + 1e-10)
        w = lin[f'lin{k}.model.1.weight'].view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean([1, 2])
    return total


def images(n, c=3, res=16, seed=1):
    return torch.rand([n, c, res, res], generator=torch.Generator().manual_seed(seed)) * 2 - 1

# ----------------------------------------------------------------------------

def test_lpips_matches_reference_and_keys(weight_files):
    net = distances.LPIPS(vgg=weight_files['vgg_path'], lin=weight_files['lin_path'])
    x, y = images(3, seed=1), images(3, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(net(x, y), reference_lpips(x, y, weight_files['vgg'], weight_files['lin']),
                                   rtol=1e-5, atol=1e-6)
    stages = ['1_1', '1_2', '2_1', '2_2', '3_1', '3_2', '3_3', '4_1', '4_2', '4_3', '5_1', '5_2', '5_3']
    expected = [f'conv{s}.{p}' for s in stages for p in ('weight', 'bias')] + [f'lin{k}.weight' for k in range(5)]
    assert list(net.state_dict().keys()) == expected


def test_lpips_resize_and_grayscale(weight_files):
    net = distances.LPIPS(vgg=weight_files['vgg_path'], lin=weight_files['lin_path'], resolution=32)
    x, y = images(2, c=1, seed=3), images(2, c=1, seed=4)
    up = lambda z: F.interpolate(z.repeat(1, 3, 1, 1), size=(32, 32), mode='bilinear', align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(net(x, y), reference_lpips(up(x), up(y), weight_files['vgg'], weight_files['lin']),
                                   rtol=1e-5, atol=1e-6)


def test_lpips_properties_and_gradients(weight_files):
    net = distances.make_distance('lpips', vgg=weight_files['vgg_path'], lin=weight_files['lin_path'])
    x, y = images(4, seed=5).requires_grad_(True), images(4, seed=6)
    d = net(x, y)
    assert d.shape == (4,) and (d > 0).all()
    torch.testing.assert_close(d, net(y, x.detach()), rtol=1e-6, atol=0)
    assert (net(y, y) == 0).all()
    d.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in net.parameters())


def test_lpips_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path))
    def offline(*args, **kwargs):
        raise requests.ConnectionError('network is unreachable')
    monkeypatch.setattr(requests.Session, 'get', offline)
    with pytest.raises(OSError) as e:
        distances.LPIPS()
    msg = str(e.value)
    assert '\n' not in msg
    assert distances.VGG16_URL in msg and distances.LPIPS_VGG_URL in msg and 'pip install --no-deps lpips' in msg


def test_lpips_wrong_file(weight_files):
    with pytest.raises(ValueError, match='features.0.weight'):
        distances.LPIPS(vgg=weight_files['lin_path'], lin=weight_files['lin_path'])
    with pytest.raises(ValueError, match='lin0.model.1.weight'):
        distances.LPIPS(vgg=weight_files['vgg_path'], lin=weight_files['vgg_path'])


def test_l2_and_pseudo_huber():
    x, y = images(3, seed=7), images(3, seed=8)
    d = 3 * 16 * 16
    torch.testing.assert_close(distances.make_distance('l2')(x, y), ((x - y) ** 2).mean(dim=[1, 2, 3]))
    # Constant difference a in every entry: |x - y|^2 = d a^2, so the distance is sqrt(d a^2 + c^2) - c.
    a = torch.tensor([0.0, 1e-4, 0.5]).view(3, 1, 1, 1)
    c = 0.00054 * d ** 0.5
    expected = torch.sqrt(d * a.flatten() ** 2 + c ** 2) - c
    torch.testing.assert_close(distances.make_distance('pseudo_huber')(x + a, x), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match='pseudo_huber'):
        distances.make_distance('l1')
