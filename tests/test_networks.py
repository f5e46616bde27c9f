"""training/networks.py against the reference EDM: golden outputs, state-dict layout, parameter counts, formulas."""

import ast
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from golden import FIXTURES, build_golden_net, golden_arrays, golden_config, golden_net_names
from training import networks, samplers

KEYS_DOC = FIXTURES / 'EDM_STATE_DICT_KEYS.md'

# ----------------------------------------------------------------------------
# Golden equivalence with the reference implementation.

@pytest.mark.parametrize('name', golden_net_names())
def test_golden_output(name):
    net = build_golden_net(name)
    a = {key: torch.from_numpy(value) for key, value in golden_arrays(name).items()}
    kwargs = dict(augment_labels=a['augment_labels']) if 'augment_labels' in a else {}
    with torch.no_grad():
        D = net(a['x'], a['sigma'], a.get('class_labels'), **kwargs)
    assert D.dtype == torch.float32
    # VP/VE/iDDPM outputs reach |D| ~ 150 (c_out = sigma = 30): float32 resolves them to ~1e-5, so atol scales with |D|.
    torch.testing.assert_close(D, a['D'], rtol=1e-4, atol=1e-5 * max(1.0, a['D'].abs().max().item()))


def test_golden_networks_are_the_five_listed():
    assert golden_net_names() == ['edm_dhariwal_16', 'edm_songunet_ddpmpp_32', 'iddpm_dhariwal_16',
                                  've_songunet_ncsnpp_16', 'vp_songunet_skip_16']
    assert golden_config()['sampler']['network'] == 'edm_songunet_ddpmpp_32'

# ----------------------------------------------------------------------------
# State-dict layout: exact keys, order and shapes of the networks listed in tests/fixtures/EDM_STATE_DICT_KEYS.md.

# [(constructor call text, tensor count, parameter count, [(key, shape)])] parsed from the markdown.
def _parse_keys_doc():
    sections = re.split(r'^## `(.+)`\s*$', KEYS_DOC.read_text(), flags=re.M)[1:]
    result = []
    for call, body in zip(sections[0::2], sections[1::2]):
        counts = re.search(r'^([\d,]+) tensors, ([\d,]+) parameters\.', body, flags=re.M)
        block = re.search(r'^```\n(.*?)^```', body, flags=re.M | re.S).group(1)
        keys = []
        for line in block.strip().splitlines():
            key, shape = line.split(' ', 1)
            keys.append((key, tuple(int(s) for s in shape.strip('[]').split(','))))
        result.append((call, int(counts.group(1).replace(',', '')), int(counts.group(2).replace(',', '')), keys))
    return result


# Build `Class(kw=literal, ...)` from the documented call text without eval.
def _construct(call):
    node = ast.parse(call, mode='eval').body
    return getattr(networks, node.func.id)(**{kw.arg: ast.literal_eval(kw.value) for kw in node.keywords})


KEYS_SECTIONS = _parse_keys_doc()


def test_keys_doc_has_five_networks():
    assert len(KEYS_SECTIONS) == 5
    assert all(len(keys) == tensors for _call, tensors, _params, keys in KEYS_SECTIONS)


@pytest.mark.parametrize('call,num_tensors,num_params,keys', KEYS_SECTIONS,
                         ids=[f'{i}-{section[0].split("(")[0]}' for i, section in enumerate(KEYS_SECTIONS)])
def test_state_dict_layout(call, num_tensors, num_params, keys):
    net = _construct(call)
    state = net.state_dict()
    assert [(key, tuple(value.shape)) for key, value in state.items()] == keys
    assert len(state) == num_tensors
    assert sum(p.numel() for p in net.parameters()) == num_params
    net.load_state_dict({key: torch.zeros(shape) for key, shape in keys}, strict=True)

# ----------------------------------------------------------------------------
# Parameter counts of the official configurations (built on the meta device: no memory, no init cost).

