"""Samplers: grids in closed form, Heun/Euler convergence on a Gaussian, churn schedule, per-seed RNG, spec dispatch."""

import math

import pytest
import torch

from training import samplers

# ----------------------------------------------------------------------------
# A denoiser with a known answer: data ~ N(0, s0^2 I) has D(x; s) = s0^2/(s0^2+s^2) x, and the probability-flow
# ODE solution x(s) = x(S) sqrt((s0^2+s^2)/(s0^2+S^2)). It records every noise level it is called with.

class GaussianDenoiser(torch.nn.Module):
    def __init__(self, s0=0.5, img_channels=3, img_resolution=4, label_dim=0, sigma_min=0, sigma_max=float('inf'),
                 dtype=torch.float32):
        super().__init__()
        self.s0, self.img_channels, self.img_resolution, self.label_dim = s0, img_channels, img_resolution, label_dim
        self.dtype = dtype  # of the output: float32 as a network's, or float64
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        self.calls.append((float(sigma), class_labels, model_kwargs))
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (self.s0 ** 2 / (self.s0 ** 2 + sigma ** 2) * x.to(torch.float64)).to(self.dtype)


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

# ----------------------------------------------------------------------------
# EDM's design space (generate.py --disc, --schedule, --scaling; Karras et al. 2022, Table 1), in closed form.

def algorithm_2(net, latents, labels, randn_like, num_steps, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0,
                S_max=float('inf'), S_noise=1, solver='heun', clip=False):
    """EDM's Algorithm 2 as its generate.py writes it (edm_sampler), plus an optional clip of D to [-1, 1]."""
    sigma_min, sigma_max = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros_like(t[:1])])
    D = lambda x, s: net(x, s, labels).to(torch.float64).clamp(-1, 1) if clip else net(x, s, labels).to(torch.float64)
    x_next = latents.to(torch.float64) * t[0]
    for k, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == 'heun' and k < num_steps - 1:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def random_edm_net(label_dim=4):
    from golden import fill_golden_weights
    from training.networks import EDMPrecond
    net = EDMPrecond(8, 3, label_dim=label_dim, model_type='SongUNet', model_channels=16, channel_mult=[1],
                     num_blocks=1, attn_resolutions=[], dropout=0)
    return fill_golden_weights(net, 3).eval().requires_grad_(False)


@pytest.mark.parametrize('solver', ['heun', 'euler'])
@pytest.mark.parametrize('clip', [False, True])
def test_default_design_space_is_algorithm_2_bit_for_bit(solver, clip):
    """disc 'edm', schedule 'linear', scaling 'none' (EDM's ablation defaults) give Algorithm 2's floats exactly,
    churn included; clip_denoised clips D at every evaluation."""
    net = random_edm_net()
    seeds = [0, 1, 2]
    settings = dict(num_steps=5, S_churn=30, S_min=0.05, S_max=50, S_noise=1.003, solver=solver)
    z = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(5))
    labels = torch.eye(4)[[0, 2, 3]]
    expected = algorithm_2(net, z, labels, samplers.StackedRandomGenerator('cpu', seeds).randn_like, clip=clip, **settings)
    got = samplers.edm_sampler(net, z, labels, samplers.StackedRandomGenerator('cpu', seeds).randn_like,
                               discretization='edm', schedule='linear', scaling='none', clip_denoised=clip, **settings)
    assert torch.equal(got, expected)
    unclipped = algorithm_2(net, z, labels, samplers.StackedRandomGenerator('cpu', seeds).randn_like, **settings)
    assert clip == (not torch.equal(expected, unclipped))  # the network's D leaves [-1, 1]: the clip acts


