"""Samplers: grids in closed form, Heun/Euler convergence on a Gaussian, churn schedule, per-seed RNG, spec dispatch."""

import math

import pytest
import torch

from training import samplers

# ----------------------------------------------------------------------------
# A denoiser with a known answer: data ~ N(0, s0^2 I) has D(x; s) = s0^2/(s0^2+s^2) x, and the probability-flow
# ODE solution x(s) = x(S) sqrt((s0^2+s^2)/(s0^2+S^2)). It records every noise level it is called with.

class GaussianDenoiser(torch.nn.Module):
    def __init__(self, s0=0.5, img_channels=3, img_resolution=4, label_dim=0, sigma_min=0, sigma_max=float('inf')):
        super().__init__()
        self.s0, self.img_channels, self.img_resolution, self.label_dim = s0, img_channels, img_resolution, label_dim
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        self.calls.append((float(sigma), class_labels, model_kwargs))
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (self.s0 ** 2 / (self.s0 ** 2 + sigma ** 2) * x.to(torch.float64)).to(torch.float32)


def karras(u, smin=0.002, smax=80.0, rho=7.0):
    return (smax ** (1 / rho) + u * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho

# ----------------------------------------------------------------------------
# Grids.

def test_edm_sigmas_closed_form_and_rounding():
    t = samplers.edm_sigmas(5, 0.002, 80, 7)
    assert t.dtype == torch.float64 and t.shape == (6,)
    expected = [karras(i / 4) for i in range(5)] + [0.0]
    assert torch.allclose(t, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    assert t[0].item() == pytest.approx(80, rel=1e-14) and t[4].item() == pytest.approx(0.002, rel=1e-12)
    # round_sigma is applied to every level except the terminal 0.
    rounded = samplers.edm_sigmas(5, 0.002, 80, 7, round_sigma=lambda s: s.round(decimals=1))
    assert torch.equal(rounded, torch.cat([t[:5].round(decimals=1), torch.zeros(1, dtype=torch.float64)]))
    with pytest.raises(ValueError, match='num_steps >= 2'):
        samplers.edm_sigmas(1, 0.002, 80, 7)


def test_nested_sigmas_values_and_nesting():
    t = samplers.nested_sigmas(4, 0.002, 80, 7)
    expected = [karras(i / 4) for i in range(4)] + [0.0]
    assert t.dtype == torch.float64
    assert torch.allclose(t, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)
    # Halving N keeps every other level: the student's grid is a subset of its teacher's.
    for n in (1, 2, 4, 8):
        assert torch.allclose(samplers.nested_sigmas(n, 0.002, 80, 7), samplers.nested_sigmas(2 * n, 0.002, 80, 7)[::2],
                              rtol=1e-14, atol=0)
    assert samplers.nested_sigmas(1, 0.002, 80, 7).tolist() == pytest.approx([80.0, 0.0], rel=1e-14)

# ----------------------------------------------------------------------------
# Samplers.

def test_heun_and_euler_converge_at_their_order_on_a_gaussian():
    z = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s0, T, t = 0.5, 80.0, 0.002
    # Exact flow from T to sigma_min, then the last step lands on D(x; sigma_min).
    ref = s0 ** 2 / (s0 ** 2 + t ** 2) * z * T * math.sqrt((s0 ** 2 + t ** 2) / (s0 ** 2 + T ** 2))
    def err(n, solver):
        x = samplers.edm_sampler(GaussianDenoiser(s0), z, num_steps=n, solver=solver)
        return ((x - ref).abs().max() / ref.abs().max()).item()
    assert err(128, 'heun') < 1e-3
    assert 3.5 < err(64, 'heun') / err(128, 'heun') < 4.5   # second order
    assert 1.8 < err(64, 'euler') / err(128, 'euler') < 2.2  # first order


def test_edm_sampler_churn_schedule_and_nfe():
    N, S_churn, S_min, S_max = 5, 2.0, 0.05, 10.0
    net = GaussianDenoiser(sigma_min=0.01, sigma_max=40)  # clamps the requested [0.002, 80]
    noise_calls = []
    def randn_like(x):
        noise_calls.append(x.dtype)
        return torch.zeros_like(x)
    out = samplers.edm_sampler(net, torch.ones([1, 3, 4, 4]), randn_like=randn_like, num_steps=N, S_churn=S_churn,
                               S_min=S_min, S_max=S_max)
    assert out.dtype == torch.float64
    t = [karras(i / (N - 1), smin=0.01, smax=40) for i in range(N)] + [0.0]
    gamma = [min(S_churn / N, math.sqrt(2) - 1) if S_min <= ti <= S_max else 0 for ti in t[:N]]
    expected = []
    for i in range(N):
        expected.append(t[i] * (1 + gamma[i]))
        if i < N - 1:
            expected.append(t[i + 1])
    assert len(net.calls) == 2 * N - 1
    assert [c[0] for c in net.calls] == pytest.approx(expected, rel=1e-12)
    assert 0 < sum(g > 0 for g in gamma) < N  # the test covers both branches
    assert noise_calls == [torch.float64] * N  # noise drawn every step, even where gamma = 0


def test_euler_solver_option_skips_corrections():
    net = GaussianDenoiser()
    samplers.edm_sampler(net, torch.ones([1, 3, 4, 4]), num_steps=6, solver='euler')
    assert len(net.calls) == 6
    with pytest.raises(ValueError, match='Unknown solver'):
        samplers.edm_sampler(net, torch.ones([1, 3, 4, 4]), solver='rk4')


def test_one_step_euler_equals_denoiser_at_input_level():
    net = GaussianDenoiser(s0=0.3)
    z = torch.randn([3, 3, 4, 4], generator=torch.Generator().manual_seed(1))
    labels = torch.eye(3)
    x = samplers.euler_sampler(net, z, labels, samplers.nested_sigmas(1, 0.002, 80.0, 7), model_kwargs=dict(w=2.0))
    assert len(net.calls) == 1 and net.calls[0][2] == dict(w=2.0) and net.calls[0][1] is labels
    assert torch.equal(x.to(torch.float32), net(80.0 * z.to(torch.float64), torch.tensor(80.0, dtype=torch.float64)))


def test_euler_sampler_steps_match_ddim_update():
    net = GaussianDenoiser(s0=0.5)
    z = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigmas = samplers.nested_sigmas(3, 0.002, 80.0, 7)
    x = samplers.euler_sampler(net, z, None, sigmas)
    # Each step x' = x + (s' - s)(x - D)/s with D = s0^2/(s0^2+s^2) x.
    y = z * sigmas[0]
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (y - 0.25 / (0.25 + s ** 2) * y) / s
        y = y + (s_next - s) * d
    assert torch.allclose(x, y, rtol=1e-6, atol=1e-6)

# ----------------------------------------------------------------------------
# Per-seed RNG.

def test_stacked_random_generator_is_per_seed():
    seeds = [5, 7, 2 ** 32 + 5]
    rnd = samplers.StackedRandomGenerator('cpu', seeds)
    latents = rnd.randn([3, 2, 4, 4])
    labels = rnd.randint(10, size=[3])
    noise = rnd.randn_like(latents.to(torch.float64))
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed % 2 ** 32)
        assert torch.equal(latents[k], torch.randn([2, 4, 4], generator=g))
        assert labels[k] == torch.randint(10, size=[], generator=g)
        assert torch.equal(noise[k], torch.randn([2, 4, 4], generator=g, dtype=torch.float64))
    assert torch.equal(latents[0], latents[2]) and noise.dtype == torch.float64

# ----------------------------------------------------------------------------
# Dispatch on net.sampling_spec.

ONE_STEP = dict(solver='euler', grid='nested', num_steps=1, sigma_min=0.002, sigma_max=80.0, rho=7)


def test_sample_without_spec_is_edm_heun_with_defaults():
    net = GaussianDenoiser()
    z = torch.randn([1, 3, 4, 4], generator=torch.Generator().manual_seed(3))
    x = samplers.sample(net, z, randn_like=torch.zeros_like)
    assert len(net.calls) == 35  # 18 steps, NFE 2N-1
    assert torch.equal(x, samplers.edm_sampler(GaussianDenoiser(), z, randn_like=torch.zeros_like))


def test_sample_honours_spec_and_overrides():
    net = GaussianDenoiser()
    net.sampling_spec = dict(ONE_STEP)
    z = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(4))
    x = samplers.sample(net, z, None, num_steps=None, solver=None)  # None means "not given"
    assert [c[0] for c in net.calls] == [80.0]
    assert torch.equal(x, samplers.euler_sampler(GaussianDenoiser(), z, None, samplers.nested_sigmas(1, 0.002, 80, 7)))
    net.calls.clear()
    samplers.sample(net, z, None, num_steps=4, sigma_max=2.5)
    assert [c[0] for c in net.calls] == pytest.approx([karras(i / 4, smax=2.5) for i in range(4)], rel=1e-12)


def test_sample_rejects_bad_settings():
    net = GaussianDenoiser()
    z = torch.zeros([1, 3, 4, 4])
    with pytest.raises(ValueError, match='Unknown sampler setting'):
        samplers.sample(net, z, steps=4)
    with pytest.raises(ValueError, match='Unknown grid'):
        samplers.sample(net, z, grid='linear')
    with pytest.raises(ValueError, match='num_steps >= 2'):
        samplers.sample(net, z, num_steps=1)
    with pytest.raises(ValueError, match='sigma_min < sigma_max'):
        samplers.sample(net, z, sigma_min=5, sigma_max=1)
    net.sampling_spec = dict(ONE_STEP)
    with pytest.raises(ValueError, match="solver 'euler'"):
        samplers.sample(net, z, solver='heun')
    with pytest.raises(ValueError, match='S_churn'):
        samplers.sample(net, z, S_churn=10)
    assert net.calls == []
