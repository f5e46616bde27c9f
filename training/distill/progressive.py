"""Progressive distillation (Salimans & Ho, ICLR 2022) in EDM's sigma form: `--method=pd`, rounds that halve the steps.

Fixed map u -> s (the Karras grid); an N-step student samples t_i = s(i/N), i = 0..N-1, then 0, with Euler
(DDIM) steps, so the N-step grid is every other point of the 2N-step grid. A training sample: x from the data,
i uniform in 0..N-1, s = s(i/N), s' = s((i+0.5)/N), s'' = s((i+1)/N) (0 after the last step), x_s = x + s n.
The teacher takes two Euler steps s -> s' -> s'' to x''; the student learns the denoised image
x~ = (s x'' - s'' x_s) / (s - s'') whose one Euler step s -> s'' lands on x'' (at s'' = 0: the teacher's two-step
result itself), weighted as the official code does by truncated SNR, max(1/s^2, 1), on this x-error (or, as an
option, by EDM's lam(s) = 1/s^2 + 1/sd^2, which is SNR + 4 for sd = 0.5). A round trains for a fixed number of
updates (officially 50k for every round) with a fresh Adam, gradients clipped at global norm 1 and a learning rate
decaying linearly from the base lr to 0 (no warm-up), then the student (or its EMA) becomes the next teacher and
N halves. The loss is reduced as the official code does (dpm.py `meanflat`, then the batch mean): the weighted
squared error is averaged over pixels and over the global batch, so the clip at global norm 1 acts on the gradient
it acts on there (a sum over pixels would be C*H*W times larger and always clipped). One difference: the official
code clips each device's gradient before averaging across devices; here the global gradient is clipped once, which
keeps the run independent of the number of processes. Stage two of guided distillation is this method with a w-conditioned teacher: w ~ U[w_min, w_max] is
drawn per sample and given to teacher and student alike.

x comes from --data: PD needs real (or teacher-generated) images, and generating them with the teacher's own
sampler would cost up to 2N teacher evaluations per sample, so this implementation requires a dataset.
"""

import copy

import torch

from torch_utils import distributed, training_stats
from training import optim
from training.dataset import check_network_matches
from training.ema import EMA
from training.samplers import euler_sampler, karras_sigma, nested_sigmas

# ----------------------------------------------------------------------------
# The rounds and the target.

def round_schedule(start_steps, end_steps, round_kimg, final_round_kimg, batch_size):
    """[(student steps N, updates)] for the rounds start/2, start/4, ..., end; rounds to N <= 2 use final_round_kimg
    (the official configs use round_kimg for every round; a longer end of the chain is an option)."""
    ratio = start_steps // end_steps if end_steps >= 1 else 0
    if end_steps < 1 or ratio < 2 or ratio * end_steps != start_steps or ratio & (ratio - 1):
        raise ValueError(f'--start-steps={start_steps} must be --end-steps={end_steps} times a power of two (>= 2), '
                         f'e.g. 256 and 1')
    rounds = []
    N = start_steps // 2
    while N >= end_steps:
        kimg = final_round_kimg if N <= 2 else round_kimg
        rounds.append((N, max(int(round(kimg * 1000 / batch_size)), 1)))
        N //= 2
    return rounds


def euler_step(net, x, sigma, sigma_next, labels=None, model_kwargs={}):
    """One Euler (DDIM) step of dx/ds = (x - D)/s in float64, written as samplers.euler_sampler does (exact at s' = 0)."""
    D = net(x, sigma, labels, force_fp32=True, **model_kwargs).to(torch.float64)  # the target stays fp32 in any --precision
    ratio = (sigma_next / sigma).to(torch.float64).reshape(-1, 1, 1, 1)
    return D + ratio * (x - D)


@torch.no_grad()
def pd_target(teacher, x, sigma, sigma_mid, sigma_next, labels=None, model_kwargs={}):
    """x~ (float64): the denoised image whose one Euler step sigma -> sigma_next equals the teacher's two steps."""
    x = x.to(torch.float64)
    x_next = euler_step(teacher, euler_step(teacher, x, sigma, sigma_mid, labels, model_kwargs), sigma_mid, sigma_next,
                        labels, model_kwargs)
    s = sigma.to(torch.float64).reshape(-1, 1, 1, 1)
    s_next = sigma_next.to(torch.float64).reshape(-1, 1, 1, 1)
    target = (s * x_next - s_next * x) / (s - s_next)
    return torch.where(s_next == 0, x_next, target)  # the last step: the teacher's result exactly, no rounding