OFFICIAL = {
    'cifar10-ddpmpp-cond': (55_735_299, 'SongUNet', dict(img_resolution=32, label_dim=10, augment_dim=9,
        model_channels=128, channel_mult=[2,2,2], num_blocks=4, attn_resolutions=[16], dropout=0.13)),
    'cifar10-ncsnpp-cond': (56_400_643, 'SongUNet', dict(img_resolution=32, label_dim=10, augment_dim=9,
        model_channels=128, channel_mult=[2,2,2], num_blocks=4, attn_resolutions=[16], dropout=0.13,
        embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1])),
    'ffhq64-ddpmpp-uncond': (61_805_571, 'SongUNet', dict(img_resolution=64, label_dim=0, augment_dim=9,
        model_channels=128, channel_mult=[1,2,2,2], num_blocks=4, attn_resolutions=[16], dropout=0.05)),
    'imagenet64-adm-cond': (295_899_267, 'DhariwalUNet', dict(img_resolution=64, label_dim=1000, augment_dim=0,
        model_channels=192, channel_mult=[1,2,3,4], num_blocks=3, attn_resolutions=[32,16,8], dropout=0.10)),
}


@pytest.mark.parametrize('config', list(OFFICIAL))
def test_official_parameter_count(config):
    count, model_type, kwargs = OFFICIAL[config]
    with torch.device('meta'):
        net = networks.EDMPrecond(img_channels=3, model_type=model_type, **kwargs)
    assert sum(p.numel() for p in net.parameters()) == count

# ----------------------------------------------------------------------------
# Preconditioning: c_skip, c_out, c_in, c_noise against EDM's Table 1 (Karras et al. 2022), through a recording backbone.

class RecordingBackbone(torch.nn.Module):
    """Returns a fixed F and records what the preconditioner passed in."""
    def __init__(self, F_x):
        super().__init__()
        self.F_x = F_x

    def forward(self, x, noise_labels, class_labels=None, **kwargs):
        self.inputs = dict(x=x, noise_labels=noise_labels, class_labels=class_labels, **kwargs)
        return self.F_x


def _tiny(precond, **kwargs):
    model_type = kwargs.pop('model_type', 'SongUNet')
    return getattr(networks, precond)(img_resolution=8, img_channels=2, model_type=model_type, model_channels=8,
                                      channel_mult=[1], num_blocks=1, attn_resolutions=[], **kwargs)


# Coefficients in float64 from the closed forms.
def _coefficients(precond, s, net):
    if precond == 'VPPrecond':
        t = (np.sqrt(0.1 ** 2 + 2 * 19.9 * np.log1p(s ** 2)) - 0.1) / 19.9
        return 1, -s, 1 / np.sqrt(s ** 2 + 1), 999 * t
    if precond == 'VEPrecond':
        return 1, s, 1, np.log(s / 2)
    if precond == 'iDDPMPrecond':
        u = net.u.double().numpy()
        j = np.abs(s[:, None] - u[None, :]).argmin(axis=1)
        return 1, -s, 1 / np.sqrt(s ** 2 + 1), 999 - j
    sd = 0.5
    return sd ** 2 / (s ** 2 + sd ** 2), s * sd / np.sqrt(s ** 2 + sd ** 2), 1 / np.sqrt(sd ** 2 + s ** 2), np.log(s) / 4


