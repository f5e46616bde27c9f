"""Score identity Distillation (SiD; Zhou et al., ICML 2024, arXiv 2404.04057) and Adversarial SiD (SiDA; Zhou et al.,
ICLR 2025, arXiv 2410.14919), on DMD's machinery, as the official code (mingyuanzhou/SiD, main and `sida` branches).

The networks are DMD's: the frozen teacher f_phi (the real score), the fake score f_psi, and the one-step generator
x = G(z) = G_net(s_init*z; s_init, c) with SiD's s_init = 2.5. A step first fits f_psi to the current G's samples by
denoising at EDM's log-normal noise levels, then updates G once.

Generator loss, per sample: x_t = x + s*n, y_r = f_phi(x_t; s), y_f = f_psi(x_t; s),
    L = sum over pixels of (y_r - y_f) * ((y_r - x) - alpha*(y_r - y_f)) / w,   w = sg(mean over pixels of |x - y_r|),
with alpha = 1.2 and w the per-sample normalisation (clamped at 1e-5). G's update minimises g_loss_scale * L (the
official `--lsg 100`: the loss is multiplied before the backward pass, so Adam's eps acts on 100x the gradient).
What is differentiated: L with respect to G's weights through every appearance of x = G(z), i.e. explicitly in
(y_r - x) and through x_t = x + s*n inside both y_r and y_f. Both score networks are frozen (phi and psi get no
gradient, but d y / d x_t flows back to G); w is a constant.
Noise levels: t ~ U[0, t_max/1000] and s is the Karras map at u = 1 - t (u = 1 is s_min), so t_max = 800 keeps
s in [0.002, 24.4] and never uses the largest levels.

Fake-score loss, per sample: lambda(s) * sum over pixels of (f_psi(y + s*n; s) - y)^2 with y = EDM's augmentation of
sg(G(z)) (G in eval mode), ln s ~ N(-1.2, 1.2^2), lambda = (s^2 + 0.5^2) / (0.5 s)^2: the official reduction (a sum
over pixels, then the batch mean), so Adam sees the official gradients.

Train mode as official: G runs with dropout during its own update (eval while it only draws samples for f_psi), f_psi
with dropout during its update (eval inside G's loss); f_phi is always in eval mode. Dropout masks are keyed by
sample position (training/batching.py), one stream per network, so a step does not depend on the world size.
`dropout` None keeps the teacher's rate, which for EDM's networks is the official per-dataset value (CIFAR-10 0.13,
ImageNet-64 0.10, FFHQ/AFHQv2 0.05). EDM's augmentation (`augment_p`, official 0.12 CIFAR-10, 0.15 FFHQ/AFHQv2,
0 ImageNet-64) applies to the fake-score loss only; the generator loss sees unaugmented images.

Labels: with data (--data), both updates use the data batch's labels (official; it draws a batch per update, here
both use the step's one); without data, uniform random labels.

Special cases of alpha (Gaussian derivations in tests/test_sid.py): alpha = 0 gives (y_r - y_f).(y_r - x), whose
expectation equals the score-matching loss |y_r - y_f|^2 when f_psi is G's exact score (the score identity); alpha = 1
gives (y_r - y_f).(y_f - x), of expectation zero there; the expected gradient is half the gradient of that loss (the
fake score's dependence on G included) at alpha = 1/2, and each other alpha adds (1/2 - alpha) times its gradient with
the fake score frozen.

SiDA (sida=True, with real images): the classifier has no parameters: its logits are the channel mean of f_psi's last
encoder map (one logit per position). In f_psi's update, real images (augmented independently) are noised with the
same s and n as G's samples; per sample, loss_D = lambda(s) * (BCE(real, 1) + BCE(fake, 0)) / 2, each BCE averaged over
positions, is added with weight gan_d_weight (1) to the fake-score loss, and f_psi's gradients are clipped by value
at 1. G's GAN term on the same x_t is gan_g_weight * BCE(clamp(logits, -10, 10), 1) * C*H*W / w; once it is on, G's
loss is 0.5 * (g_loss_scale * L + GAN term) (gan_g_weight 0.01 against 100). G steps only once more than g_start_kimg
(100) thousand images were seen, and the GAN term enters after gan_start_kimg (200), as the official loop counts. One difference from the official
code, for world-size invariance: there each BCE is averaged over the whole per-GPU batch before the per-sample
weights (1/w, lambda(s)) multiply it, so a sample's weight is the batch mean of the weights; here each sample's BCE
carries its own weight (the two agree on a batch of one, and when the weights are equal).

Defaults are the paper's (official README/run_sid.sh): Adam betas (0, 0.999) for both networks (FFHQ: generator beta1
0.9), eps 1e-8 (fp16 runs: 1e-6), no gradient clipping, lr 1e-5 (ImageNet-64 4e-6, AFHQv2 5e-6), alpha 1.2 (AFHQv2 1.0;
SiDA 1.0), EMA half-life 0.5 Mimg. Where the official loop replaces non-finite gradients by finite ones, the shared
updater skips the step (training/optim.py).
"""

