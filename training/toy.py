"""Exact toy problems: an image-space Gaussian mixture with a closed-form denoiser, sampler, moments and metrics.

Data lives in EDM's pixel space [-1, 1]. Component k (= class k) is N(mu_k, t_k^2 I) with weight w_k, where mu_k is a
smooth template image (coloured Gaussian blobs squashed by tanh). Noised by s, component k becomes
N(mu_k, (t_k^2 + s^2) I), so the ideal denoiser is exact:

    D*(x; s, c) = sum_k g_k(x) * (mu_k + t_k^2 / (t_k^2 + s^2) * (x - mu_k)),

with g the posterior over components (prior w, or the one-hot class c). `GMMDenoiser` wraps it with the
preconditioner interface, so it is a perfect teacher, a ground truth for metrics and (with and without labels) an
exact pair for classifier-free guidance.

This module's source is embedded in pickles (EDM protocol): module-level imports stay numpy, torch and
torch_utils.persistence.
"""

import numpy as np
import torch

from torch_utils import persistence

# ----------------------------------------------------------------------------
# The mixture's parameters, generated from a seed.

def make_mixture(img_resolution=16, img_channels=3, num_components=10, seed=0, num_blobs=4, mean_scale=0.7,
                 std_min=0.05, std_max=0.15, weight_ratio=4.0):
    """Deterministic means [K,C,H,W], stds [K] and weights [K] (float64 numpy) for a seed.

    Templates are defined on continuous coordinates, so one seed gives the same problem at every resolution.
    """
    K, C, B = num_components, img_channels, num_blobs
    rng = np.random.default_rng(seed)
    background = rng.uniform(-0.5, 0.5, size=[K, C])
    centers = rng.uniform(0.15, 0.85, size=[K, B, 2])
    radii = rng.uniform(0.1, 0.3, size=[K, B])
    colours = rng.uniform(-1.5, 1.5, size=[K, B, C])
    log_stds = rng.uniform(np.log(std_min), np.log(std_max), size=[K])
    log_weights = rng.uniform(-0.5, 0.5, size=[K]) * np.log(weight_ratio)  # max/min weight <= weight_ratio

    u = (np.arange(img_resolution) + 0.5) / img_resolution  # pixel centres in [0, 1]
    d2 = (u[None, None, :, None] - centers[:, :, 0, None, None]) ** 2 + \
         (u[None, None, None, :] - centers[:, :, 1, None, None]) ** 2  # [K, B, H, W]
    blobs = np.exp(-0.5 * d2 / radii[:, :, None, None] ** 2)
    images = background[:, :, None, None] + np.einsum('kbc,kbhw->kchw', colours, blobs)
    means = mean_scale * np.tanh(images)  # smooth and bounded by mean_scale
    stds = np.exp(log_stds)
    weights = np.exp(log_weights) / np.exp(log_weights).sum()
    return means, stds, weights


def mixture_moments(means, stds, weights):
    """Exact mean [D] and covariance [D,D]: sum_k w_k (t_k^2 I + mu_k mu_k^T) - mu mu^T."""
    M = np.asarray(means, dtype=np.float64).reshape(len(weights), -1)
    w = np.asarray(weights, dtype=np.float64)
    mu = w @ M
    sigma = (M.T * w) @ M - np.outer(mu, mu)
    sigma[np.diag_indices_from(sigma)] += w @ np.asarray(stds, dtype=np.float64) ** 2
    return mu, sigma


def sample_mixture(means, stds, weights, num, generator=None, class_idx=None):
    """Exact draws x = mu_k + t_k n (float64) with k ~ weights unless given; classes are drawn before the noise."""
    if class_idx is None:
        class_idx = torch.multinomial(weights, num, replacement=True, generator=generator)
    n = torch.randn([num, *means.shape[1:]], generator=generator, dtype=torch.float64, device=means.device)
    x = means[class_idx] + stds[class_idx].reshape(-1, 1, 1, 1) * n
    return x, class_idx

# ----------------------------------------------------------------------------
# The exact denoiser with the EDM preconditioner interface.