@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'])
def test_preconditioning_formulas(precond):
    net = _tiny(precond)
    g = torch.Generator().manual_seed(0)
    x = torch.randn([4, 2, 8, 8], generator=g)
    sigma = torch.tensor([0.01, 0.3, 2.5, 70.0])
    out_channels = 4 if precond == 'iDDPMPrecond' else 2  # iDDPM's backbone also predicts the variance
    F_x = torch.randn([4, out_channels, 8, 8], generator=g)
    net.model = RecordingBackbone(F_x)
    D = net(x, sigma, augment_labels=torch.ones([4, 9]))

    c_skip, c_out, c_in, c_noise = _coefficients(precond, sigma.double().numpy(), net)
    c_skip, c_out, c_in = [np.reshape(c, [-1, 1, 1, 1]) for c in (c_skip, c_out, c_in)]
    expected = c_skip * x.double().numpy() + c_out * F_x[:, :2].double().numpy()
    np.testing.assert_allclose(D.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.model.inputs['x'].numpy(), c_in * x.double().numpy(), rtol=1e-5, atol=1e-6)
    # VP's c_noise is float32 log(1 + s^2) as in the reference, which loses ~1e-4 relative at s = 0.01.
    rtol = 1e-3 if precond == 'VPPrecond' else 1e-5
    np.testing.assert_allclose(net.model.inputs['noise_labels'].numpy(), c_noise, rtol=rtol, atol=1e-5)
    assert net.model.inputs['noise_labels'].shape == (4,)
    assert net.model.inputs['class_labels'] is None
    assert torch.equal(net.model.inputs['augment_labels'], torch.ones([4, 9]))


@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond'])
def test_sigma_scalar_and_labels(precond):
    net = _tiny(precond, label_dim=3)
    x = torch.randn([2, 2, 8, 8])
    net.eval()
    with torch.no_grad():
        D_vector = net(x, torch.tensor([1.5, 1.5]), torch.zeros([2, 3]))
        D_tensor = net(x, torch.tensor(1.5))
        D_float = net(x, 1.5)
        net.model = RecordingBackbone(torch.zeros([1, 4 if precond == 'iDDPMPrecond' else 2, 8, 8]))
        net(x, 1.5)
    assert D_tensor.shape == D_float.shape == (2, 2, 8, 8)
    torch.testing.assert_close(D_tensor, D_vector)
    torch.testing.assert_close(D_float, D_vector)
    assert torch.equal(net.model.inputs['class_labels'], torch.zeros([1, 3]))


def test_attributes_and_sigma_range():
    vp = _tiny('VPPrecond')
    sigma_vp = lambda t: np.sqrt(np.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)
    # Evaluated in float32 like the reference: exp(x)-1 cancels at t=1e-5, giving 0.000977 instead of 0.0010005.
    assert vp.sigma_min == pytest.approx(sigma_vp(1e-5), rel=3e-2)
    assert vp.sigma_max == pytest.approx(sigma_vp(1.0), rel=1e-5)
    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t)
    ve = _tiny('VEPrecond')
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    edm = _tiny('EDMPrecond', model_type='SongUNet')
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float('inf'), 0.5)
    for net in [vp, ve, edm]:
        assert (net.img_resolution, net.img_channels, net.label_dim, net.use_fp16) == (8, 2, 0, False)
        sigma = torch.tensor([0.123456789], dtype=torch.float64)
        assert torch.equal(net.round_sigma(sigma), sigma)


def test_iddpm_u_table_and_round_sigma():
    ref = golden_arrays('iddpm_dhariwal_16')['buffer/u']
    net = _tiny('iDDPMPrecond')
    u = net.u
    assert u.dtype == torch.float32 and u.shape == (1001,) and u[1000] == 0
    assert 'u' in dict(net.named_buffers())
    np.testing.assert_allclose(u.numpy(), ref, rtol=1e-5)
    assert net.sigma_min == float(u[999]) and net.sigma_max == float(u[0])

    # round_sigma snaps to the nearest u (away from EDM's tie points, below), keeping shape and dtype; return_index gives j.
    sigma = torch.tensor([[0.002, 0.05], [1.0, 80.0]], dtype=torch.float64)
    j = (sigma.reshape(-1, 1) - u.double().reshape(1, -1)).abs().argmin(dim=1).reshape(2, 2)
    rounded = net.round_sigma(sigma)
    assert rounded.dtype == torch.float64 and rounded.shape == (2, 2)
    assert torch.equal(rounded, u[j].double())
    assert torch.equal(net.round_sigma(sigma, return_index=True), j)
    assert torch.equal(net.round_sigma(u[[5, 500, 999]]), u[[5, 500, 999]])
    assert net.round_sigma(torch.tensor(0.5)).shape == ()


