"""Distribution Matching Distillation (Yin et al., CVPR 2024) with DMD2's options (Yin et al., NeurIPS 2024).

Three networks initialised from the teacher: the frozen real score mu_real, the online fake score mu_fake, and
the one-step generator G(z) = G_net(s_init*z; s_init, c). Each generator update follows the distribution-matching
gradient (p_fake - p_real) / mean|x - p_real| (plus 0.25 x LPIPS regression onto the teacher's ODE pairs in DMD);
each fake-score update fits mu_fake to G's current samples by denoising. DMD2: two-time-scale updates
(`fake_steps` fake updates per generator update) and a GAN head on the fake score's bottleneck.

Loss reduction, as DMD2's official code (tianweiy/DMD2 main/edm/edm_guidance.py; DMD's own code was not released):
every term is a mean, over pixels and the batch (`F.mse_loss(..., reduction="mean")` for the distribution-matching
and fake-score losses, `.mean()` of the GAN terms), and both networks are clipped at global norm 10
(`--max_grad_norm`, default 10, in main/edm/train_edm.py), so the clip acts on gradients of the scale it does there.
EMA: none by default, as DMD2 (train_edm.py has no EMA, and its checkpoints are the raw generator).
"""

import copy

import torch
import torch.nn.functional as F

from torch_utils import distributed, training_stats
from training import optim
from training.batching import IndexStream
from training.ema import EMA
from training.samplers import Autoguided, karras_sigma

# ----------------------------------------------------------------------------

class GANHead(torch.nn.Module):
    """DMD2's classifier on the fake score's bottleneck: conv4x4/2 p1 - GN - SiLU - conv4x4/4 p0 - GN - SiLU - conv1x1
    (an 8x8 bottleneck -> 4x4 -> 1x1, every position seen; at least 8x8 is needed)."""

    def __init__(self, channels):
        super().__init__()
        groups = min(32, channels // 4)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 4, stride=2, padding=1), torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, channels, 4, stride=4, padding=0), torch.nn.GroupNorm(groups, channels), torch.nn.SiLU(),
            torch.nn.Conv2d(channels, 1, 1))

    def forward(self, h):
        return self.net(h).mean(dim=[1, 2, 3])  # averaging handles bottlenecks that do not reduce to 1x1


class _Reached(Exception):
    """Raised by the bottleneck hook to stop a forward pass there, carrying the block's output."""

    def __init__(self, output):
        super().__init__()
        self.output = output


class Bottleneck:
    """Runs a network only up to its lowest-resolution encoder block and returns that block's output: the decoder
    (most of a UNet's cost) does not run. Other calls of the network are untouched."""

    def __init__(self, net):
        self.net = net
        self.armed = False
        backbone = net.unet if hasattr(net, 'unet') else net.model  # EDM2's UNet or EDM's backbone
        list(backbone.enc.values())[-1].register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        if self.armed:
            raise _Reached(output)

    def __call__(self, x, sigma, labels, **model_kwargs):
        self.armed = True
        try:
            self.net(x, sigma, labels, **model_kwargs)
        except _Reached as reached:
            return reached.output
        finally:
            self.armed = False
        raise RuntimeError('The forward pass did not reach the bottleneck block')

# ----------------------------------------------------------------------------

