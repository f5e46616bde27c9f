"""Samplers as plain functions of (net, latents, noise levels): EDM's Heun sampler and Euler on nested grids.

`net` is a preconditioned denoiser `D = net(x, sigma, class_labels, **model_kwargs)` with `sigma_min`,
`sigma_max` and `round_sigma(sigma)`. The sampler state is float64; the network casts its input to float32.

Sampling spec (the contract with the distillation methods)
---------------------------------------------------------
A network that must be sampled in a particular way carries `net.sampling_spec`, a plain dict of Python
scalars (it pickles with the network and is readable as JSON). `sample()` reads it, so generate.py, previews
and FID need no flags for students. Every key is optional; a missing key takes EDM's default; explicit
user overrides win over the spec. Unknown keys are an error.

    solver      'heun' | 'euler'   second-order Heun (Algorithm 2, NFE 2N-1) or first-order Euler (NFE N)
    grid        'edm' | 'nested'   'edm': t_i = s(i/(N-1)), rounded with net.round_sigma, sigma range clamped to
                                   the network's; 'nested': t_i = s(i/N), i = 0..N-1, used as given (progressive
                                   distillation; grids nest when N halves). 'nested' needs solver 'euler' and no
                                   S_* keys.
    num_steps   N                  number of steps (18)
    sigma_min   smin               (0.002)
    sigma_max   smax               (80); with grid 'nested' and N = 1 this is a one-step generator's input level
    rho         rho                (7); s(u) = (smax^(1/rho) + u*(smin^(1/rho) - smax^(1/rho)))^rho
    S_churn, S_min, S_max, S_noise stochastic churn of Algorithm 2 (0, 0, inf, 1), grid 'edm' only
    discretization, schedule, scaling
                'vp'|'ve'|'iddpm'|'edm', 'vp'|'ve'|'linear', 'vp'|'none': EDM's ablation options (generate.py --disc,
                --schedule, --scaling; Karras et al. 2022, Table 1), grid 'edm' only. Defaults 'edm', 'linear',
                'none' (Algorithm 2); sigma_min/sigma_max then default per discretization, as in EDM's generate.py
    clip_denoised  True | False    clip the denoised image D to [-1, 1] at every step (False); progressive and
                                   guided distillation students carry True, as the official evaluation
                                   (`eval_clip_denoised=True`)

A one-step DMD generator: {'solver': 'euler', 'grid': 'nested', 'num_steps': 1, 'sigma_min': 0.002,
'sigma_max': 80.0, 'rho': 7}, i.e. x = D(80*z; 80) with one network evaluation. A 4-step progressive
distillation student: the same with 'num_steps': 4 and 'clip_denoised': True.
"""

import math

import torch

# ----------------------------------------------------------------------------
# Per-seed randomness, so an image depends only on its seed (not on batch size or process count).

class StackedRandomGenerator:
    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    # size[0] is the batch: image k draws size[1:] from its own stream.
    def randn(self, size, **kwargs):
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x):
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, high, size, **kwargs):
        kwargs.setdefault('device', self.device)
        return torch.stack([torch.randint(high, size=size[1:], generator=g, **kwargs) for g in self.generators])

# ----------------------------------------------------------------------------
# Noise-level grids (float64, descending, terminal 0).

def karras_sigma(u, sigma_min, sigma_max, rho):
    """s(u): u = 0 -> sigma_max, u = 1 -> sigma_min, evenly spaced in sigma^(1/rho) (EDM eq. 5)."""
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def edm_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma=torch.as_tensor):
    """EDM's grid t_i = s(i/(N-1)), i = 0..N-1, rounded to levels the network supports, then t_N = 0."""
    if num_steps < 2:
        raise ValueError(f'EDM\'s grid needs num_steps >= 2 (got {num_steps}); for one-step sampling use '
                         f'solver \'euler\' with grid \'nested\'')
    i = torch.arange(num_steps, dtype=torch.float64)
    t = round_sigma(karras_sigma(i / (num_steps - 1), sigma_min, sigma_max, rho))
    return torch.cat([t, t.new_zeros(1)])