def edm_round_index(u, sigma):
    """EDM's choice of level, written from the official expression (NVlabs/edm training/networks.py,
    iDDPMPrecond.round_sigma: `torch.cdist(sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1),
    self.u.reshape(1, -1, 1)).argmin(2)`)."""
    return torch.cdist(sigma.to(torch.float32).reshape(1, -1, 1), u.reshape(1, -1, 1)).argmin(2).reshape(sigma.shape)


def test_iddpm_round_sigma_is_edms_at_its_tie_points_and_on_generate_schedules():
    """EDM's iDDPM networks pick their level with torch.cdist in float32, which differs from the exactly nearest level
    near the midpoints between levels. Tie points: for each pair of neighbouring levels u[j+1] < u[j], the least
    float32 sigma that EDM maps to j (found by bisection on the float32 values between them); round_sigma must agree
    with EDM there and one float32 step below, and on the Karras grids generate.py samples."""
    net = _tiny('iDDPMPrecond')
    u = net.u
    lo, hi = u[1:].clone(), u[:-1].clone()  # EDM maps lo to j+1 and hi to j (every level is its own nearest)
    j = torch.arange(1000)
    assert torch.equal(edm_round_index(u, lo), j + 1) and torch.equal(edm_round_index(u, hi), j)
    lo_bits, hi_bits = lo.view(torch.int32).long(), hi.view(torch.int32).long()  # positive floats order as their bits
    for _ in range(32):
        mid_bits = (lo_bits + hi_bits) // 2
        to_j = edm_round_index(u, mid_bits.int().view(torch.float32)) == j
        hi_bits, lo_bits = torch.where(to_j, mid_bits, hi_bits), torch.where(to_j, lo_bits, mid_bits)
    tie = hi_bits.int().view(torch.float32)  # the least float32 that EDM maps to j
    below = lo_bits.int().view(torch.float32)
    assert torch.equal(edm_round_index(u, tie), j) and torch.equal(edm_round_index(u, below), j + 1)
    assert torch.all(hi_bits - lo_bits == 1)
    for sigma in [tie, below, tie.double(), below.double()]:
        assert torch.equal(net.round_sigma(sigma, return_index=True), edm_round_index(u, sigma))
        assert torch.equal(net.round_sigma(sigma), u[edm_round_index(u, sigma)].to(sigma.dtype))
    exact = lambda sigma: (sigma.double().reshape(-1, 1) - u.double().reshape(1, -1)).abs().argmin(dim=1)
    assert (exact(below) != j + 1).sum() > 100  # many tie points are off the exact midpoints: the old rule failed here

    # generate.py's grids: Karras, rho 7, sigma in [max(0.002, sigma_min), min(80, sigma_max)], 2-128 steps, and
    # --sigma_max=1 --steps=4; float64, as the sampler passes them.
    grids = [samplers.karras_sigma(torch.arange(N, dtype=torch.float64) / (N - 1), max(0.002, net.sigma_min),
                                   min(80, net.sigma_max), 7) for N in range(2, 129)]
    grids.append(samplers.karras_sigma(torch.arange(4, dtype=torch.float64) / 3, max(0.002, net.sigma_min), 1, 7))
    sigma = torch.cat(grids)
    assert torch.equal(net.round_sigma(sigma, return_index=True), edm_round_index(u, sigma))
    assert torch.equal(net.round_sigma(sigma), u[edm_round_index(u, sigma)].double())
    assert (exact(sigma) != edm_round_index(u, sigma)).sum() > 0  # the grids do hit levels where the two rules differ

# ----------------------------------------------------------------------------
# Attention: EDM's qkv channel layout (head, channel-in-head, {q,k,v}) against a direct per-head computation.