@persistence.persistent_class
class GMMDenoiser(torch.nn.Module):
    """Exact D(x; s, c) of the mixture. Labels: None or an all-zero row means unconditional (prior w);
    a non-zero row c (one-hot in practice) replaces the prior by c, so a one-hot label selects its component.
    `label_dim` is 0 (labels ignored, as EDM's unconditional networks) or num_components."""

    def __init__(self,
        img_resolution  = 16,       # Image resolution.
        img_channels    = 3,        # Number of colour channels.
        num_components  = 10,       # K: number of components (= classes).
        seed            = 0,        # Seed of the templates, stds and weights.
        label_dim       = 0,        # 0 = unconditional interface, K = class-conditional (None still = unconditional).
        **mixture_kwargs,           # Template parameters, see make_mixture().
    ):
        super().__init__()
        if label_dim not in (0, num_components):
            raise ValueError(f'label_dim must be 0 or num_components={num_components}, got {label_dim}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.num_components = num_components
        self.label_dim = label_dim
        self.use_fp16 = False
        self.sigma_min = 0
        self.sigma_max = float('inf')
        means, stds, weights = make_mixture(img_resolution, img_channels, num_components, seed, **mixture_kwargs)
        # Buffers too, so that a loader that builds from init kwargs and then loads the state dict works.
        self.register_buffer('means', torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer('stds', torch.as_tensor(stds, dtype=torch.float64))
        self.register_buffer('weights', torch.as_tensor(weights, dtype=torch.float64))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _prepare(self, x, sigma):
        """Validate shapes; x as float64 [N, D], sigma^2 as float64 [N or 1, 1]."""
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f'Expected x of shape [N, {", ".join(map(str, shape))}], got {list(x.shape)}')
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f'sigma must be a scalar or have one entry per image ({x.shape[0]}), got {sigma.shape[0]}')
        return x.to(torch.float64).flatten(1), sigma.square()

    def _log_prior(self, class_labels, N):
        """Log prior over components [N or 1, K]: the weights, or the label row where it is non-zero."""
        log_w = self.weights.log()[None]
        if class_labels is None or self.label_dim == 0:
            return log_w
        c = torch.as_tensor(class_labels, device=self.weights.device).to(torch.float64).reshape(-1, self.label_dim)
        if c.shape[0] not in (1, N):
            raise ValueError(f'class_labels must have 1 or {N} rows, got {c.shape[0]}')
        if (c < 0).any():
            raise ValueError('class_labels must be non-negative (one-hot rows, or all-zero for unconditional)')
        uncond = (c.sum(dim=1, keepdim=True) == 0)
        return torch.where(uncond, log_w, c.log())

    def _log_joint(self, x, s2, class_labels):
        """log p(k) + log N(x; mu_k, (t_k^2 + s^2) I) as [N, K] (float64)."""
        v = self.stds.square()[None] + s2  # [N or 1, K]
        d2 = (x[:, None, :] - self.means.flatten(1)[None]).square().sum(dim=2)  # [N, K]
        log_lik = -0.5 * d2 / v - 0.5 * x.shape[1] * torch.log(2 * np.pi * v)
        return self._log_prior(class_labels, x.shape[0]) + log_lik

    def log_posterior(self, x, sigma, class_labels=None):
        """log g_k(x) [N, K]: the posterior over components of a noisy image."""
        x, s2 = self._prepare(x, sigma)
        return self._log_joint(x, s2, class_labels).log_softmax(dim=1)

    def log_prob(self, x, sigma, class_labels=None):
        """Exact log density [N] of the noised mixture p_s(x) (float64, differentiable in x: Tweedie checks)."""
        x, s2 = self._prepare(x, sigma)
        return self._log_joint(x, s2, class_labels).logsumexp(dim=1)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x64, s2 = self._prepare(x, sigma)
        g = self._log_joint(x64, s2, class_labels).softmax(dim=1)  # [N, K]
        a = self.stds.square()[None] / (self.stds.square()[None] + s2)  # shrinkage t_k^2 / (t_k^2 + s^2)
        D = (g * a).sum(dim=1, keepdim=True) * x64 + (g * (1 - a)) @ self.means.flatten(1)
        return D.reshape(x.shape).to(torch.float32)

    def sample(self, num, generator=None, class_idx=None):
        """Exact samples (float64 [N,C,H,W]) and their components [N]."""
        return sample_mixture(self.means, self.stds, self.weights, num, generator=generator, class_idx=class_idx)

    def moments(self):
        """Exact mean [D] and covariance [D,D] of the clean data (float64 numpy)."""
        return mixture_moments(self.means.cpu().numpy(), self.stds.cpu().numpy(), self.weights.cpu().numpy())