def nested_sigmas(num_steps, sigma_min, sigma_max, rho):
    """Progressive-distillation grid t_i = s(i/N), i = 0..N-1, then 0: the N-step grid is every other point of 2N's."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1 (got {num_steps})')
    i = torch.arange(num_steps, dtype=torch.float64)
    return torch.cat([karras_sigma(i / num_steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])

# ----------------------------------------------------------------------------
# EDM's design space (Karras et al. 2022, Table 1): time steps {t_i}, noise schedule sigma(t), signal scaling s(t).

EPSILON_S = 1e-3                    # VP: the lowest time t
C_1, C_2, M = 0.001, 0.008, 1000    # iDDPM: the level table's constants


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    """VP noise level sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1) of a Python float or a tensor."""
    return (math.e ** (0.5 * beta_d * t ** 2 + beta_min * t) - 1) ** 0.5


# Default noise-level range per discretization, as EDM's generate.py (clamped to the network's own range).
DISCRETIZATION_RANGE = dict(vp=(vp_sigma(EPSILON_S), vp_sigma(1)), ve=(0.02, 100), iddpm=(0.002, 81), edm=(0.002, 80))


def iddpm_levels():
    """iDDPM's levels u_0 > ... > u_M = 0 (float64) by EDM's recurrence, alpha_bar evaluated in float32 as there."""
    alpha_bar = lambda j: (0.5 * math.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1, dtype=torch.float64)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def ablation_sigmas(discretization, num_steps, sigma_min, sigma_max, rho, beta_d, beta_min):
    """The N noise levels of EDM's time-step discretizations (before rounding; float64, descending)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    if discretization == 'vp':  # t evenly from 1 down to epsilon_s, through the VP schedule fitted to the range
        return vp_sigma(1 + i / (num_steps - 1) * (EPSILON_S - 1), beta_d, beta_min)
    if discretization == 've':  # sigma^2 geometric from sigma_max^2 down to sigma_min^2
        return (sigma_max ** 2 * (sigma_min ** 2 / sigma_max ** 2) ** (i / (num_steps - 1))).sqrt()
    if discretization == 'iddpm':  # evenly spaced picks among iDDPM's levels inside the range
        u = iddpm_levels()
        u = u[(u >= sigma_min) & (u <= sigma_max)]
        return u[((len(u) - 1) / (num_steps - 1) * i).round().to(torch.int64)]
    return karras_sigma(i / (num_steps - 1), sigma_min, sigma_max, rho)


def noise_schedule(schedule, beta_d, beta_min):
    """sigma(t), sigma'(t) and sigma^-1 of the schedules 'vp', 've' (sigma = sqrt(t)) and 'linear' (sigma = t)."""
    if schedule == 'vp':
        sigma = lambda t: vp_sigma(t, beta_d, beta_min)
        return (sigma, lambda t: 0.5 * (beta_min + beta_d * t) * (sigma(t) + 1 / sigma(t)),
                lambda s: ((beta_min ** 2 + 2 * beta_d * (s ** 2 + 1).log()).sqrt() - beta_min) / beta_d)
    if schedule == 've':
        return lambda t: t.sqrt(), lambda t: 0.5 / t.sqrt(), lambda s: s ** 2
    return lambda t: t, lambda t: 1, lambda s: s


def signal_scaling(scaling, sigma, sigma_deriv):
    """s(t) and s'(t): 'vp' = 1/sqrt(1 + sigma(t)^2), 'none' = 1."""
    if scaling == 'vp':
        s = lambda t: 1 / (1 + sigma(t) ** 2).sqrt()
        return s, lambda t: -sigma(t) * sigma_deriv(t) * s(t) ** 3
    return lambda t: 1, lambda t: 0


CHOICES = dict(solver=('heun', 'euler'), discretization=tuple(DISCRETIZATION_RANGE), schedule=('vp', 've', 'linear'),
               scaling=('vp', 'none'))


def check_choices(**settings):
    """A ValueError naming the first setting whose value is not one of CHOICES[name]."""
    for name, value in settings.items():
        if value not in CHOICES[name]:
            raise ValueError(f'Unknown {name} "{value}" (use one of {", ".join(CHOICES[name])})')