def test_attention_qkv_layout():
    torch.manual_seed(0)
    C, heads, H, W = 8, 2, 3, 4
    d = C // heads
    block = networks.UNetBlock(C, C, emb_channels=4, attention=True, num_heads=heads, skip_scale=1).eval()
    W_qkv = torch.randn([3, heads, d, C])  # {q,k,v}, head, channel in head, input channel
    b_qkv = torch.randn([3, heads, d])
    with torch.no_grad():
        block.qkv.weight.copy_(W_qkv.permute(1, 2, 0, 3).reshape(3 * C, C, 1, 1))
        block.qkv.bias.copy_(b_qkv.permute(1, 2, 0).reshape(3 * C))
        block.proj.weight.copy_(torch.eye(C).reshape(C, C, 1, 1))
        block.proj.bias.zero_()
    seen = {}
    block.norm2.register_forward_pre_hook(lambda m, args: seen.update(x_res=args[0].clone()))
    block.norm2.register_forward_hook(lambda m, args, out: seen.update(h=out.clone()))
    x = torch.randn([2, C, H, W])
    with torch.no_grad():
        y = block(x, torch.randn([2, 4]))

    h = seen['h'].double().reshape(2, C, H * W)
    expected = torch.empty(2, C, H * W, dtype=torch.float64)
    for n in range(2):
        for i in range(heads):
            q, k, v = [W_qkv[s, i].double() @ h[n] + b_qkv[s, i].double()[:, None] for s in range(3)]  # [d, L]
            w = torch.softmax(q.T @ k / np.sqrt(d), dim=1)  # [query, key]
            expected[n, i * d:(i + 1) * d] = v @ w.T
    expected = expected.reshape(2, C, H, W) + seen['x_res'].double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('resample_filter', [[1, 1], [1, 3], [1, 3, 3, 1]])
