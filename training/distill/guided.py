"""Guided distillation, stage one (Meng et al., CVPR 2023): `--method=guided`, one network for every guidance strength.

Classifier-free guidance in D-space: D_w = D_c + w (D_c - D_u), w = 0 being the plain conditional teacher (EDM2's
guidance g = w + 1). The student is the teacher's architecture plus an embedding of w whose last layer starts at
zero, so it starts equal to the conditional teacher; it learns lam(s) |D_student(x_s; s, c, w) - D_w|^2 with
w ~ U[w_min, w_max], x_s = x + s n from labelled data, and s = s(u), u ~ U[0, 1], on the Karras grid: the levels a
sampler visits (guidance acts mostly at high noise, which EDM's log-normal training levels rarely reach; on the toy
benchmark they left the student far off there). The guide D_u is

  'null'        the teacher itself with an all-zero label: only for teachers trained with label dropout
                (label_dropout > 0); refused otherwise, e.g. for every official EDM network,
  a network     with label_dim 0: a separate unconditional model (EDM's CIFAR-10 pair: cond + uncond), called
                without labels; with labels: a weaker conditional model of the same kind (autoguidance, Karras et
                al. 2024), called with the same labels. The user supplies that weaker model.

Loss reduction: Meng et al. released no code; the loss is reduced as in progressive distillation's official code
(the same authors' codebase): a mean over pixels per sample (`meanflat`), then over the batch, so `--grad-clip`
thresholds mean what they mean there.

Stage two is `--method=pd` on a stage-one snapshot with w carried through (--w-range). Sample any w with
`generate.py --guidance=w`.
"""

import copy

import torch

from torch_utils import distributed, persistence, training_stats
from training import networks, networks_edm2, optim
from training.dataset import check_network_matches
from training.ema import EMA
from training.samplers import edm_sampler, karras_sigma

# ----------------------------------------------------------------------------

def make_guided_student(teacher):
    """A copy of the teacher's network (this project's class) with a zero-initialised guidance embedding."""
    edm2 = isinstance(teacher, networks_edm2.Precond)
    cls = type(teacher) if edm2 else getattr(networks, type(teacher).__name__)
    student = cls(*teacher.init_args, **dict(teacher.init_kwargs, guidance_embed=True))
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = 'unet.emb_guidance' if edm2 else 'model.map_guidance'
    assert not unexpected and all(k.startswith(new) for k in missing), (missing, unexpected)
    return student.to(next(teacher.parameters()).device)


def check_teacher(teacher, dataset):
    """A class-conditional training.networks preconditioner that matches the labelled data."""
    if dataset is None:
        raise ValueError('Guided distillation trains on noised labelled images: pass --data=ZIP|DIR --cond=1')
    if not teacher.label_dim:
        raise ValueError('Guided distillation needs a class-conditional teacher (label_dim > 0); this one is unconditional')
    check_network_matches(teacher, dataset, 'pick matching ones (--cond=1)')
    if isinstance(teacher, networks_edm2.Precond):
        return
    if getattr(teacher, 'model', None) is None or getattr(networks, type(teacher).__name__, None) is None:
        raise ValueError(f'Guided distillation builds its student from a training.networks preconditioner, not a '
                         f'{type(teacher).__name__}; pass a network pickle (e.g. toy/default/teacher-unet.pkl, not '
                         f'teacher-exact.pkl)')


# The official unconditional CIFAR-10 network: the guide for the official conditional one.
CIFAR10_UNCOND = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl'


def check_null_guide(teacher):
    """The zero label is an unconditional model only if the teacher was trained with label dropout."""
    if not getattr(getattr(teacher, 'model', None), 'label_dropout', 0):  # EDM2 networks have none
        raise ValueError(f'The null guide (--guide=null) takes the teacher\'s zero label as the unconditional model, '
                         f'but this teacher was trained without label dropout (label_dropout=0, like every official EDM '
                         f'network); pass an unconditional network, --guide=PKL|URL, e.g. {CIFAR10_UNCOND} for CIFAR-10')


def check_guide(guide, teacher):
    """The guide must match the teacher's images, with 0 labels (unconditional) or the teacher's (autoguidance)."""
    got = (guide.img_resolution, guide.img_channels)
    if got != (teacher.img_resolution, teacher.img_channels) or guide.label_dim not in (0, teacher.label_dim):
        raise ValueError(f'The guide is {got[0]}x{got[0]}x{got[1]} with {guide.label_dim} labels; it needs the teacher\'s '
                         f'{teacher.img_resolution}x{teacher.img_resolution}x{teacher.img_channels} and 0 labels '
                         f'(unconditional) or {teacher.label_dim} (autoguidance)')


@torch.no_grad()
def cfg_target(teacher, guide, x, sigma, labels, w):
    """D_w = D_c + w (D_c - D_u) in float32; guide None = the teacher with a zero label (one batched call)."""
    w = torch.as_tensor(w, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    if guide is None:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        D_c, D_u = teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([labels, torch.zeros_like(labels)])).chunk(2)
    else:
        D_c = teacher(x, sigma, labels)
        D_u = guide(x, sigma, labels if guide.label_dim else None)
    return D_c + w * (D_c - D_u)