# ----------------------------------------------------------------------------
# Samplers.

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, solver='heun',
                discretization='edm', schedule='linear', scaling='none', clip_denoised=False, model_kwargs=None):
    """EDM Algorithm 2 (churn, Euler step, Heun correction except on the last step; NFE 2N-1, or N with Euler) in
    EDM's design space: the ODE dx/dt = (sigma'/sigma + s'/s) x - sigma' s/sigma D(x/s; sigma) on the time steps of
    `discretization` (levels rounded by the network), with schedule sigma(t) and scaling s(t). The defaults ('edm',
    'linear', 'none') are Algorithm 2 itself, computed with its own operations (bit for bit). clip_denoised clips D
    to [-1, 1]."""
    check_choices(solver=solver, discretization=discretization, schedule=schedule, scaling=scaling)
    model_kwargs = model_kwargs or {}
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)

    # The VP schedule through the range's ends: sigma(epsilon_s) = sigma_min, sigma(1) = sigma_max.
    beta_d = 2 * (math.log(sigma_min ** 2 + 1) / EPSILON_S - math.log(sigma_max ** 2 + 1)) / (EPSILON_S - 1)
    beta_min = math.log(sigma_max ** 2 + 1) - 0.5 * beta_d
    sigma, sigma_deriv, sigma_inv = noise_schedule(schedule, beta_d, beta_min)
    s, s_deriv = signal_scaling(scaling, sigma, sigma_deriv)
    sigma_steps = ablation_sigmas(discretization, num_steps, sigma_min, sigma_max, rho, beta_d, beta_min)
    t_steps = sigma_inv(net.round_sigma(sigma_steps.to(latents.device)))
    t_steps = torch.cat([t_steps, t_steps.new_zeros(1)])  # t_N = 0

    # The ODE's slope at (x, t), written so that for sigma = t, s = 1 it is (x - D)/t exactly.
    def slope(x, t):
        denoised = net(x / s(t), sigma(t), class_labels, **model_kwargs).to(torch.float64)
        if clip_denoised:
            denoised = denoised.clamp(-1, 1)
        return sigma_deriv(t) * (x - s(t) * denoised) / sigma(t) + s_deriv(t) / s(t) * x

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level to sigma(t_hat) by adding fresh noise (drawn every step so streams stay aligned).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sigma_inv(net.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = s(t_hat) / s(t_cur) * x_cur + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next; Heun correction: average the slopes at both ends (not at t_next = 0).
        d_cur = slope(x_hat, t_hat)
        x_next = x_hat + (t_next - t_hat) * d_cur
        if solver == 'heun' and i < num_steps - 1:
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * slope(x_next, t_next))
    return x_next


def euler_sampler(net, latents, class_labels, sigmas, model_kwargs=None, clip_denoised=False):
    """Deterministic Euler (DDIM) on a given grid: x' = D + (s'/s)(x - D). One-step: x = D(s_0*z; s_0) exactly.
    clip_denoised clips D to [-1, 1] at every step, as progressive distillation's DDIM sampler with clip_x."""
    model_kwargs = model_kwargs or {}
    sigmas = sigmas.to(device=latents.device, dtype=torch.float64)
    x = latents.to(torch.float64) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = net(x, sigma, class_labels, **model_kwargs).to(torch.float64)
        if clip_denoised:
            denoised = denoised.clamp(-1, 1)
        # Same as x + (s' - s)(x - D)/s, written so that a step to s' = 0 lands exactly on D.
        x = denoised + (sigma_next / sigma) * (x - denoised)
    return x

# ----------------------------------------------------------------------------
# Dispatch on the network's sampling spec (see the module docstring).

_defaults = dict(solver='heun', grid='edm', num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                 S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, discretization='edm', schedule='linear',
                 scaling='none', clip_denoised=False)
_edm_grid_keys = ('S_churn', 'S_min', 'S_max', 'S_noise', 'discretization', 'schedule', 'scaling')


