"""EDM's training losses (VP, VE, EDM) with their class names and constructor keywords, so official snapshots'
`loss_fn` entries map onto them. Each returns the per-pixel weighted loss; the caller sums and normalises.

This module's source is embedded into snapshot pickles, and EDM's readers exec it beside their own `training`
package: keep its imports to torch and torch_utils. Called as EDM calls it, `loss_fn(net=, images=, labels=,
augment_pipe=)`, it draws from torch's global RNG and calls the pipe as EDM does; the training loop passes `rnd`.
"""

import torch

from torch_utils import persistence

# ----------------------------------------------------------------------------

def _draw(rnd, kind, name, images, *shape):
    """[N, *shape] from the loop's stream `name` (rnd), or from torch's global RNG when called without one."""
    if rnd is not None:
        return getattr(rnd, kind)(name, *shape)
    return getattr(torch, kind)([images.shape[0], *shape], device=images.device)


def _denoise(net, images, labels, sigma, weight, augment_pipe, rnd):
    y, augment_labels = images, None
    if augment_pipe is not None:
        y, augment_labels = augment_pipe(images) if rnd is None else augment_pipe(images, rnd=rnd)
    n = _draw(rnd, 'randn', 'loss_noise', images, *images.shape[1:]) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)

# ----------------------------------------------------------------------------
# VP (Song et al. 2021): t ~ U(epsilon_t, 1), sigma = sigma_vp(t), weight 1/sigma^2.

@persistence.persistent_class
class VPLoss:
    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None, rnd=None):
        t = 1 + _draw(rnd, 'rand', 'loss_sigma', images, 1, 1, 1) * (self.epsilon_t - 1)
        sigma = self.sigma(t)
        return _denoise(net, images, labels, sigma, 1 / sigma ** 2, augment_pipe, rnd)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

# ----------------------------------------------------------------------------
# VE (Song et al. 2021): sigma log-uniform on [sigma_min, sigma_max], weight 1/sigma^2.

@persistence.persistent_class
class VELoss:
    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None, rnd=None):
        u = _draw(rnd, 'rand', 'loss_sigma', images, 1, 1, 1)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** u)
        return _denoise(net, images, labels, sigma, 1 / sigma ** 2, augment_pipe, rnd)

# ----------------------------------------------------------------------------
# EDM (Karras et al. 2022): ln(sigma) ~ N(P_mean, P_std^2), weight lambda = (sigma^2 + sd^2) / (sigma * sd)^2.

@persistence.persistent_class
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None, rnd=None):
        sigma = (_draw(rnd, 'randn', 'loss_sigma', images, 1, 1, 1) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return _denoise(net, images, labels, sigma, weight, augment_pipe, rnd)