import math

import torch
import torch.nn.functional as F

from torch_utils import training_stats
from training import optim
from training.distill.dmd import DMD, Bottleneck
from training.networks import UNetBlock
from training.samplers import karras_sigma

# ----------------------------------------------------------------------------

class _Named:
    """A round's random streams under a prefix: a second augmentation in one round draws its own parameters."""

    def __init__(self, r, prefix):
        self.r, self.prefix = r, prefix

    def randn(self, name, *shape):
        return self.r.randn(self.prefix + name, *shape)

    def rand(self, name, *shape):
        return self.r.rand(self.prefix + name, *shape)

    def randint(self, name, high, *shape):
        return self.r.randint(self.prefix + name, high, *shape)


class EncoderLogits:
    """SiDA's parameter-free classifier: the channel mean of a network's last encoder map, one logit per position.
    `denoise` returns the full output and the logits of one forward pass; `encoder` runs the encoder only."""

    def __init__(self, net):
        self.net = net
        self.encoder_only = Bottleneck(net)
        self.captured = None
        self.capturing = False
        list(net.model.enc.values())[-1].register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        if self.capturing:
            self.captured = output

    @staticmethod
    def _logits(h):
        return h.mean(dim=1).to(torch.float32)  # [N, H', W']

    def denoise(self, x, sigma, labels, **model_kwargs):
        self.capturing = True
        try:
            D = self.net(x, sigma, labels, **model_kwargs)
        finally:
            self.capturing = False
        h, self.captured = self.captured, None
        return D, self._logits(h)

    def encoder(self, x, sigma, labels, **model_kwargs):
        return self._logits(self.encoder_only(x, sigma, labels, **model_kwargs))


def takes_augment_labels(net):
    """Whether a network was built with EDM's augmentation-label input (EDM's CIFAR-10, FFHQ and AFHQv2 networks)."""
    return getattr(getattr(net, 'model', None), 'map_augment', None) is not None

# ----------------------------------------------------------------------------