def test_upsampling_is_transposed_fir_filter(resample_filter):
    # The [1,1] shortcut (nearest-neighbour) must equal EDM's transposed depthwise convolution bit for bit.
    x = torch.randn([2, 4, 5, 5])
    f = torch.tensor(resample_filter, dtype=torch.float32)
    f = torch.outer(f, f) / f.sum() ** 2
    expected = torch.nn.functional.conv_transpose2d(x, (4 * f).tile([4, 1, 1, 1]), groups=4, stride=2,
                                                    padding=(len(resample_filter) - 1) // 2)
    up = networks.Conv2d(4, 4, kernel=0, up=True, resample_filter=resample_filter)
    assert up.box_filter == (resample_filter == [1, 1])
    assert torch.equal(up(x), expected)


def test_dhariwal_block_below_64_channels_has_no_attention():
    block = networks.UNetBlock(32, 32, emb_channels=8, attention=True)
    assert block.num_heads == 0 and not hasattr(block, 'qkv')
    assert networks.UNetBlock(128, 128, emb_channels=8, attention=True).num_heads == 2

# ----------------------------------------------------------------------------
# Training-mode behaviour: autograd through the in-place ops, label dropout, fp32 on the CPU.

@pytest.mark.parametrize('model_type', ['SongUNet', 'DhariwalUNet'])
def test_backbone_gradients(model_type):
    torch.manual_seed(0)
    channels, mult = dict(SongUNet=(8, [1, 2]), DhariwalUNet=(64, [1, 1]))[model_type]  # ADM attention needs 64
    net = getattr(networks, model_type)(img_resolution=8, in_channels=2, out_channels=2, label_dim=3,
        model_channels=channels, channel_mult=mult, num_blocks=1, attn_resolutions=[4], dropout=0)
    for p in net.parameters():  # zero-initialised layers would hide most of the graph
        torch.nn.init.normal_(p, std=0.3)
    net = net.double()
    x = torch.randn([2, 2, 8, 8], dtype=torch.float64, requires_grad=True)
    emb_in = (torch.randn([2], dtype=torch.float64), torch.randn([2, 3], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: net(x, *emb_in), (x,), fast_mode=True)


def test_label_dropout_zeroes_labels_in_training():
    torch.manual_seed(0)
    net = networks.SongUNet(img_resolution=8, in_channels=2, out_channels=2, label_dim=3, model_channels=8,
                            channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0, label_dropout=1)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, noise = torch.randn([2, 2, 8, 8]), torch.randn([2])
    labels = torch.eye(3)[:2]
    y_train = net.train()(x, noise, labels)
    y_zero = net.eval()(x, noise, torch.zeros_like(labels))
    y_eval = net(x, noise, labels)
    torch.testing.assert_close(y_train, y_zero)
    assert not torch.allclose(y_eval, y_zero)


# ----------------------------------------------------------------------------
# Dropout keyed by sample (training-loop steps): masks are a function of (sample key, call, element) only.

def reference_keep(key, call, index, p):
    """The keyed mask bit in Python integers: the definition the int64 tensor code must reproduce on any device."""
    def h(x):
        x = x * 0x21f0aaad % 2**32
        return (x ^ (x >> 16)) * 0x735a2d97 % 2**32
    return h(index ^ h(h((key + call * 0x9e3779b9) % 2**32))) >= round(p * 2**32)


def test_keyed_dropout_bits_and_statistics():
    p, shape = 0.13, [64, 16, 32, 32]
    keys = torch.randint(0, 2**32, [64], generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    with networks.keyed_dropout(keys):
        a, b = networks._keep(shape, p, 'cpu'), networks._keep(shape, p, 'cpu')  # two calls (layers)
    for n, i in [(0, 0), (5, 123), (63, 16383), (17, 4097)]:
        assert bool(a[n].flatten()[i]) == reference_keep(int(keys[n]), 0, i, p)
        assert bool(b[n].flatten()[i]) == reference_keep(int(keys[n]), 1, i, p)
    # Bernoulli(1 - p), independent between neighbouring elements, samples and calls: each share is a mean of
    # ~1e6 indicators, so 6 standard deviations is about 0.002.
    def near(share, q):
        return abs(float(share) - q) < 6 * (q * (1 - q) / a.numel()) ** 0.5
    assert near(a.float().mean(), 1 - p)
    assert near((a.flatten(1)[:, 1:] & a.flatten(1)[:, :-1]).float().mean(), (1 - p) ** 2)
    assert near((a[1:] & a[:-1]).float().mean(), (1 - p) ** 2)
    assert near((a == b).float().mean(), (1 - p) ** 2 + p ** 2)
    x = torch.ones(shape)
    with networks.keyed_dropout(keys):
        y = networks._dropout(x, p)
    assert torch.equal(y, a / (1 - p))


def test_keyed_dropout_follows_the_sample():
    torch.manual_seed(0)
    net = networks.SongUNet(img_resolution=8, in_channels=2, out_channels=2, label_dim=3, model_channels=8,
                            channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], dropout=0.3, label_dropout=0.5)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, noise, labels = torch.randn([8, 2, 8, 8]), torch.randn([8]), torch.eye(3)[torch.arange(8) % 3]
    keys = torch.arange(8, dtype=torch.int64) * 1000003
    net.train()
    with networks.keyed_dropout(keys):
        whole = net(x, noise, labels)
    torch.manual_seed(1)  # torch's RNG plays no part
    with networks.keyed_dropout(keys[4:]):
        part = net(x[4:], noise[4:], labels[4:])
    torch.testing.assert_close(part, whole[4:], rtol=1e-5, atol=1e-6)
    with networks.keyed_dropout(keys + 1):
        assert not torch.allclose(net(x, noise, labels), whole)
    # Outside the block: torch's RNG, as before. In eval mode: no dropout at all.
    torch.manual_seed(2)
    a = net(x, noise, labels)
    torch.manual_seed(2)
    assert torch.equal(net(x, noise, labels), a) and not torch.allclose(a, whole)
    plain = net.eval()(x, noise, labels)
    with networks.keyed_dropout(keys):
        assert torch.equal(net(x, noise, labels), plain)
    with pytest.raises(ValueError, match='keyed_dropout has 8 keys for a batch of 4'):
        with networks.keyed_dropout(keys):
            net.train()(x[:4], noise[:4], labels[:4])

def test_use_fp16_is_fp32_on_cpu():
    net = build_golden_net('vp_songunet_skip_16')
    a = {key: torch.from_numpy(value) for key, value in golden_arrays('vp_songunet_skip_16').items()}
    net.use_fp16 = True
    with torch.no_grad():
        D = net(a['x'], a['sigma'])
        D_forced = net(a['x'], a['sigma'], force_fp32=True)
    assert D.dtype == torch.float32
    assert torch.equal(D, D_forced)
    torch.testing.assert_close(D, a['D'], rtol=1e-4, atol=1e-5 * a['D'].abs().max().item())


def test_fourier_freqs_are_a_buffer():
    net = networks.SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=[1],
                            attn_resolutions=[], embedding_type='fourier')
    assert 'map_noise.freqs' in dict(net.named_buffers())
    assert 'map_noise.freqs' not in dict(net.named_parameters())

# ----------------------------------------------------------------------------
# The module is embedded in pickles and exec'ed by EDM-derived readers: allowed imports, exec-able, picklable.

def test_module_imports_only_stdlib_numpy_torch_persistence():
    tree = ast.parse(Path(networks.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f'{node.module}.{alias.name}' for alias in node.names}
    assert imported == {'contextlib', 'numpy', 'torch', 'torch.nn.functional', 'torch_utils.persistence'}  # stdlib, numpy, torch only


def test_module_source_execs_and_matches(monkeypatch):
    # As EDM's reader does: a fresh module registered in sys.modules, its source executed into it.
    net = build_golden_net('ve_songunet_ncsnpp_16')
    src = Path(networks.__file__).read_text()
    module = types.ModuleType('_exec_networks')
    module.__persistent_src__ = src
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(src, '<networks>', 'exec'), module.__dict__)
    config = golden_config()['ve_songunet_ncsnpp_16']
    clone = module.VEPrecond(**config['kwargs']).eval()
    clone.load_state_dict(net.state_dict(), strict=True)
    a = {key: torch.from_numpy(value) for key, value in golden_arrays('ve_songunet_ncsnpp_16').items()}
    with torch.no_grad():
        assert torch.equal(clone(a['x'], a['sigma']), net(a['x'], a['sigma']))


def test_pickle_embeds_source_and_init_kwargs():
    net = _tiny('EDMPrecond', model_type='SongUNet', label_dim=3)
    data = pickle.dumps(net)
    assert b'_reconstruct_persistent_obj' in data
    assert b'class EDMPrecond' in data
    assert net.init_kwargs['label_dim'] == 3 and net.init_kwargs['model_type'] == 'SongUNet'

# ----------------------------------------------------------------------------
# Bad configuration gets a clear error.

def test_bad_configuration_errors():
    with pytest.raises(ValueError, match='model_type'):
        networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='UNet')
    with pytest.raises(ValueError, match='embedding_type'):
        networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, embedding_type='sinusoid')
    with pytest.raises(ValueError, match='encoder_type'):
        networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, encoder_type='fancy')
    with pytest.raises(ValueError, match='decoder_type'):
        networks.SongUNet(img_resolution=8, in_channels=3, out_channels=3, decoder_type='residual')
    with pytest.raises(ValueError, match='init_mode'):
        networks.Linear(2, 2, init_mode='orthogonal')
    with pytest.raises(ValueError, match='up, down'):
        networks.Conv2d(2, 2, kernel=3, up=True, down=True)