class DMD:
    def __init__(self,
        teacher,                        # frozen teacher: the real score, and the initial weights of G and mu_fake
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        dataset         = None,         # real images for the GAN head (DMD2), else unused
        sigma_init      = 80.0,         # generator input noise level s_init (SiD uses 2.5)
        lr              = 5e-5,         # generator learning rate (CIFAR-10: 5e-5, ImageNet-64: 2e-6)
        fake_lr         = None,         # fake-score learning rate, None = lr
        betas           = (0.9, 0.999), # AdamW betas (of both networks unless fake_betas is given)
        fake_betas      = None,         # fake-score AdamW betas, None = betas
        weight_decay    = 0.01,         # AdamW weight decay
        max_grad_norm   = 10.0,         # gradient clipping of both networks
        lr_rampup_kimg  = 0,            # linear learning-rate warm-up of both networks (DMD2 ImageNet: see README)
        fake_steps      = 1,            # DMD2 two-time-scale rule: G is updated every `fake_steps` steps
        num_t           = 1000,         # T: size of the Karras grid the noise levels are drawn from
        dm_t_range      = (0.02, 0.98), # distribution matching draws grid indices in [0.02T, 0.98T]
        fake_sigma      = 'karras',     # fake-score noise levels: 'karras' (grid index in [0, T)) or 'lognormal' (EDM)
        seed            = 0,            # run seed (given by the loop): the order of the regression pairs
        sigma_min       = 0.002,        # Karras grid
        sigma_max       = 80.0,
        rho             = 7.0,
        pairs           = None,         # regression pairs directory (make_pairs.py), None = no regression loss
        reg_weight      = 0.25,         # weight of the regression loss
        reg_loss        = 'lpips',      # 'lpips' | 'l2' | 'pseudo_huber'
        reg_kwargs      = {},           # distance options (e.g. LPIPS weight paths); LPIPS: resolution 224 unless given
        gan_g_weight    = 0.0,          # DMD2 GAN: generator's non-saturating loss weight (3e-3), 0 = off
        gan_d_weight    = 1e-2,         # DMD2 GAN: classifier loss weight, added to the fake-score loss
        ema_halflife_kimg = None,       # generator EMA half-life, None = no EMA (DMD2's official code has none)
        ema_rampup_ratio  = 0.05,
        preview_sigma   = 2.5,          # noise level at which preview rows show the real and fake scores' denoising
        guide_net       = None,         # autoguidance (EDM2): the real score is guide_net.lerp(teacher, guidance)
        guidance        = 1.0,          # autoguidance weight w (1 = the teacher alone)
    ):
        self.device = device
        self.batch_size = batch_size
        self.per_rank_batch = batch_size // distributed.get_world_size()
        self.img_shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
        self.label_dim = teacher.label_dim
        self.sigma_init = float(sigma_init)
        self.lr = lr
        self.fake_lr = fake_lr if fake_lr is not None else lr
        self.lr_rampup_kimg = lr_rampup_kimg
        self.fake_steps = fake_steps
        if fake_sigma not in ('karras', 'lognormal'):
            raise ValueError(f'fake_sigma must be "karras" or "lognormal", not "{fake_sigma}"')
        self.fake_sigma = fake_sigma
        self.preview_sigma = preview_sigma

        # Noise levels: the Karras grid of T levels, clamped to the teacher's range; index 0 is the largest.
        smin, smax = max(sigma_min, float(teacher.sigma_min)), min(sigma_max, float(teacher.sigma_max))
        self.sigma_grid = karras_sigma(torch.arange(num_t, dtype=torch.float64) / (num_t - 1), smin, smax, rho).to(torch.float32).to(device)
        self.dm_t_lo = int(dm_t_range[0] * num_t)
        self.dm_t_hi = int(dm_t_range[1] * num_t)

        # Networks: eval mode throughout (no dropout; EDM networks have no batch statistics).
        self.real = teacher.eval().requires_grad_(False)
        if guide_net is not None:  # G and mu_fake still start from the teacher alone
            self.real = Autoguided(self.real, guide_net.eval().requires_grad_(False), guidance)
        self.fake = copy.deepcopy(teacher).eval().requires_grad_(True)
        self.G = copy.deepcopy(teacher).eval().requires_grad_(True)
        self.G.sampling_spec = dict(solver='euler', grid='nested', num_steps=1, sigma_min=sigma_min, sigma_max=self.sigma_init, rho=rho)
        self.ema = EMA(self.G, ema_halflife_kimg, ema_rampup_ratio) if ema_halflife_kimg is not None else None

        # Optional parts: regression pairs, GAN head.
        self.pairs = None
        if pairs is not None:
            from training.distances import make_distance
            from training.pairs import PairSet
            self.pairs = PairSet(pairs, device=device)
            self.pairs.check_teacher(teacher)
            self.pair_stream = IndexStream(len(self.pairs), seed=seed)
            if reg_loss == 'lpips':
                reg_kwargs = {'resolution': 224, **reg_kwargs}  # DMD: LPIPS on images upsampled to 224
            self.distance = make_distance(reg_loss, **reg_kwargs).to(device).eval().requires_grad_(False)
            self.reg_weight = reg_weight
        self.gan_g_weight = gan_g_weight
        self.gan_d_weight = gan_d_weight
        self.head = None
        if gan_g_weight > 0:
            if dataset is None:
                raise ValueError('The GAN head (--gan-g > 0) needs real images: pass --data')
            self.bottleneck = Bottleneck(self.fake)
            with torch.no_grad():
                h = self.bottleneck(torch.zeros([1, *self.img_shape], device=device), torch.ones([1], device=device),
                                    torch.zeros([1, self.label_dim], device=device) if self.label_dim else None)
            if min(h.shape[2:]) < 8:
                raise ValueError(f'The GAN head needs a bottleneck of at least 8x8 (DMD2\'s classifier); this teacher\'s '
                                 f'is {h.shape[2]}x{h.shape[3]}: use --gan-g=0')
            self.head = GANHead(h.shape[1]).to(device)

        fake_params = list(self.fake.parameters()) + (list(self.head.parameters()) if self.head is not None else [])
        adamw = dict(class_name='torch.optim.AdamW', weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        self.opt_G = optim.Updater(self.G.parameters(), 'G', lr=self.lr, betas=tuple(betas), **adamw)
        self.opt_fake = optim.Updater(fake_params, 'fake', lr=self.fake_lr, betas=tuple(fake_betas or betas), **adamw)
        self.num_steps = 0      # loop steps = fake-score updates
        self.num_g_steps = 0    # generator updates

    # ------------------------------------------------------------------------
    # Networks as functions.

    def generate(self, net, z, labels):
        """x = G(s_init*z; s_init, c): one network evaluation."""
        sigma = torch.full([z.shape[0]], self.sigma_init, device=z.device)
        return net(z * self.sigma_init, sigma, labels)

    def real_score(self, x_s, sigma, labels):
        """The distribution-matching target; DisBack replaces it by a walk along its recorded path."""
        return self.real(x_s, sigma, labels)

    def _gan_logits(self, x, r, name, labels):
        """Classifier logits of images noised at independent grid levels, through mu_fake's bottleneck."""
        sigma = self.sigma_grid[r.randint(f'{name}_t', len(self.sigma_grid))]
        x_s = x + sigma.view(-1, 1, 1, 1) * r.randn(f'{name}_n', *self.img_shape)
        return self.head(self.bottleneck(x_s, sigma, labels).to(torch.float32))  # the head runs in fp32 (DMD2)

    # ------------------------------------------------------------------------
    # One step: a generator update every `fake_steps` steps, then a fake-score update on G's samples.

    def step(self, rounds, cur_nimg):
        update_G = self.num_steps % self.fake_steps == 0
        x_per_round = [None] * len(rounds)
        if update_G:
            def generator_loss(i, r):
                z = r.randn('z', *self.img_shape)
                c = r.random_labels('c', self.label_dim)
                if self.pairs is None:
                    x = self.generate(self.G, z, c)
                else:  # one batched generator call for the fresh and the regression latents
                    z_ref, y_ref, c_ref = self.pairs.get([self.pair_stream[p] for p in r.positions])
                    both = self.generate(self.G, torch.cat([z, z_ref]), torch.cat([c, c_ref]) if c is not None else None)
                    x, x_ref = both[:r.size], both[r.size:]
                x_per_round[i] = x.detach()
                loss = self.distribution_matching_loss(x, r, c)
                if self.pairs is not None:
                    loss = loss + self.reg_weight * training_stats.report('Loss/G_reg', self.distance(x_ref, y_ref))
                if self.head is not None:
                    f_fake = self._gan_logits(x, r, 'gan_g', c)
                    loss = loss + self.gan_g_weight * training_stats.report('Loss/G_gan', F.softplus(-f_fake))
                return training_stats.report('Loss/G_total', loss)

            self.generator_step(list(enumerate(rounds)), lambda ir: generator_loss(*ir), cur_nimg)
        self.fake_step(rounds, x_per_round, cur_nimg)
        self.num_steps += 1
        if self.ema is not None and update_G:
            self.ema.update(cur_nimg + self.batch_size, self.batch_size)
        training_stats.report('Progress/G_steps', self.num_g_steps)

    def generator_step(self, rounds, loss_fn, cur_nimg):
        """One generator update on sum(loss_fn(round)) with the fake score (and GAN head) frozen: their weights get no
        gradient, while G's gradient still flows through their inputs."""
        self.fake.requires_grad_(False)
        if self.head is not None:
            self.head.requires_grad_(False)
        self.opt_G.backward(rounds, loss_fn, self.per_rank_batch)
        self.opt_G.step(optim.rampup_lr(self.lr, cur_nimg, self.lr_rampup_kimg))
        self.fake.requires_grad_(True)
        if self.head is not None:
            self.head.requires_grad_(True)
        self.num_g_steps += 1

    def fake_sigmas(self, r):
        """Noise levels of the fake score's denoising loss, one per sample: DMD's Karras grid or EDM's log-normal."""
        if self.fake_sigma == 'karras':
            return self.sigma_grid[r.randint('fake_t', len(self.sigma_grid))]
        return (r.randn('fake_t') * 1.2 - 1.2).exp()  # EDM's ln s ~ N(-1.2, 1.2^2)

    def fake_step(self, rounds, x_per_round, cur_nimg):
        """One fake-score update on G's samples: this step's (x_per_round), else fresh ones (DisBack's stage 1)."""
        def fake_loss(i, r):
            c = r.random_labels('c', self.label_dim)
            x0 = x_per_round[i]
            if x0 is None:  # G was not updated this step: draw fresh samples
                with torch.no_grad():
                    x0 = self.generate(self.G, r.randn('z', *self.img_shape), c)
            sigma = self.fake_sigmas(r)
            lam = 1 / sigma ** 2 + 1 / 0.5 ** 2
            if self.head is None:
                D = self.fake(x0 + sigma.view(-1, 1, 1, 1) * r.randn('fake_n', *self.img_shape), sigma, c)
                loss = lam * (D - x0).square().mean(dim=[1, 2, 3])
                return training_stats.report('Loss/fake', loss)
            f_fake = self._gan_logits(x0, r, 'gan_d_fake', c)
            f_real = self._gan_logits(r.images, r, 'gan_d_real', r.labels if self.label_dim else None)
            D = self.fake(x0 + sigma.view(-1, 1, 1, 1) * r.randn('fake_n', *self.img_shape), sigma, c)
            loss = training_stats.report('Loss/fake', lam * (D - x0).square().mean(dim=[1, 2, 3]))
            gan = training_stats.report('Loss/D_gan', F.softplus(f_fake) + F.softplus(-f_real))
            return loss + self.gan_d_weight * gan

        self.opt_fake.backward(list(enumerate(rounds)), lambda ir: fake_loss(*ir), self.per_rank_batch)
        self.opt_fake.step(optim.rampup_lr(self.fake_lr, cur_nimg, self.lr_rampup_kimg))

    def distribution_matching_loss(self, x, r, c):
        """0.5 * |x - sg(x - grad)|^2 averaged per sample, so that d loss / d x = grad / numel (gradient injection)."""
        t = r.randint('dm_t', self.dm_t_hi - self.dm_t_lo + 1) + self.dm_t_lo
        sigma = self.sigma_grid[t]
        with torch.no_grad():
            x_s = x.detach() + sigma.view(-1, 1, 1, 1) * r.randn('dm_n', *self.img_shape)
            p_real = self.real_score(x_s, sigma, c)
            p_fake = self.fake(x_s, sigma, c)
            w = (x.detach() - p_real).abs().mean(dim=[1, 2, 3], keepdim=True)
            grad = torch.nan_to_num((p_fake - p_real) / w)
        training_stats.report('Loss/dm_grad_norm', grad.square().mean(dim=[1, 2, 3]).sqrt())
        return training_stats.report('Loss/G_dm', 0.5 * (x - (x.detach() - grad)).square().mean(dim=[1, 2, 3]))

    # ------------------------------------------------------------------------
    # The loop's interface.

    def generator(self):
        return self.ema.ema if self.ema is not None else self.G

    def networks(self):
        nets = dict(G=self.G, fake=self.fake)
        if self.ema is not None:
            nets['G_ema'] = self.ema.ema
        if self.head is not None:
            nets['head'] = self.head
        return nets

    def snapshot(self):
        return dict(ema=copy.deepcopy(self.generator()).cpu())

    @torch.no_grad()
    def sample(self, z, labels):
        return self.generate(self.generator(), z, labels)

    @torch.no_grad()
    def preview(self, z, labels):
        """Rows: x = G(z); the real and fake scores' denoising of x at preview_sigma; then G(z_ref) and y_ref."""
        x = self.sample(z, labels)
        sigma = torch.full([z.shape[0]], self.preview_sigma, device=z.device)
        n = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x.device)
        rows = [x, self.real_score(x + self.preview_sigma * n, sigma, labels), self.fake(x + self.preview_sigma * n, sigma, labels)]
        if self.pairs is not None:
            z_ref, y_ref, c_ref = self.pairs.get(list(range(min(len(self.pairs), z.shape[0]))))
            rows += [self.generate(self.generator(), z_ref, c_ref), y_ref]
        return rows

    def state_dict(self):
        state = dict(G=self.G.state_dict(), fake=self.fake.state_dict(), opt_G=self.opt_G.state_dict(),
                     opt_fake=self.opt_fake.state_dict(), num_steps=self.num_steps, num_g_steps=self.num_g_steps)
        if self.ema is not None:
            state['G_ema'] = self.ema.ema.state_dict()
        if self.head is not None:
            state['head'] = self.head.state_dict()
        return state

    def load_state_dict(self, state):
        self.G.load_state_dict(state['G'])
        self.fake.load_state_dict(state['fake'])
        self.opt_G.load_state_dict(state['opt_G'])
        self.opt_fake.load_state_dict(state['opt_fake'])
        self.num_steps = state['num_steps']
        self.num_g_steps = state['num_g_steps']
        if self.ema is not None:
            self.ema.ema.load_state_dict(state['G_ema'])
        if self.head is not None:
            self.head.load_state_dict(state['head'])