class SiD(DMD):
    def __init__(self,
        teacher,                        # frozen teacher: the real score f_phi, and the initial weights of G and f_psi
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        dataset         = None,         # data: its labels (and SiDA's real images); None = data-free, uniform labels
        sigma_init      = 2.5,          # generator input noise level s_init
        alpha           = 1.2,          # loss = (y_r - y_f).(y_r - x) - alpha*|y_r - y_f|^2 (AFHQv2 and SiDA: 1.0)
        t_max           = 800,          # generator-loss noise levels: t ~ U[0, t_max/1000], s = Karras(1 - t)
        lr              = 1e-5,         # generator learning rate (ImageNet-64: 4e-6, AFHQv2: 5e-6)
        fake_lr         = None,         # fake-score learning rate, None = lr
        g_beta1         = 0.0,          # generator Adam beta1 (FFHQ: 0.9); the fake score's is 0
        eps             = 1e-8,         # Adam eps of both networks (official: 1e-6 in fp16 runs)
        g_loss_scale    = 100,          # G's loss multiplier (official --lsg): what Adam's eps is compared with
        max_grad_norm   = None,         # gradient clipping of both networks, None = off (SiD)
        lr_rampup_kimg  = 0,            # linear learning-rate warm-up of both networks
        fake_sigma      = 'lognormal',  # fake-score noise levels: EDM's log-normal (SiD) or DMD's Karras grid
        dropout         = None,         # dropout of G and f_psi while they train, None = the teacher's rate
        augment_p       = None,         # EDM augmentation in the fake-score loss, None = 0.12 if the teacher takes it
        sida            = False,        # SiDA: the encoder classifier and the GAN term (needs data)
        gan_g_weight    = 0.01,         # SiDA: G's GAN term weight (official --lsg_gan)
        gan_d_weight    = 1.0,          # SiDA: classifier loss weight in f_psi's loss (official --lsd)
        g_start_kimg    = 100,          # SiDA: G does not step before this many thousand images
        gan_start_kimg  = 200,          # SiDA: the GAN term enters G's loss after this many thousand images
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
        if sida and dataset is None:
            raise ValueError('SiDA\'s classifier needs real images: pass --data')
        if augment_p is None:  # SiD's default (EDM's CIFAR-10 value) where the teacher was trained with augmentation
            augment_p = 0.12 if takes_augment_labels(teacher) else 0.0
        if augment_p > 0 and not takes_augment_labels(teacher):
            raise ValueError(f'augment_p={augment_p}: this teacher was trained without augmentation labels, so its '
                             f'copies cannot be told what was augmented; use --augment=0')
        super().__init__(teacher, device, batch_size, dataset=dataset, sigma_init=sigma_init, lr=lr, fake_lr=fake_lr,
                         fake_sigma=fake_sigma, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                         ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio,
                         guide_net=guide_net, guidance=guidance)
        # SiD's optimizers: Adam (no decay), betas (g_beta1 | 0, 0.999); SiDA clips f_psi's gradients by value at 1.
        adam = dict(class_name='torch.optim.Adam', eps=eps, max_grad_norm=max_grad_norm)
        self.opt_G = optim.Updater(self.G.parameters(), 'G', lr=self.lr, betas=(g_beta1, 0.999), **adam)
        self.opt_fake = optim.Updater(self.fake.parameters(), 'fake', lr=self.fake_lr, betas=(0.0, 0.999),
                                      max_grad_value=1.0 if sida else None, **adam)
        if dropout is not None:
            for net in (self.G, self.fake):
                for block in net.modules():
                    if isinstance(block, UNetBlock):
                        block.dropout = dropout
        self.augment_pipe = None
        if augment_p > 0:  # EDM's pipe and settings (train.py --augment)
            from training.augment import AugmentPipe
            self.augment_pipe = AugmentPipe(p=augment_p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        self.alpha = float(alpha)
        self.t_max = t_max
        self.rho = rho
        self.g_loss_scale = g_loss_scale
        self.numel = math.prod(self.img_shape)
        self.classifier = EncoderLogits(self.fake) if sida else None
        self.gan_g_weight = gan_g_weight
        self.gan_d_weight = gan_d_weight
        self.g_start_nimg = g_start_kimg * 1000
        self.gan_start_nimg = gan_start_kimg * 1000
        self.gan_due = False    # whether this step's generator loss has SiDA's GAN term

    def labels(self, r, name):
        """The data batch's labels when there is data (official), else uniform ones; None when unconditional."""
        if not self.label_dim:
            return None
        return r.labels if r.labels is not None else r.random_labels(name, self.label_dim)

    def augment(self, images, r, prefix):
        """EDM's augmentation from the round's streams under `prefix`: (images, the networks' augment keywords)."""
        if self.augment_pipe is None:
            return images, {}
        y, labels = self.augment_pipe(images, rnd=_Named(r, prefix))
        return y, dict(augment_labels=labels)

    # ------------------------------------------------------------------------
    # One step: the fake score learns the current G's samples, then G takes one step against it.

    def step(self, rounds, cur_nimg):
        self.fake_step(rounds, [None] * len(rounds), cur_nimg)  # fresh samples of the current G (streams 'z', 'c')
        if self.classifier is None or cur_nimg > self.g_start_nimg:  # SiDA: no G step in the first 100 kimg
            self.gan_due = self.classifier is not None and cur_nimg > self.gan_start_nimg  # read by identity_loss

            def generator_loss(r):
                c = self.labels(r, 'c_g')
                self.G.train()
                try:
                    with r.keyed_dropout('dropout_G'):
                        x = self.generate(self.G, r.randn('z_g', *self.img_shape), c)  # independent of f_psi's samples
                finally:
                    self.G.eval()
                return training_stats.report('Loss/G_total', self.g_loss_scale * self.distribution_matching_loss(x, r, c))

            self.generator_step(rounds, generator_loss, cur_nimg)
            self.gan_due = False
        self.num_steps += 1
        if self.ema is not None:
            self.ema.update(cur_nimg + self.batch_size, self.batch_size)
        training_stats.report('Progress/G_steps', self.num_g_steps)

    def fake_step(self, rounds, x_per_round, cur_nimg):
        """One update of f_psi (in train mode) on G's samples: this step's (x_per_round), else fresh ones."""
        self.fake.train()
        try:
            self.opt_fake.backward(list(enumerate(rounds)), lambda ir: self.fake_loss(ir[1], x_per_round[ir[0]]),
                                   self.per_rank_batch)
        finally:
            self.fake.eval()
        self.opt_fake.step(optim.rampup_lr(self.fake_lr, cur_nimg, self.lr_rampup_kimg))

    def fake_loss(self, r, x0=None):
        """Per-sample loss of f_psi on samples x0 (None: fresh ones of G in eval mode); SiDA adds the classifier loss
        on real images. The updater sums it over the batch and divides by the batch: the official reduction."""
        c = self.labels(r, 'c')
        if x0 is None:
            with torch.no_grad():
                x0 = self.generate(self.G, r.randn('z', *self.img_shape), c)
        sigma = self.fake_sigmas(r)
        lam = (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2
        s = sigma.view(-1, 1, 1, 1)
        n = r.randn('fake_n', *self.img_shape)
        y, aug = self.augment(x0, r, '')
        with r.keyed_dropout('dropout_fake'):
            if self.classifier is None:
                D = self.fake(y + s * n, sigma, c, **aug)
                return training_stats.report('Loss/fake', lam * (D - y).square().sum(dim=[1, 2, 3]))
            D, logits_fake = self.classifier.denoise(y + s * n, sigma, c, **aug)
            real, aug_real = self.augment(r.images, r, 'real_')  # its own augmentation; the same s, n and labels
            logits_real = self.classifier.encoder(real + s * n, sigma, c, **aug_real)
        loss = training_stats.report('Loss/fake', lam * (D - y).square().sum(dim=[1, 2, 3]))
        bce = F.softplus(-logits_real).mean(dim=[1, 2]) + F.softplus(logits_fake).mean(dim=[1, 2])  # BCE(., 1), BCE(., 0)
        return loss + self.gan_d_weight * training_stats.report('Loss/D_gan', lam * bce / 2)

    def distribution_matching_loss(self, x, r, c):
        """SiD's generator loss at noise levels t ~ U[0, t_max/1000]. DisBack's hook: the real score comes from
        self.real_score, which DisBack replaces by its walk."""
        t = r.rand('sid_t') * (self.t_max / 1000)
        sigma = karras_sigma(1 - t, self.sigma_grid[-1], self.sigma_grid[0], self.rho)  # the teacher-clamped range
        return self.identity_loss(x, sigma, r.randn('sid_n', *self.img_shape), c)

    def identity_loss(self, x, sigma, n, c):
        """Per-sample generator loss at given noise levels and noise (the module docstring says what carries
        gradients): L, or with SiDA's GAN term due, 0.5 * (L + gan_g_weight / g_loss_scale * GAN) on the same x_t and w,
        so that G's loss g_loss_scale * this is the official 0.5 * (100 L + 0.01 GAN)."""
        x_t = x + sigma.view(-1, 1, 1, 1) * n
        y_r = self.real_score(x_t, sigma, c)
        if self.gan_due:
            y_f, logits = self.classifier.denoise(x_t, sigma, c)
        else:
            y_f = self.fake(x_t, sigma, c)
        w = (x - y_r).detach().abs().mean(dim=[1, 2, 3]).clamp(min=1e-5)
        sid = ((y_r - y_f) * ((y_r - x) - self.alpha * (y_r - y_f))).mean(dim=[1, 2, 3])
        loss = training_stats.report('Loss/G_sid', sid * self.numel / w)
        if self.gan_due:
            gan = training_stats.report('Loss/G_gan', F.softplus(-logits.clamp(-10, 10)).mean(dim=[1, 2]) * self.numel / w)
            loss = 0.5 * (loss + self.gan_g_weight / self.g_loss_scale * gan)
        return loss
