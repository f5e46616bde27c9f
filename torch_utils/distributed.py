"""torchrun-aware process group: NCCL on CUDA, gloo on CPU, world size 1 without torchrun."""

import os

import torch

_device = None

# ----------------------------------------------------------------------------

def init(device=None):
    """Join the torchrun process group if there is one; returns the device this rank uses."""
    global _device
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    if 'WORLD_SIZE' in os.environ and not torch.distributed.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = dict(device_id=device) if device.type == 'cuda' else {}
        torch.distributed.init_process_group(backend=backend, init_method='env://', **kwargs)
    _device = device
    return device


def device():
    return _device if _device is not None else torch.device('cpu')


def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0


def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        torch.distributed.barrier()


def shutdown():
    if is_distributed():
        torch.distributed.destroy_process_group()


def all_reduce_sum(x):
    """In-place sum across ranks; works for CPU (gloo) and CUDA (NCCL) tensors alike."""
    if is_distributed():
        torch.distributed.all_reduce(x)
    return x


def broadcast_(x, src=0):
    if is_distributed():
        torch.distributed.broadcast(x, src=src)
    return x


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)