def vp_betas(sigma_min, sigma_max, eps=1e-3):
    """(beta_d, beta_min) with sigma_vp(eps) = sigma_min and sigma_vp(1) = sigma_max: a 2x2 linear system in the
    exponent beta_d t^2/2 + beta_min t = ln(1 + sigma^2)."""
    A = torch.tensor([[0.5 * eps ** 2, eps], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([math.log1p(sigma_min ** 2), math.log1p(sigma_max ** 2)], dtype=torch.float64)
    return torch.linalg.solve(A, b).tolist()


def test_default_noise_ranges_per_discretization():
    """EDM's generate.py defaults: VP sigma(1e-3)..sigma(1) of beta_d 19.9, beta_min 0.1; VE 0.02..100; iDDPM
    0.002..81; EDM 0.002..80; explicit values win."""
    vp = lambda t: math.sqrt(math.expm1(0.5 * 19.9 * t ** 2 + 0.1 * t))
    net = GaussianDenoiser()
    for disc, (lo, hi) in dict(vp=(vp(1e-3), vp(1)), ve=(0.02, 100), iddpm=(0.002, 81), edm=(0.002, 80)).items():
        s = samplers.sampler_settings(net, discretization=disc)
        assert s['sigma_min'] == pytest.approx(lo, rel=1e-12) and s['sigma_max'] == pytest.approx(hi, rel=1e-12)
    assert samplers.sampler_settings(net, discretization='ve', sigma_max=50)['sigma_max'] == 50
    beta_d, beta_min = vp_betas(vp(1e-3), vp(1))
    assert beta_d == pytest.approx(19.9, rel=1e-9) and beta_min == pytest.approx(0.1, rel=1e-7)
    with pytest.raises(ValueError, match='Unknown discretization'):
        samplers.sampler_settings(net, discretization='karras')
    with pytest.raises(ValueError, match='Unknown schedule'):
        samplers.sampler_settings(net, schedule='cosine')
    net.sampling_spec = dict(ONE_STEP)
    with pytest.raises(ValueError, match="apply only to grid 'edm'"):
        samplers.sampler_settings(net, scaling='vp')


@pytest.mark.parametrize('disc', ['vp', 've', 'iddpm', 'edm'])
def test_discretizations_closed_form(disc):
    """The levels a sampler visits (Euler, no churn, sigma = t) against EDM's Table 1 written out here."""
    N = 7
    i = torch.arange(N, dtype=torch.float64)
    net = GaussianDenoiser()
    lo, hi = samplers.sampler_settings(net, discretization=disc)['sigma_min'], samplers.sampler_settings(net, discretization=disc)['sigma_max']
    if disc == 'vp':
        beta_d, beta_min = vp_betas(lo, hi)
        t = 1 + i / (N - 1) * (1e-3 - 1)
        expected = torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t))
    elif disc == 've':
        expected = hi * (lo / hi) ** (i / (N - 1))
    elif disc == 'iddpm':  # EDM's own level table (its iDDPMPrecond buffer u, float32, in tests/fixtures)
        from golden import golden_arrays
        u = torch.as_tensor(golden_arrays('iddpm_dhariwal_16')['buffer/u']).to(torch.float64)
        u = u[(u >= lo) & (u <= hi)]
        expected = u[torch.floor((len(u) - 1) * i / (N - 1) + 0.5).long()]  # no index lands on a .5 here
    else:
        expected = karras(i / (N - 1))
    samplers.edm_sampler(net, torch.ones([1, 3, 4, 4]), num_steps=N, sigma_min=lo, sigma_max=hi, solver='euler',
                         discretization=disc)
    # iDDPM: the buffer accumulates the recurrence in float32, the sampler (as EDM's) in float64: 2e-5 apart at most.
    assert [c[0] for c in net.calls] == pytest.approx(expected.tolist(), rel=5e-5 if disc == 'iddpm' else 1e-12)
    if disc != 'iddpm':  # iDDPM picks existing levels inside the range (80.2 is the largest below 81)
        assert expected[0] == pytest.approx(hi, rel=1e-9) and expected[-1] == pytest.approx(lo, rel=1e-9)


def schedule_closed_forms(schedule, scaling, beta_d, beta_min):
    """sigma(t), sigma'(t), s(t), s'(t) and t(sigma) from EDM's Table 1, written out independently of the sampler."""
    if schedule == 'vp':
        E = lambda t: math.exp(0.5 * beta_d * t ** 2 + beta_min * t)
        sigma = lambda t: math.sqrt(E(t) - 1)
        dsigma = lambda t: (beta_d * t + beta_min) * E(t) / (2 * sigma(t))
        t_of = lambda s: (-beta_min + math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(s ** 2))) / beta_d
    elif schedule == 've':
        sigma, dsigma, t_of = math.sqrt, lambda t: 0.5 * t ** -0.5, lambda s: s * s
    else:
        sigma, dsigma, t_of = (lambda t: t), (lambda t: 1.0), (lambda s: s)
    if scaling == 'vp':
        s = lambda t: (1 + sigma(t) ** 2) ** -0.5
        ds = lambda t: -sigma(t) * dsigma(t) * (1 + sigma(t) ** 2) ** -1.5
    else:
        s, ds = (lambda t: 1.0), (lambda t: 0.0)
    return sigma, dsigma, s, ds, t_of