def loss_weight(sigma, kind, sigma_data=0.5):
    """Weight of the squared x-error at noise level sigma: 'snr-trunc' = max(SNR, 1) with SNR = 1/sigma^2 (the
    official PD code), or 'edm' = EDM's lam(sigma) = 1/sigma^2 + 1/sigma_data^2."""
    if kind == 'snr-trunc':
        return (1 / sigma ** 2).clamp(min=1)
    if kind == 'edm':
        return 1 / sigma ** 2 + 1 / sigma_data ** 2
    raise ValueError(f'Unknown PD loss weight "{kind}": use snr-trunc (official) or edm')


def check_teacher(teacher, dataset, guidance_range):
    """The teacher must match the data (resolution, channels, labels) and take w exactly when w is carried through."""
    if dataset is None:
        raise ValueError('Progressive distillation trains on noised images x + s n: pass --data=ZIP|DIR')
    check_network_matches(teacher, dataset, 'pick matching ones (--cond=1 for a conditional teacher)')
    takes_w = getattr(getattr(teacher, 'model', None), 'map_guidance_layer', None) is not None
    if takes_w and guidance_range is None:
        raise ValueError('The teacher takes a guidance strength w (a --method=guided student): pass --w-range=MIN,MAX '
                         'to carry w through')
    if guidance_range is not None and not takes_w:
        raise ValueError('--w-range needs a w-conditioned teacher (a --method=guided snapshot); drop it for plain PD')

# ----------------------------------------------------------------------------

