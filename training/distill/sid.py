"""Score identity Distillation (SiD; Zhou et al., ICML 2024, arXiv 2404.04057) and SiDA's adversarial term (Zhou et
al., ICLR 2025, arXiv 2410.14919), on DMD's machinery.

The networks are DMD's: the frozen teacher f_phi (the real score), the fake score f_psi, and the one-step generator
x = G(z) = G_net(s_init*z; s_init, c) with SiD's s_init = 2.5. A step first fits f_psi to the current G's samples by
denoising (DMD's fake-score update at EDM's log-normal noise levels, SiD's choice), then updates G once.

Generator loss, per sample: x_t = x + s*n, y_r = f_phi(x_t; s), y_f = f_psi(x_t; s),
    L = sum over pixels of (y_r - y_f) * ((y_r - x) - alpha*(y_r - y_f)) / w,   w = sg(mean over pixels of |x - y_r|),
with alpha = 1.2 and w the per-sample normalisation (clamped at 1e-5; the sum over pixels is the official code's).
What is differentiated: L with respect to G's weights through every appearance of x = G(z), i.e. explicitly in
(y_r - x) and through x_t = x + s*n inside both y_r and y_f. Both score networks are frozen (phi and psi get no
gradient, but d y / d x_t flows back to G); w is a constant.
Noise levels: t ~ U[0, t_max/1000] and s is the Karras map at u = 1 - t (u = 1 is s_min), so t_max = 800 keeps
s in [0.002, 24.4] and never uses the largest levels.

Special cases of alpha (Gaussian derivations in tests/test_sid.py): alpha = 0 gives (y_r - y_f).(y_r - x), whose
expectation equals the score-matching loss |y_r - y_f|^2 when f_psi is G's exact score (the score identity); alpha = 1
gives (y_r - y_f).(y_f - x), of expectation zero there; the expected gradient is half the gradient of that loss (the
fake score's dependence on G included) at alpha = 1/2, and each other alpha adds (1/2 - alpha) times its gradient with
the fake score frozen.

SiDA (gan_g_weight > 0, with real images): DMD2's GAN head on f_psi's bottleneck and DMD's classifier loss in the
fake-score update; the generator gets gan_g_weight * softplus(-logit(x_t)) on the same x_t, normalised like the SiD
term (times C*H*W, divided by w), as SiDA does (its weight 0.01 against the SiD term's 100: 1e-4).

Defaults are the paper's (official README): Adam betas (0, 0.999) for both networks (FFHQ: generator beta1 0.9), no
gradient clipping, lr 1e-5 (ImageNet-64 4e-6, AFHQv2 5e-6), alpha 1.2 (AFHQv2 1.0), EMA half-life 0.5 Mimg.
Not done, unlike the official code: dropout in G and f_psi during their updates, EDM's augmentation in f_psi's loss,
and SiDA's channel-mean classifier with its warm-up (here the networks run in eval mode, as in DMD).
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import training_stats
from training.distill.dmd import DMD
from training.samplers import karras_sigma

# ----------------------------------------------------------------------------

class SiD(DMD):
    def __init__(self,
        teacher,                        # frozen teacher: the real score f_phi, and the initial weights of G and f_psi
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        dataset         = None,         # real images for SiDA's adversarial term, else unused
        sigma_init      = 2.5,          # generator input noise level s_init
        alpha           = 1.2,          # loss = (y_r - y_f).(y_r - x) - alpha*|y_r - y_f|^2 (AFHQv2: 1.0)
        t_max           = 800,          # generator-loss noise levels: t ~ U[0, t_max/1000], s = Karras(1 - t)
        lr              = 1e-5,         # generator learning rate (ImageNet-64: 4e-6, AFHQv2: 5e-6)
        fake_lr         = None,         # fake-score learning rate, None = lr
        g_beta1         = 0.0,          # generator Adam beta1 (FFHQ: 0.9); the fake score's is 0
        max_grad_norm   = None,         # gradient clipping of both networks, None = off (SiD)
        lr_rampup_kimg  = 0,            # linear learning-rate warm-up of both networks
        fake_sigma      = 'lognormal',  # fake-score noise levels: EDM's log-normal (SiD) or DMD's Karras grid
        gan_g_weight    = 0.0,          # SiDA: generator adversarial weight (1e-4), 0 = off
        gan_d_weight    = 1e-2,         # SiDA: classifier loss weight, added to the fake-score loss (DMD2's)
        ema_halflife_kimg = 500,        # generator EMA half-life, None = no EMA
        ema_rampup_ratio  = 0.05,
        sigma_min       = 0.002,        # Karras map of the generator-loss noise levels
        sigma_max       = 80.0,
        rho             = 7.0,
        guide_net       = None,         # autoguidance (EDM2): the real score is guide_net.lerp(teacher, guidance)
        guidance        = 1.0,          # autoguidance weight w (1 = the teacher alone)
    ):
        if not 0 < t_max <= 1000:
            raise ValueError(f't_max must be in (0, 1000], not {t_max}')
        super().__init__(teacher, device, batch_size, dataset=dataset, sigma_init=sigma_init, lr=lr, fake_lr=fake_lr,
                         betas=(g_beta1, 0.999), fake_betas=(0.0, 0.999), weight_decay=0,  # AdamW without decay: Adam
                         max_grad_norm=max_grad_norm, lr_rampup_kimg=lr_rampup_kimg, fake_sigma=fake_sigma,
                         sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, gan_g_weight=gan_g_weight,
                         gan_d_weight=gan_d_weight, ema_halflife_kimg=ema_halflife_kimg,
                         ema_rampup_ratio=ema_rampup_ratio, guide_net=guide_net, guidance=guidance)
        self.alpha = float(alpha)
        self.t_max = t_max
        self.rho = rho
        self.numel = math.prod(self.img_shape)

    # ------------------------------------------------------------------------
    # One step: the fake score learns the current G's samples, then G takes one step against it.

    def step(self, rounds, cur_nimg):
        self.fake_step(rounds, [None] * len(rounds), cur_nimg)  # fresh samples of the current G (streams 'z', 'c')

        def generator_loss(r):
            c = r.random_labels('c_g', self.label_dim)
            x = self.generate(self.G, r.randn('z_g', *self.img_shape), c)  # independent of the fake score's samples
            return training_stats.report('Loss/G_total', self.distribution_matching_loss(x, r, c))

        self.generator_step(rounds, generator_loss, cur_nimg)
        self.num_steps += 1
        if self.ema is not None:
            self.ema.update(cur_nimg + self.batch_size, self.batch_size)
        training_stats.report('Progress/G_steps', self.num_g_steps)

    def distribution_matching_loss(self, x, r, c):
        """SiD's generator loss (plus SiDA's term) at noise levels t ~ U[0, t_max/1000]. DisBack's hook: the real
        score comes from self.real_score, which DisBack replaces by its walk."""
        t = r.rand('sid_t') * (self.t_max / 1000)
        sigma = karras_sigma(1 - t, self.sigma_grid[-1], self.sigma_grid[0], self.rho)  # the teacher-clamped range
        return self.identity_loss(x, sigma, r.randn('sid_n', *self.img_shape), c)

    def identity_loss(self, x, sigma, n, c):
        """Per-sample loss at given noise levels and noise (the module docstring says what carries gradients)."""
        x_t = x + sigma.view(-1, 1, 1, 1) * n
        y_r = self.real_score(x_t, sigma, c)
        y_f = self.fake(x_t, sigma, c)
        w = (x - y_r).detach().abs().mean(dim=[1, 2, 3]).clamp(min=1e-5)
        sid = ((y_r - y_f) * ((y_r - x) - self.alpha * (y_r - y_f))).mean(dim=[1, 2, 3])
        loss = training_stats.report('Loss/G_sid', sid * self.numel / w)
        if self.head is not None:  # SiDA: the classifier's non-saturating loss on the same x_t, normalised alike
            f_fake = self.head(self.bottleneck(x_t, sigma, c).to(torch.float32))
            loss = loss + self.gan_g_weight * self.numel * training_stats.report('Loss/G_gan', F.softplus(-f_fake)) / w
        return loss
