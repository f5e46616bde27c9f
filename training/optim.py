"""Applying one update: accumulate per-round gradients, average over ranks, clip, step with the scheduled lr."""

import torch

import dnnlib
from torch_utils import misc

# ----------------------------------------------------------------------------

def make_optimizer(params, class_name='torch.optim.Adam', **kwargs):
    """Fused/foreach implementations are picked by torch itself for the device the parameters live on."""
    return dnnlib.util.construct_class_by_name(params=list(params), class_name=class_name, **kwargs)


def backward_rounds(rounds, loss_fn, per_rank_batch, loss_scaling=1):
    """Sum over rounds of loss_fn(round).sum() * loss_scaling / per_rank_batch, so that gradients do not
    depend on how a rank's share of the batch is split into rounds (--batch-gpu). Returns the summed loss."""
    total = 0
    for r in rounds:
        loss = loss_fn(r)
        loss.sum().mul(loss_scaling / per_rank_batch).backward()
        total = total + loss.detach().sum()
    return total


def rampup_lr(lr, cur_nimg, rampup_kimg):
    """EDM's linear learning-rate warm-up over the first `rampup_kimg` thousand images."""
    if rampup_kimg > 0:
        return lr * min(cur_nimg / max(rampup_kimg * 1000, 1e-8), 1)
    return lr


def step(optimizer, params, lr, loss_scaling=1, max_grad_norm=None):
    """Average gradients over ranks, undo loss scaling, sanitise, clip, step, zero."""
    params = [p for p in params if p.requires_grad]
    misc.sync_grads(params)
    if loss_scaling != 1:
        for p in params:
            p.grad.div_(loss_scaling)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    for g in optimizer.param_groups:
        g['lr'] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