@pytest.mark.parametrize('schedule', ['vp', 've', 'linear'])
@pytest.mark.parametrize('scaling', ['vp', 'none'])
@pytest.mark.parametrize('solver', ['euler', 'heun'])
def test_schedule_and_scaling_steps_closed_form(schedule, scaling, solver):
    """Two steps of dx/dt = (sigma'/sigma + s'/s) x - (sigma' s / sigma) D(x/s; sigma) (EDM eq. 4) with the closed
    forms of sigma(t), s(t) and their derivatives, on EDM's time steps for sigma 0.002..80: Euler, or Heun (the
    average of the slopes at both ends; none on the last step)."""
    c = 0.5
    net = GaussianDenoiser(s0=c, dtype=torch.float64)  # float64 D: the large cancellations at s(t) << 1 stay exact
    D = lambda x, sig: c ** 2 / (c ** 2 + sig ** 2) * x
    z = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigma, dsigma, s, ds, t_of = schedule_closed_forms(schedule, scaling, *vp_betas(0.002, 80))
    t = [t_of(80.0), t_of(0.002), 0.0]  # two steps: the grid's ends, then 0
    x = z * sigma(t[0]) * s(t[0])
    f = lambda x, t: (dsigma(t) / sigma(t) + ds(t) / s(t)) * x - dsigma(t) * s(t) / sigma(t) * D(x / s(t), sigma(t))
    for t_cur, t_next in zip(t[:-1], t[1:]):
        x_euler = x + (t_next - t_cur) * f(x, t_cur)
        x = x + (t_next - t_cur) * (f(x, t_cur) + f(x_euler, t_next)) / 2 if solver == 'heun' and t_next > 0 else x_euler
    got = samplers.edm_sampler(net, z, num_steps=2, solver=solver, schedule=schedule, scaling=scaling)
    torch.testing.assert_close(got, x, rtol=1e-9, atol=1e-12)


def test_clipped_euler_is_the_official_ddim_step():
    """Progressive distillation's clipped DDIM sampler (google-research diffusion_distillation dpm.py: `model_x =
    jnp.clip(model_x, -1., 1.)`, `model_eps = predict_eps_from_x(...)`, `z_s = alpha_s * x_pred + stdv_s * eps`, the
    last step returning x_pred; `eval_clip_denoised=True` in config/cifar_distill.py) in its variance-preserving
    form z = alpha x_sigma, alpha = 1/sqrt(1 + sigma^2), against euler_sampler(clip_denoised=True), and via a spec."""
    net = GaussianDenoiser(s0=3.0)  # data of std 3: D leaves [-1, 1], so the clip acts
    z = torch.randn([2, 3, 4, 4], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    sigmas = samplers.nested_sigmas(4, 0.002, 80.0, 7)
    alpha = lambda s: 1 / math.sqrt(1 + s ** 2)
    zt = alpha(float(sigmas[0])) * z * float(sigmas[0])  # the VP state at the first level
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x_pred = net(zt / alpha(s), torch.tensor(s)).to(torch.float64).clamp(-1, 1)
        eps = (zt - alpha(s) * x_pred) / (s * alpha(s))
        zt = x_pred if s_next == 0 else alpha(s_next) * x_pred + s_next * alpha(s_next) * eps
    got = samplers.euler_sampler(net, z, None, sigmas, clip_denoised=True)
    torch.testing.assert_close(got, zt, rtol=1e-12, atol=1e-12)
    assert got.abs().max() <= 1 and samplers.euler_sampler(net, z, None, sigmas).abs().max() > 1.5
    net.sampling_spec = dict(ONE_STEP, num_steps=4, clip_denoised=True)  # a PD student: no flags needed
    assert torch.equal(samplers.sample(net, z), got)


def test_iddpm_network_with_iddpm_discretization_visits_its_levels():
    """--disc=iddpm on an iDDPM network (EDM's golden one): every level it is called at is one of its own u[j]."""
    from golden import build_golden_net
    net = build_golden_net('iddpm_dhariwal_16')
    seen = []
    forward = net.forward
    net.forward = lambda x, sigma, *args, **kwargs: seen.append(torch.as_tensor(sigma).reshape(-1)) or forward(x, sigma, *args, **kwargs)
    z = torch.randn([1, net.img_channels, 16, 16], generator=torch.Generator().manual_seed(9))
    labels = torch.eye(net.label_dim)[[1]] if net.label_dim else None
    samplers.sample(net, z, labels, discretization='iddpm', num_steps=4)
    levels = torch.cat(seen).to(torch.float32)
    assert len(levels) == 7 and all(bool((net.u == v).any()) for v in levels)
