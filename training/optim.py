"""Updating one network: per-round gradients summed into one flat buffer, one all-reduce, fp16 loss scaling,
steps with non-finite gradients skipped on the device and counted, clipping, the optimizer step.

Nothing here waits for the device (no `.item()`): whether a step is skipped is decided inside the fused optimizer
kernel from a device flag, and counts go to training_stats, which reduces them once per tick.
"""

import contextlib
import inspect

import torch

import dnnlib
from torch_utils import distributed, training_stats

# ----------------------------------------------------------------------------
# fp16 loss scaling of the whole run: None (off: fp32, bf16), 'dynamic', or a float (a static scale, EDM's --ls).

_loss_scaling = None


@contextlib.contextmanager
def loss_scaling(mode):
    """Updaters constructed inside this block scale their losses (set by the loop for fp16 runs)."""
    global _loss_scaling
    prev, _loss_scaling = _loss_scaling, mode
    try:
        yield
    finally:
        _loss_scaling = prev


class LossScaler:
    """Dynamic loss scale (Micikevicius et al. 2018): halve it on a non-finite gradient, double it after
    `growth_interval` finite steps in a row, never below FLOOR. A static scale never changes. All on the device."""

    FLOOR = 1.0  # a gradient non-finite at scale 1 overflows fp16 unscaled: the run has diverged (the loop stops it)

    def __init__(self, device, static=None, init_scale=2.0 ** 16, growth_interval=2000):
        self.dynamic = static is None
        self.scale = torch.full([], float(static or init_scale), device=device)  # a fill: no host-to-device copy
        self.good_steps = torch.zeros([], dtype=torch.int64, device=device)
        self.growth_interval = growth_interval

    def update(self, found_inf):
        """The next scale; returns a device flag, 1 when the gradient was non-finite at the floor (None if static)."""
        if not self.dynamic:
            return None
        at_floor = ((found_inf > 0) & (self.scale <= self.FLOOR)).to(torch.float32)
        good = (self.good_steps + 1) * (found_inf == 0)
        grow = good >= self.growth_interval
        halved = (self.scale * 0.5).clamp(min=self.FLOOR)
        self.scale = torch.where(found_inf > 0, halved, torch.where(grow, self.scale * 2, self.scale))
        self.good_steps = torch.where(grow, 0, good)
        return at_floor

    def state_dict(self):
        return dict(scale=self.scale.cpu(), good_steps=self.good_steps.cpu())

    def load_state_dict(self, state):
        self.scale = state['scale'].to(self.scale.device)
        self.good_steps = state['good_steps'].to(self.good_steps.device)

# ----------------------------------------------------------------------------
# Abandoning a step: a stop asked for between accumulation rounds, before the step's first update, drops the step (the
# weights, moments and counters still describe its start), so a long step does not delay a SIGTERM stop.

class StepAbandoned(Exception):
    """Raised by Updater.backward between rounds when the loop's stop check is true and nothing was updated yet."""


_abandon_check = None  # the loop's stop check while the current step may still be abandoned, else None


@contextlib.contextmanager
def abandonable(check):
    """One step in which Updater.backward calls check() between rounds (a collective under torchrun: every rank
    calls it at the same rounds) and raises StepAbandoned when it is true, until the step's first update."""
    global _abandon_check
    prev, _abandon_check = _abandon_check, check
    try:
        yield
    finally:
        _abandon_check = prev

# ----------------------------------------------------------------------------

