"""Scalar statistics reported from anywhere in a step and collected across ranks once per tick.

Reporting only accumulates on the device (no host sync); `collect()` reduces over ranks in name order,
so every rank must call it at the same point. Names reported by some ranks only are zero-filled on the others.
"""

import torch

from torch_utils import distributed

_moments = {}   # name -> float64 tensor [4]: count of finite values, their sum, sum of squares; non-finite count

# ----------------------------------------------------------------------------

def report(name, value):
    """Accumulate every element of `value` under `name`; returns `value` so it can be used inline.
    Non-finite elements are counted apart (never hidden, never mixed into the mean). No host sync."""
    x = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)
    x = x.flatten().to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum(dtype=torch.float64)
    x = torch.where(finite, x, 0)
    m = torch.stack([n, x.sum(), x.square().sum(), x.numel() - n])
    if name in _moments:
        _moments[name] = (_moments[name] if _moments[name].device == m.device else _moments[name].to(m.device)) + m
    else:
        _moments[name] = m
    return value


def report0(name, value):
    """Report from rank 0 only (e.g. timings); other ranks contribute nothing."""
    if distributed.get_rank() == 0:
        report(name, value)
    else:
        _moments.setdefault(name, torch.zeros(4, dtype=torch.float64))
    return value


def _reduced(device, prefix=''):
    """(sorted names, float64 [names, 4] moments summed over ranks) of the names under `prefix`; all ranks call."""
    device = device or distributed.device()
    names = {n for n in _moments if n.startswith(prefix)}
    if distributed.is_distributed():
        gathered = [None] * distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, sorted(names))
        names = set().union(*map(set, gathered))
    names = sorted(names)
    if not names:
        return names, None
    zeros = torch.zeros(4, dtype=torch.float64, device=device)
    stacked = torch.stack([_moments[n].to(device) if n in _moments else zeros for n in names])
    return names, distributed.all_reduce_sum(stacked).cpu().tolist()


def collect(device=None, prefix='', reset=True):
    """{name: {'num', 'mean', 'std'[, 'nonfinite']}} over all ranks since the last reset, for the names that start
    with `prefix` (a string or a tuple of them); reset=False only looks (e.g. at the losses before a snapshot)."""
    names, moments = _reduced(device, prefix)
    if reset:
        for n in names:
            _moments.pop(n, None)
    result = {}
    for name, (num, s, sq, nonfinite) in zip(names, moments or []):
        if num + nonfinite == 0:
            continue
        mean = s / num if num else None  # None (JSON null): every value was non-finite
        result[name] = dict(num=num, mean=mean, std=max(sq / num - mean ** 2, 0) ** 0.5 if num else None)
        if nonfinite:
            result[name]['nonfinite'] = nonfinite
    return result