def sampler_settings(net, **overrides):
    """EDM defaults <- the discretization's noise-level range (EDM's generate.py: 0.002 to 80 for 'edm') <- the
    network family's defaults (net.sampler_defaults, e.g. EDM2's 32 steps) <- net.sampling_spec <- overrides that
    are not None; validated."""
    spec = dict(getattr(net, 'sampling_spec', None) or {})
    given = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(given) - set(_defaults))
    if unknown:
        raise ValueError(f'Unknown sampler setting(s) {unknown}; valid keys are {sorted(_defaults)}')
    disc = given.get('discretization', _defaults['discretization'])
    check_choices(discretization=disc)
    s = {**_defaults, **dict(zip(('sigma_min', 'sigma_max'), DISCRETIZATION_RANGE[disc])),
         **getattr(net, 'sampler_defaults', {}), **given}
    check_choices(**{name: s[name] for name in CHOICES})
    if s['grid'] not in ('edm', 'nested'):
        raise ValueError(f'Unknown grid "{s["grid"]}" (use \'edm\' or \'nested\')')
    if not 0 < s['sigma_min'] < s['sigma_max']:
        raise ValueError(f'Need 0 < sigma_min < sigma_max (got sigma_min={s["sigma_min"]}, sigma_max={s["sigma_max"]})')
    if s['grid'] == 'edm' and s['num_steps'] < 2:
        raise ValueError(f'Grid \'edm\' needs num_steps >= 2 (got {s["num_steps"]}); one-step sampling is for '
                         f'distilled generators (sampling_spec grid \'nested\')')
    if s['grid'] == 'nested':
        if s['solver'] != 'euler':
            raise ValueError('Grid \'nested\' (a distilled student) is sampled with solver \'euler\'; drop the solver '
                             'override')
        edm_only = [k for k in _edm_grid_keys if k in given]
        if edm_only:
            raise ValueError(f'{edm_only} apply only to grid \'edm\'; this network samples deterministically on grid '
                             f'\'nested\', drop them')
    return s


def sample(net, latents, class_labels=None, randn_like=torch.randn_like, model_kwargs=None, **overrides):
    """Sample `net` the way its sampling_spec says (EDM's Heun sampler if it has none); returns float64 images."""
    s = sampler_settings(net, **overrides)
    if s['grid'] == 'nested':
        sigmas = nested_sigmas(s['num_steps'], s['sigma_min'], s['sigma_max'], s['rho'])
        return euler_sampler(net, latents, class_labels, sigmas, model_kwargs=model_kwargs, clip_denoised=s['clip_denoised'])
    return edm_sampler(net, latents, class_labels, randn_like, **{k: v for k, v in s.items() if k != 'grid'},
                       model_kwargs=model_kwargs)


def require_finite(x, seeds):
    """ValueError naming the seeds whose samples (x[i] for seeds[i]) hold a NaN or an infinity: such samples would be
    written as black images, stored as pairs or scored (a network with NaN weights, a sampler setting out of range)."""
    finite = torch.isfinite(x).flatten(1).all(1).tolist()
    if all(finite):
        return
    bad = [str(seed) for seed, ok in zip(seeds, finite) if not ok]
    more = f' and {len(bad) - 10} more' if len(bad) > 10 else ''
    raise ValueError(f'Sampling gave non-finite values for seed(s) {", ".join(bad[:10])}{more}; nothing was written '
                     f'for them: check the network\'s weights and the sampler settings')

# ----------------------------------------------------------------------------
# Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"): the denoiser
# D_w = D_g + w (D - D_g), with D_g a weaker network of the same task (EDM2: img64-S guided by an early img64-XS).

class Autoguided(torch.nn.Module):
    """A denoiser pair (net, gnet) with guidance weight w, sampled like one network; w = 1 calls net only (EDM2)."""
    def __init__(self, net, gnet, guidance):
        super().__init__()
        ours, theirs = [(n.img_resolution, n.img_channels, n.label_dim) for n in (net, gnet)]
        if ours != theirs:
            raise ValueError(f'The guiding network has (resolution, channels, label_dim) {theirs}, the network {ours}: '
                             f'pick a guiding network of the same task')
        self.net, self.gnet, self.guidance = net, gnet, guidance
        self.img_resolution, self.img_channels, self.label_dim = ours
        self.sigma_min, self.sigma_max = max(net.sigma_min, gnet.sigma_min), min(net.sigma_max, gnet.sigma_max)
        self.use_fp16 = getattr(net, 'use_fp16', False)
        self.sampler_defaults = getattr(net, 'sampler_defaults', {})

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        D = self.net(x, sigma, class_labels, **model_kwargs).to(torch.float32)
        if self.guidance == 1:
            return D
        return self.gnet(x, sigma, class_labels, **model_kwargs).to(torch.float32).lerp(D, self.guidance)