def guided_denoiser(net, x, sigma, class_labels, w):
    """Classifier-free guidance in D-space, D_w = D_c + w (D_c - D_u); exact for GMMDenoiser (None = unconditional)."""
    D_c = net(x, sigma, class_labels)
    D_u = net(x, sigma, None)
    return D_c + w * (D_c - D_u)

# ----------------------------------------------------------------------------
# Fitting a network to D* by regression: exact targets on fresh exact samples.

def fit_denoiser(net, gmm, num_steps, batch_size=128, lr=2e-3, p_uncond=0.1, p_loguniform=0.25, P_mean=-1.2,
                 P_std=1.2, sigma_min=0.002, sigma_max=80, seed=0):
    """Regress `net` onto gmm's D*; yields (step, loss) after each Adam step.

    Noise levels: EDM's ln s ~ N(P_mean, P_std^2), mixed (probability p_loguniform) with log-uniform on
    [sigma_min, sigma_max] so the high noise levels a sampler starts from are fitted too. Loss: EDM weight
    lam(s) = (s^2 + 0.5^2) / (0.5 s)^2 times the squared error per pixel. With probability p_uncond the label is
    all-zero and the target is the unconditional D*, so the zero label of the fitted net means "unconditional"
    (build the net with label_dropout=p_uncond so that its pickle says so). The net runs in eval mode: labels are
    dropped here, with their exact targets, so the net's own label dropout must not fire (toy nets have no dropout).
    Learning rate: linear warm-up over the first 5% of steps, then cosine decay to 0. An EDM2 network keeps
    unit-norm weights (forced weight normalisation after every update).
    """
    if net.label_dim not in (0, gmm.label_dim):
        raise ValueError(f'The net has label_dim={net.label_dim}, the exact denoiser {gmm.label_dim}: build both '
                         f'conditional (label_dim=num_components) or the net unconditional (label_dim=0)')
    from training import networks_edm2  # here, not at the top: this module's source is embedded in pickles
    device = gmm.means.device
    generator = torch.Generator(device).manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.eval()

    def rand(*shape):
        return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)

    for step in range(num_steps):
        x0, k = gmm.sample(batch_size, generator=generator)
        labels = None
        if net.label_dim:
            labels = torch.nn.functional.one_hot(k, gmm.num_components).to(torch.float64)
            labels *= (rand(batch_size, 1) >= p_uncond)  # all-zero row = unconditional
        log_sigma = torch.where(
            rand(batch_size) < p_loguniform,
            np.log(sigma_min) + rand(batch_size) * (np.log(sigma_max) - np.log(sigma_min)),
            P_mean + P_std * torch.randn([batch_size], generator=generator, dtype=torch.float64, device=device))
        sigma = log_sigma.exp()
        x = x0 + sigma.reshape(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator, dtype=torch.float64,
                                                          device=device)
        with torch.no_grad():
            target = gmm(x, sigma, labels)
        sigma32 = sigma.to(torch.float32)
        weight = (sigma32 ** 2 + 0.25) / (0.5 * sigma32) ** 2
        D = net(x.to(torch.float32), sigma32, None if labels is None else labels.to(torch.float32))
        loss = (weight.reshape(-1, 1, 1, 1) * (D - target) ** 2).mean()
        ramp = min((step + 1) / max(0.05 * num_steps, 1), 1)
        for group in opt.param_groups:
            group['lr'] = lr * ramp * 0.5 * (1 + np.cos(np.pi * step / num_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        networks_edm2.force_weight_normalization(net)  # EDM2 networks: unit-norm weights after every update
        yield step, loss.item()

# ----------------------------------------------------------------------------
# Exact metrics against the mixture.

QUANT_VAR = (1 / 127.5) ** 2 / 12  # variance of the uniform rounding error of a uint8 round trip in [-1, 1]


def to_uint8(x):
    """EDM's image quantisation: clip(x * 127.5 + 128, 0, 255), truncated."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def from_uint8(images):
    """uint8 [N,C,H,W] (numpy) -> float64 [N, D] in [-1, 1]."""
    return (np.asarray(images, dtype=np.float64).reshape(len(images), -1) - 127.5) / 127.5


def _trace_sqrt_product(S, R):
    """tr sqrtm(S R) for symmetric PSD S, R, as the sum of sqrt eigenvalues of R^1/2 S R^1/2 (real, stable)."""
    lam, V = np.linalg.eigh(R)
    R_half = (V * np.sqrt(lam.clip(0))) @ V.T
    return np.sqrt(np.linalg.eigvalsh(R_half @ S @ R_half).clip(0)).sum()


def mixture_metrics(batches, means, stds, weights, quantized=True):
    """FD, mode coverage TV, precision and spread of samples against the mixture with these means, stds, weights.

    batches: iterable of float arrays [n, D] in [-1, 1]. Pass the weights the samples' classes were drawn with
    (uniform for generate.py's random labels).
    - FD: Frechet distance to the exact mean and covariance (unbiased sample covariance, as FID).
    - mode TV: 0.5 sum_k |hist_k - w_k|, a sample's mode being its most probable component at s = 0.
    - precision: share of samples within the 99% radius of their component, t_k sqrt(chi2_0.99(D)).
    - spread: mean |x - mu_k|^2 / (D t_k^2) over samples, 1 when exact. In high dimension the 99% radius is only a
      few percent above the typical distance, so precision is a sharp test of the per-component scale; spread says
      by how much it is off.
    With quantized=True the samples went through uint8, whose rounding adds independent noise of variance QUANT_VAR
    per pixel: it is added to the covariance and the component variances, so exact samples score the same after
    saving as before.
    """
    means = np.asarray(means, dtype=np.float64).reshape(len(weights), -1)
    weights = np.asarray(weights, dtype=np.float64)
    K, D = means.shape
    q2 = QUANT_VAR if quantized else 0.0
    v = np.asarray(stds, dtype=np.float64) ** 2 + q2  # per-component variance [K]
    from scipy.stats import chi2  # only for the 99% radius, so the module itself needs numpy and torch alone
    r2_99 = v * chi2.ppf(0.99, D)
    n, s1, s2 = 0, np.zeros(D), np.zeros([D, D])
    hist, inside, spread = np.zeros(K, dtype=np.int64), 0, 0.0
    for x in batches:
        x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
        if x.shape[1] != D:
            raise ValueError(f'Samples have {x.shape[1]} values each, the problem has {D} (check resolution/channels)')
        n += len(x)
        s1 += x.sum(axis=0)
        s2 += x.T @ x
        d2 = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]  # [n, K]
        with np.errstate(divide='ignore'):  # a zero weight gives log 0 = -inf: never assigned
            k = np.argmax(np.log(weights) - 0.5 * d2 / v - 0.5 * D * np.log(v), axis=1)  # posterior mode at s = 0
        hist += np.bincount(k, minlength=K)
        d2_k = d2[np.arange(len(x)), k]
        inside += int((d2_k <= r2_99[k]).sum())
        spread += float((d2_k / (D * v[k])).sum())
    if n < 2:
        raise ValueError(f'Need at least 2 samples for the metrics, got {n}')
    mu = s1 / n
    S = (s2 - n * np.outer(mu, mu)) / (n - 1)  # unbiased, as FID
    mu_ref, R = mixture_moments(means, np.sqrt(v), weights)  # quantisation noise included via v
    fd = ((mu - mu_ref) ** 2).sum() + np.trace(S) + np.trace(R) - 2 * _trace_sqrt_product(S, R)
    return dict(num=n, fd=float(fd), mode_tv=float(0.5 * np.abs(hist / n - weights).sum()),
                precision=float(inside / n), spread=spread / n, mode_hist=(hist / n).tolist())
