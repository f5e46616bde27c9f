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

A one-step DMD generator: {'solver': 'euler', 'grid': 'nested', 'num_steps': 1, 'sigma_min': 0.002,
'sigma_max': 80.0, 'rho': 7}, i.e. x = D(80*z; 80) with one network evaluation. A 4-step progressive
distillation student: the same with 'num_steps': 4.
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
# Samplers.

def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, solver='heun',
                model_kwargs=None):
    """EDM Algorithm 2: churn, Euler step, Heun correction (except on the last step). NFE 2N-1 (Heun) or N (Euler)."""
    if solver not in ('heun', 'euler'):
        raise ValueError(f'Unknown solver "{solver}" (use \'heun\' or \'euler\')')
    model_kwargs = model_kwargs or {}
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = edm_sigmas(num_steps, sigma_min, sigma_max, rho, net.round_sigma).to(latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: raise the noise level to t_hat by adding fresh noise (drawn every step so streams stay aligned).
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur * (1 + gamma))
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next along dx/dt = (x - D(x; t))/t.
        denoised = net(x_hat, t_hat, class_labels, **model_kwargs).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun correction: average the slopes at both ends (skipped at t_next = 0, where the slope is undefined).
        if solver == 'heun' and i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels, **model_kwargs).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def euler_sampler(net, latents, class_labels, sigmas, model_kwargs=None):
    """Deterministic Euler (DDIM) on a given grid: x' = D + (s'/s)(x - D). One-step: x = D(s_0*z; s_0) exactly."""
    model_kwargs = model_kwargs or {}
    sigmas = sigmas.to(device=latents.device, dtype=torch.float64)
    x = latents.to(torch.float64) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = net(x, sigma, class_labels, **model_kwargs).to(torch.float64)
        # Same as x + (s' - s)(x - D)/s, written so that a step to s' = 0 lands exactly on D.
        x = denoised + (sigma_next / sigma) * (x - denoised)
    return x

# ----------------------------------------------------------------------------
# Dispatch on the network's sampling spec (see the module docstring).

_defaults = dict(solver='heun', grid='edm', num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                 S_churn=0, S_min=0, S_max=float('inf'), S_noise=1)
_churn_keys = ('S_churn', 'S_min', 'S_max', 'S_noise')


def sampler_settings(net, **overrides):
    """EDM defaults <- the network family's defaults (net.sampler_defaults, e.g. EDM2's 32 steps) <- net.sampling_spec
    <- overrides that are not None; validated."""
    spec = dict(getattr(net, 'sampling_spec', None) or {})
    given = {**spec, **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(given) - set(_defaults))
    if unknown:
        raise ValueError(f'Unknown sampler setting(s) {unknown}; valid keys are {sorted(_defaults)}')
    s = {**_defaults, **getattr(net, 'sampler_defaults', {}), **given}
    if s['grid'] not in ('edm', 'nested'):
        raise ValueError(f'Unknown grid "{s["grid"]}" (use \'edm\' or \'nested\')')
    if s['solver'] not in ('heun', 'euler'):
        raise ValueError(f'Unknown solver "{s["solver"]}" (use \'heun\' or \'euler\')')
    if not 0 < s['sigma_min'] < s['sigma_max']:
        raise ValueError(f'Need 0 < sigma_min < sigma_max (got sigma_min={s["sigma_min"]}, sigma_max={s["sigma_max"]})')
    if s['grid'] == 'edm' and s['num_steps'] < 2:
        raise ValueError(f'Grid \'edm\' needs num_steps >= 2 (got {s["num_steps"]}); one-step sampling is for '
                         f'distilled generators (sampling_spec grid \'nested\')')
    if s['grid'] == 'nested':
        if s['solver'] != 'euler':
            raise ValueError('Grid \'nested\' (a distilled student) is sampled with solver \'euler\'; drop the solver '
                             'override')
        churn = [k for k in _churn_keys if k in given]
        if churn:
            raise ValueError(f'{churn} apply only to grid \'edm\'; this network samples deterministically on grid '
                             f'\'nested\', drop them')
    return s


def sample(net, latents, class_labels=None, randn_like=torch.randn_like, model_kwargs=None, **overrides):
    """Sample `net` the way its sampling_spec says (EDM's Heun sampler if it has none); returns float64 images."""
    s = sampler_settings(net, **overrides)
    if s['grid'] == 'nested':
        sigmas = nested_sigmas(s['num_steps'], s['sigma_min'], s['sigma_max'], s['rho'])
        return euler_sampler(net, latents, class_labels, sigmas, model_kwargs=model_kwargs)
    return edm_sampler(net, latents, class_labels, randn_like, num_steps=s['num_steps'], sigma_min=s['sigma_min'],
                       sigma_max=s['sigma_max'], rho=s['rho'], S_churn=s['S_churn'], S_min=s['S_min'],
                       S_max=s['S_max'], S_noise=s['S_noise'], solver=s['solver'], model_kwargs=model_kwargs)

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