class Updater:
    """One network's optimizer and everything around its step. `backward` accumulates the rounds' losses,
    `step(lr)` applies the update; the run's fp16 loss scaling applies when it was on at construction."""

    def __init__(self,
        params,                         # the parameters this updater trains (all of them get gradients)
        name,                           # for statistics: Health/skipped_<name>, Health/grad_norm_<name>, ...
        class_name      = 'torch.optim.Adam',
        max_grad_norm   = None,         # clip the global gradient norm, None = off
        max_grad_value  = None,         # clip each gradient element to [-v, v] (SiDA's fake score), None = off
        **opt_kwargs,                   # optimizer keywords (lr, betas, weight_decay, ...)
    ):
        self.params = list(params)
        if len({p.dtype for p in self.params}) != 1:
            raise ValueError(f'Updater "{name}": parameters of mixed dtypes cannot share one gradient buffer')
        self.name = name
        self.max_grad_norm = max_grad_norm
        self.max_grad_value = max_grad_value
        device = self.params[0].device
        cls = dnnlib.util.get_obj_by_name(class_name)
        # Fused kernels take the skip flag on the device (and are the fastest); else a host sync decides the skip.
        self.fused = 'fused' in inspect.signature(cls).parameters and device.type in ('cuda', 'cpu')
        self.optimizer = cls(self.params, **opt_kwargs, **(dict(fused=True) if self.fused else {}))
        self.scaler = None
        if _loss_scaling is not None:
            self.scaler = LossScaler(device, static=None if _loss_scaling == 'dynamic' else _loss_scaling)
        self.flat = None

    def _grad_buffer(self):
        """Every parameter's .grad is a view into one zeroed flat buffer: backward accumulates into it in place."""
        if self.flat is None:
            self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=self.params[0].dtype, device=self.params[0].device)
            offset = 0
            for p in self.params:
                p.grad = self.flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        return self.flat

    def backward(self, rounds, loss_fn, per_rank_batch):
        """Backpropagate sum over rounds of loss_fn(round).sum() / per_rank_batch (times the loss scale), so that
        gradients do not depend on how a rank's share of the batch is split into rounds (--batch-gpu)."""
        self._grad_buffer()
        factor = 1 / per_rank_batch if self.scaler is None else self.scaler.scale / per_rank_batch
        for i, r in enumerate(rounds):
            if i > 0 and _abandon_check is not None and _abandon_check():
                raise StepAbandoned()
            loss_fn(r).sum().mul(factor).backward()

    def step(self, lr):
        """Average over ranks, unscale, skip if non-finite (counted), clip (norm, then value), step; then free the gradients."""
        global _abandon_check
        _abandon_check = None  # the weights change now: the rest of the step must run
        flat = self._grad_buffer()
        world_size = distributed.get_world_size()
        if world_size > 1:
            distributed.all_reduce_sum(flat)
        flat.mul_(1 / world_size if self.scaler is None else 1 / (self.scaler.scale * world_size))
        norm = torch.linalg.vector_norm(flat)
        found_inf = (~torch.isfinite(norm)).to(torch.float32)
        if self.max_grad_norm is not None:
            flat.mul_((self.max_grad_norm / (norm + 1e-6)).clamp(max=1))
        if self.max_grad_value is not None:
            flat.clamp_(-self.max_grad_value, self.max_grad_value)
        for g in self.optimizer.param_groups:
            g['lr'] = lr
        if self.fused:
            self.optimizer.found_inf = found_inf  # the fused kernel leaves weights, moments and step count alone
            self.optimizer.step()
        elif not found_inf:  # host sync: only for optimizers without a fused kernel
            self.optimizer.step()
        if self.scaler is not None:
            at_floor = self.scaler.update(found_inf)
            if at_floor is not None:  # the training loop stops the run as diverged if this is ever 1
                training_stats.report(f'Health/scale_floor_{self.name}', at_floor)
            training_stats.report(f'Health/loss_scale_{self.name}', self.scaler.scale)
        training_stats.report(f'Health/skipped_{self.name}', found_inf)
        training_stats.report(f'Health/grad_norm_{self.name}', norm)
        for p in self.params:
            p.grad = None
        self.flat = None

    def reset(self):
        """Fresh optimizer moments (e.g. a new training stage)."""
        self.optimizer.state.clear()

    def _unread_first_moments(self):
        """Indices of the parameters whose Adam first moment the next update never reads: with beta1 = 0 (SiD's
        Adam) it is the last gradient, replaced by the next one (m = 0 * m + g)."""
        index = 0
        unread = set()
        for g in self.optimizer.param_groups:
            if g.get('betas', (None,))[0] == 0:
                unread.update(range(index, index + len(g['params'])))
            index += len(g['params'])
        return unread

    def state_dict(self):
        """The optimizer's state without what the next update does not read (a sixth of an ImageNet-64 SiD state)."""
        optimizer = self.optimizer.state_dict()
        unread = self._unread_first_moments()
        optimizer['state'] = {i: {k: v for k, v in s.items() if not (k == 'exp_avg' and i in unread)}
                              for i, s in optimizer['state'].items()}
        state = dict(optimizer=optimizer)
        if self.scaler is not None:
            state['scaler'] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state):
        params = [p for g in self.optimizer.param_groups for p in g['params']]
        optimizer = dict(state['optimizer'])
        unread = self._unread_first_moments()
        optimizer['state'] = {i: dict(s, exp_avg=torch.zeros_like(params[i])) if i in unread and 'exp_avg' not in s else s
                              for i, s in optimizer['state'].items()}
        self.optimizer.load_state_dict(optimizer)
        if self.scaler is not None:
            if 'scaler' not in state:
                raise ValueError('The training state has no fp16 loss scale: it was written by a run in another '
                                 'precision; resume with that run\'s --precision')
            self.scaler.load_state_dict(state['scaler'])


def rampup_lr(lr, cur_nimg, rampup_kimg):
    """EDM's linear learning-rate warm-up over the first `rampup_kimg` thousand images."""
    if rampup_kimg > 0:
        return lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
    return lr