# ----------------------------------------------------------------------------

class GuidedDistillation:
    def __init__(self,
        teacher,                        # frozen class-conditional network: D_c, and the student's initial weights
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        dataset             = None,     # labelled training images (required)
        guide               = 'null',   # D_u: a network pickle path/URL, a network, or 'null' (teacher, zero label)
        trust_pickle        = False,    # allow code embedded in the guide pickle to run
        guidance_range      = [0, 4],   # w ~ U[w_min, w_max]
        optimizer_kwargs    = {},       # class_name + keywords of the optimizer (lr: the base lr)
        lr_rampup_kimg      = 0,        # learning-rate warm-up
        max_grad_norm       = None,     # gradient clipping, None = off
        ema_halflife_kimg   = 500,      # student EMA half-life, None = no EMA
        ema_rampup_ratio    = 0.05,     # EMA half-life ramp-up
        sigma_min           = 0.002,    # noise levels s(u), u ~ U[0, 1], on the Karras grid
        sigma_max           = 80,
        rho                 = 7,
        sample_guidance     = 1.0,      # w of preview samples
        sample_steps        = 18,       # Heun steps of preview samples
    ):
        check_teacher(teacher, dataset)
        if guide is None or guide == 'null':
            check_null_guide(teacher)
        if isinstance(guide, str):
            guide = None if guide == 'null' else persistence.load_network_pkl(guide, allow_code=trust_pickle)
        if guide is not None:
            check_guide(guide, teacher)
            guide = guide.to(device).eval().requires_grad_(False)
        self.device = device
        self.batch_size = batch_size
        self.per_rank_batch = batch_size // distributed.get_world_size()
        self.img_shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
        self.sigma_data = getattr(teacher, 'sigma_data', 0.5)
        self.teacher = teacher
        self.guide = guide
        self.guidance_range = guidance_range
        self.lr = optimizer_kwargs['lr']
        self.lr_rampup_kimg = lr_rampup_kimg
        self.grid = dict(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
        self.sample_guidance = sample_guidance
        self.sample_steps = sample_steps

        # Eval mode throughout: no dropout, no label dropout.
        self.student = make_guided_student(teacher).eval().requires_grad_(True)
        self.optimizer = optim.Updater(self.student.parameters(), 'student', max_grad_norm=max_grad_norm, **optimizer_kwargs)
        self.ema = EMA(self.student, ema_halflife_kimg, ema_rampup_ratio) if ema_halflife_kimg is not None else None

    def step(self, rounds, cur_nimg):
        def loss_fn(r):
            if r.images is None:
                raise ValueError('Guided distillation needs training images: pass --data=ZIP|DIR --cond=1')
            sigma = karras_sigma(r.rand('guided_sigma'), **self.grid)
            w_min, w_max = self.guidance_range
            w = w_min + (w_max - w_min) * r.rand('guided_w')
            x_s = r.images + sigma.reshape(-1, 1, 1, 1) * r.randn('guided_noise', *self.img_shape)
            target = cfg_target(self.teacher, self.guide, x_s, sigma, r.labels, w)
            D = self.student(x_s, sigma, r.labels, guidance=w)
            weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
            # A mean over pixels per sample, then the batch mean (the updater), as progressive distillation's `meanflat`.
            return training_stats.report('Loss/loss', weight * (D - target).square().mean(dim=[1, 2, 3]))

        self.optimizer.backward(rounds, loss_fn, self.per_rank_batch)
        self.optimizer.step(optim.rampup_lr(self.lr, cur_nimg, self.lr_rampup_kimg))
        if self.ema is not None:
            self.ema.update(cur_nimg + self.batch_size, self.batch_size)

    def networks(self):
        return dict(student=self.student, **({'ema': self.ema.ema} if self.ema is not None else {}))

    def _sampled(self):
        return self.ema.ema if self.ema is not None else self.student

    def snapshot(self):
        """The w-conditioned student: a diffusion model (Heun by default), its denoised image clipped to [-1, 1] at
        every step as progressive distillation's students (the official `eval_clip_denoised=True`: guidance pushes
        D beyond the data range); generate.py --guidance=w picks w."""
        net = copy.deepcopy(self._sampled()).eval().requires_grad_(False).cpu()
        net.sampling_spec = dict(clip_denoised=True)
        return dict(ema=net)

    @torch.no_grad()
    def sample(self, z, labels):
        w = torch.full([z.shape[0]], float(self.sample_guidance), device=z.device)
        return edm_sampler(self._sampled(), z, labels, num_steps=self.sample_steps, clip_denoised=True,
                           model_kwargs=dict(guidance=w)).to(torch.float32)

    def state_dict(self):
        state = dict(student=self.student.state_dict(), optimizer=self.optimizer.state_dict())
        if self.ema is not None:
            state['ema'] = self.ema.ema.state_dict()
        return state

    def load_state_dict(self, state):
        self.student.load_state_dict(state['student'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.ema is not None:
            self.ema.ema.load_state_dict(state['ema'])

# ----------------------------------------------------------------------------