class ProgressiveDistillation:
    def __init__(self,
        teacher,                        # frozen network: the first round's teacher and every student's initial weights
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        dataset             = None,     # training images (required: x of the training samples)
        start_steps         = 1024,     # the first teacher's Euler steps; the first student gets half (official:
                                        # CIFAR-10 8192, ImageNet-64 1024; the smaller is the default)
        end_steps           = 1,        # steps of the last round's student
        round_kimg          = 6400,     # length of a halving round (official: 50k updates of 128 on CIFAR-10)
        final_round_kimg    = None,     # length of the rounds to 2 and 1 steps, None = round_kimg (official)
        optimizer_kwargs    = {},       # class_name + keywords of the optimizer, reset every round (lr: the base lr)
        max_grad_norm       = 1.0,      # gradient clipping at this global norm (official: 1), None = off
        weight              = 'snr-trunc', # loss weight: 'snr-trunc' max(1/s^2, 1) (official) or 'edm' lam(s)
        ema_halflife_kimg   = None,     # student EMA half-life within a round, None = no EMA (paper)
        ema_rampup_ratio    = 0.05,     # EMA half-life ramp-up within a round
        ema_teacher         = False,    # the EMA rather than the raw student becomes the next teacher
        guidance_range      = None,     # [w_min, w_max] for a w-conditioned teacher (guided distillation stage two)
        sample_guidance     = 1.0,      # w of preview samples of a w-conditioned student
        sigma_min           = 0.002,    # Karras grid (clamped to the teacher's range)
        sigma_max           = 80,
        rho                 = 7,
    ):
        check_teacher(teacher, dataset, guidance_range)
        loss_weight(torch.ones([]), weight)  # an unknown weight fails here, not at the first step
        if ema_teacher and ema_halflife_kimg is None:
            raise ValueError('--ema-teacher=1 hands the EMA on as the next teacher: also pass --ema=MIMG')
        self.device = device
        self.batch_size = batch_size
        self.per_rank_batch = batch_size // distributed.get_world_size()
        self.img_shape = [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]
        self.label_dim = teacher.label_dim
        self.sigma_data = getattr(teacher, 'sigma_data', 0.5)
        self.grid = dict(sigma_min=max(sigma_min, float(teacher.sigma_min)), sigma_max=min(sigma_max, float(teacher.sigma_max)),
                         rho=rho)
        final_round_kimg = final_round_kimg if final_round_kimg is not None else round_kimg
        self.schedule = round_schedule(start_steps, end_steps, round_kimg, final_round_kimg, batch_size)
        self.optimizer_kwargs = dict(optimizer_kwargs, max_grad_norm=max_grad_norm)
        self.lr = optimizer_kwargs['lr']
        self.weight = weight
        self.guidance_range = guidance_range
        self.sample_guidance = sample_guidance
        self.ema_teacher = ema_teacher

        # Networks: eval mode throughout, i.e. no dropout (the paper's students use none).
        self.teacher = teacher
        self.student = copy.deepcopy(teacher).eval().requires_grad_(True)
        self.ema = EMA(self.student, ema_halflife_kimg, ema_rampup_ratio) if ema_halflife_kimg is not None else None
        # Every round's grids on the device now: a round boundary inside a step then copies nothing from the host.
        self.grids = {N: (nested_sigmas(N, **self.grid).to(device),
                          karras_sigma((torch.arange(N, dtype=torch.float64) + 0.5) / N, **self.grid).to(device))
                      for N, _ in self.schedule}
        self.round = 0          # index into self.schedule
        self.round_step = 0     # updates done in this round
        self._reset_round()

    # Fresh optimizer, EMA restarted from the student, the round's grid.
    def _reset_round(self):
        self.optimizer = optim.Updater(self.student.parameters(), 'student', **self.optimizer_kwargs)
        if self.ema is not None:
            self.ema.reset()
        self.sigmas, self.sigmas_mid = self.grids[self.num_steps]

    # Teacher <- student (or its EMA), student <- teacher, next N.
    def _next_round(self):
        source = self.ema.ema if self.ema_teacher else self.student
        self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
        if source is not self.student:
            self.student.load_state_dict(source.state_dict())
        self.round += 1
        self.round_step = 0
        self._reset_round()

    @property
    def num_steps(self):
        """Steps of the current round's student."""
        return self.schedule[self.round][0]

    def sampling_spec(self):
        """N Euler steps on the nested grid, the denoised image clipped to [-1, 1] at every step (the official
        evaluation's `eval_clip_denoised=True`; its few-step FIDs depend on it)."""
        return dict(solver='euler', grid='nested', num_steps=self.num_steps, clip_denoised=True, **self.grid)

    def wants_snapshot(self):
        """True right after the last update of a round, so the loop writes that round's student."""
        return self.round_step == self.schedule[self.round][1]

    def _model_kwargs(self, w):
        return dict(guidance=w) if self.guidance_range is not None else {}

    def step(self, rounds, cur_nimg):
        if self.wants_snapshot():
            if self.round + 1 == len(self.schedule):
                return  # past the last round (the loop's duration is rounded up to whole steps): nothing to train
            self._next_round()
        N = self.num_steps

        def loss_fn(r):
            if r.images is None:
                raise ValueError('Progressive distillation needs training images: pass --data=ZIP|DIR')
            i = r.randint('pd_step', N)
            sigma, sigma_mid, sigma_next = self.sigmas[i], self.sigmas_mid[i], self.sigmas[i + 1]
            w = None
            if self.guidance_range is not None:
                w_min, w_max = self.guidance_range
                w = w_min + (w_max - w_min) * r.rand('pd_guidance')
            labels = r.labels if self.label_dim else None
            x_s = r.images.to(torch.float64) + sigma.reshape(-1, 1, 1, 1) * r.randn('pd_noise', *self.img_shape).to(torch.float64)
            target = pd_target(self.teacher, x_s, sigma, sigma_mid, sigma_next, labels, self._model_kwargs(w))
            D = self.student(x_s, sigma, labels, **self._model_kwargs(w))
            weight = loss_weight(sigma, self.weight, self.sigma_data).to(torch.float32)
            # A mean over pixels per sample (the updater then averages over the batch), as the official `meanflat`.
            return training_stats.report('Loss/loss', weight * (D - target.to(torch.float32)).square().mean(dim=[1, 2, 3]))

        self.optimizer.backward(rounds, loss_fn, self.per_rank_batch)
        self.optimizer.step(self.lr * (1 - self.round_step / self.schedule[self.round][1]))  # linear decay to 0 within the round
        self.round_step += 1
        if self.ema is not None:
            self.ema.update(self.round_step * self.batch_size, self.batch_size)
        training_stats.report('Progress/pd_student_steps', N)

    def networks(self):
        return dict(student=self.student, **({'ema': self.ema.ema} if self.ema is not None else {}))

    def _sampled(self):
        return self.ema.ema if self.ema is not None else self.student

    def snapshot(self):
        """The current round's student (its EMA if any) with its N-step Euler sampling spec (clipped)."""
        net = copy.deepcopy(self._sampled()).eval().requires_grad_(False).cpu()
        net.sampling_spec = self.sampling_spec()
        return dict(ema=net)

    @torch.no_grad()
    def sample(self, z, labels):
        w = torch.full([z.shape[0]], float(self.sample_guidance), device=z.device)
        return euler_sampler(self._sampled(), z, labels, self.sigmas, self._model_kwargs(w), clip_denoised=True).to(torch.float32)

    def state_dict(self):
        state = dict(round=self.round, round_step=self.round_step, student=self.student.state_dict(),
                     optimizer=self.optimizer.state_dict())
        if self.round > 0:
            state['teacher'] = self.teacher.state_dict()
        if self.ema is not None:
            state['ema'] = self.ema.ema.state_dict()
        return state

    def load_state_dict(self, state):
        if state['round'] > 0:
            self.teacher = copy.deepcopy(self.student).eval().requires_grad_(False)
            self.teacher.load_state_dict(state['teacher'])
        self.round, self.round_step = state['round'], state['round_step']
        self._reset_round()
        self.student.load_state_dict(state['student'])
        self.optimizer.load_state_dict(state['optimizer'])
        if self.ema is not None:
            self.ema.ema.load_state_dict(state['ema'])

# ----------------------------------------------------------------------------
