"""training/networks_edm2.py against the reference EDM2 (NVlabs/edm2 4bf8162): golden outputs in eval and train mode,
forced weight normalisation, state-dict keys, the magnitude-preserving primitives' formulas, precision."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training import networks, networks_edm2

FIXTURES = Path(__file__).parent / 'fixtures' / 'edm2'
CONFIGS = json.loads((FIXTURES / 'edm2_golden.json').read_text())['configs']
_golden = np.load(FIXTURES / 'edm2_golden.npz')


def golden(cfg, group):
    """{name: tensor} of `<cfg>/<group>/<name>` in the golden file."""
    prefix = f'{cfg}/{group}/'
    return {k[len(prefix):]: torch.from_numpy(_golden[k]) for k in _golden.files if k.startswith(prefix)}


def golden_net(cfg):
    """The reference network of config `cfg`: built from its keywords, stored weights loaded strictly."""
    net = networks_edm2.Precond(**CONFIGS[cfg]['precond_kwargs'])
    net.load_state_dict(golden(cfg, 'sd'), strict=True)
    return net


def _forward(net, cfg):
    inputs = golden(cfg, 'in')
    F_x = {}
    hook = net.unet.register_forward_hook(lambda mod, args, out: F_x.setdefault('F_x', out))
    D_x, logvar = net(inputs['x'], inputs['sigma'], inputs.get('class_labels'), return_logvar=True)
    hook.remove()
    return D_x, logvar, F_x['F_x']

# ----------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', ['a', 'b', 'c'])
def test_golden_eval(cfg):
    net = golden_net(cfg).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        D_x, logvar, F_x = _forward(net, cfg)
    ref = golden(cfg, 'eval')
    torch.testing.assert_close(D_x, ref['D_x'], rtol=0, atol=1e-6)
    torch.testing.assert_close(logvar, ref['logvar'], rtol=0, atol=1e-6)
    torch.testing.assert_close(F_x, ref['F_x'], rtol=0, atol=1e-5)
    for k, v in net.state_dict().items():  # eval leaves the weights alone
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize('cfg', ['a', 'b', 'c'])
def test_golden_train_and_forced_weight_normalisation(cfg):
    net = golden_net(cfg).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        D_x, logvar, _ = _forward(net, cfg)
    ref = golden(cfg, 'train')
    torch.testing.assert_close(D_x, ref['D_x'], rtol=0, atol=1e-6)
    torch.testing.assert_close(logvar, ref['logvar'], rtol=0, atol=1e-6)
    after = net.state_dict()
    for k, v in golden(cfg, 'train_after').items():  # the reference's weights after one train-mode forward
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-7)
    # Every MPConv weight, logvar_linear's included, now holds normalize(stored); gains and buffers are unchanged.
    mpconv = {f'{name}.weight' for name, m in net.named_modules() if isinstance(m, networks_edm2.MPConv)}
    assert 'logvar_linear.weight' in mpconv and len(mpconv) > 10
    for k, v in after.items():
        if k in mpconv:
            torch.testing.assert_close(v, networks_edm2.normalize(before[k]), rtol=0, atol=1e-7)
        else:
            assert torch.equal(v, before[k]), k


def test_train_mode_allows_two_forwards_before_backward():
    # The in-place normalisation must not invalidate an earlier graph (e.g. a fake score evaluated twice per step).
    net = golden_net('a').train()
    x, sigma = golden('a', 'in')['x'], golden('a', 'in')['sigma']
    D_x, logvar = net(x, sigma, return_logvar=True)
    D_x2, logvar2 = net(x, sigma, return_logvar=True)
    (D_x.square().sum() + logvar.sum() + D_x2.square().sum() + logvar2.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_state_dict_keys_match_reference():
    ref = json.loads((FIXTURES / 'edm2_golden.json').read_text())
    for cfg in 'abc':
        keys = list(golden_net(cfg).state_dict())
        assert keys == [k[len(f'{cfg}/sd/'):] for k in _golden.files if k.startswith(f'{cfg}/sd/')]  # same order
    assert ref['reference']['commit'].startswith('4bf8162')

# ----------------------------------------------------------------------------
# Primitives against the paper's closed forms.

def test_primitives_closed_forms():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 5, 5, generator=g), torch.randn(2, 10, 5, 5, generator=g)
    # mp_sum: lerp over sqrt((1-t)^2 + t^2); mp_cat with t=0.5 and equal widths is plain concatenation.
    torch.testing.assert_close(networks_edm2.mp_sum(a, a * 0 + 1, 0.3), (0.7 * a + 0.3) / np.sqrt(0.49 + 0.09))
    torch.testing.assert_close(networks_edm2.mp_cat(a, a, t=0.5), torch.cat([a, a], dim=1))
    # mp_cat keeps unit magnitude: with unit-RMS inputs, the output's mean square is 1 for any t.
    ua, ub = a / a.square().mean().sqrt(), b / b.square().mean(dim=[0, 2, 3], keepdim=True).sqrt()
    out = networks_edm2.mp_cat(ua, ub, t=0.2)
    assert abs(out.square().mean().item() - 1) < 1e-5
    # resample: average pooling down, nearest-neighbour up.
    torch.testing.assert_close(networks_edm2.resample(a[..., :4, :4], mode='down'), torch.nn.functional.avg_pool2d(a[..., :4, :4], 2))
    torch.testing.assert_close(networks_edm2.resample(a, mode='up'), a.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    # normalize: eps + per-row RMS.
    w = torch.randn(3, 4, 2, 2, generator=g)
    torch.testing.assert_close(networks_edm2.normalize(w), w / (1e-4 + w.square().mean(dim=[1, 2, 3], keepdim=True).sqrt()))


def test_precision_autocast_and_fp32():
    net = golden_net('b').eval()
    inputs = golden('b', 'in')
    with torch.no_grad():
        ref = net(inputs['x'], inputs['sigma'], inputs['class_labels'])
        with networks.backbone_precision('bf16'):
            bf16 = net(inputs['x'], inputs['sigma'], inputs['class_labels'])
        with networks.backbone_precision('fp32'):
            fp32 = net(inputs['x'], inputs['sigma'], inputs['class_labels'])
    assert bf16.dtype == fp32.dtype == torch.float32
    assert torch.equal(fp32, ref)  # use_fp16 has no effect on the CPU, as in EDM2
    assert 0 < (bf16 - ref).abs().max() < 0.05  # autocast really ran in bfloat16, and stayed close


def test_backbone_precision_rules():
    # EDM2's rule (float16 main path for use_fp16 on CUDA) unless the run's --precision says otherwise; fp16 on a
    # use_fp16 network on CUDA is EDM2's own float16 path, every other bf16/fp16 choice autocasts.
    from types import SimpleNamespace as NS
    cuda, cpu = NS(device=NS(type='cuda')), NS(device=NS(type='cpu'))
    fp16_net, fp32_net = NS(use_fp16=True), NS(use_fp16=False)
    rule = networks_edm2._backbone_dtype
    with networks.backbone_precision(None):
        assert rule(fp16_net, cuda, False) == (torch.float16, None) and rule(fp16_net, cpu, False) == (torch.float32, None)
        assert rule(fp16_net, cuda, True) == (torch.float32, None)  # force_fp32
    with networks.backbone_precision('fp16'):
        assert rule(fp16_net, cuda, False) == (torch.float16, None) and rule(fp32_net, cuda, False) == (torch.float32, torch.float16)
    with networks.backbone_precision('bf16'):
        assert rule(fp16_net, cuda, False) == (torch.float32, torch.bfloat16)
    with networks.backbone_precision('fp32'):
        assert rule(fp16_net, cuda, False) == (torch.float32, None)
