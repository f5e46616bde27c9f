"""torchrun-aware process group: NCCL on CUDA, gloo on CPU, world size 1 without torchrun."""

import contextlib
import datetime
import os
import sys

import torch

_device = None
_cpu_group = None  # a gloo group of its own for host-side flags, which must not wait for the GPU (NCCL)

# How long a rank may wait in a collective (barrier, all-reduce, ...) before the job fails. NCCL's default of 10
# minutes is shorter than some legitimate waits, e.g. the other ranks waiting while rank 0 downloads a teacher or
# writes a multi-GiB training state; a generous default still ends a hung job.
TIMEOUT_ENV = 'EDM_DISTILL_TIMEOUT_MIN'
DEFAULT_TIMEOUT_MIN = 60

# ----------------------------------------------------------------------------

def init(device=None):
    """Join the torchrun process group if there is one; returns the device this rank uses."""
    global _device, _cpu_group
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    if 'WORLD_SIZE' in os.environ and not torch.distributed.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = dict(device_id=device) if device.type == 'cuda' else {}
        torch.distributed.init_process_group(backend=backend, init_method='env://', timeout=timeout(), **kwargs)
        # Also beside gloo, so that the CPU tests run the group the stop agreement uses on GPUs.
        _cpu_group = torch.distributed.new_group(backend='gloo', timeout=timeout())
        _exit_now_after_uncaught_exceptions()
    _device = device
    return device


def timeout():
    """The collective timeout: $EDM_DISTILL_TIMEOUT_MIN minutes, default 60."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(text)
    except ValueError:
        minutes = float('nan')
    if not 0 < minutes < float('inf'):
        raise ValueError(f'{TIMEOUT_ENV}="{text}" is not a number of minutes; set it to a positive number, '
                         f'e.g. {TIMEOUT_ENV}=120, or unset it for {DEFAULT_TIMEOUT_MIN}')
    return datetime.timedelta(minutes=minutes)


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


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block before the other ranks do, e.g. so that a URL is downloaded into the shared cache
    once and the others read the cached file. Exactly one barrier per rank, also when the block raises."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()


def shutdown(code=0):
    """Leave the process group: only when this rank ends normally or stopped on a signal, with its peers doing the
    same (on an error call exit_now instead). Under torchrun the process then ends here with `code` (exit_now): the
    interpreter's teardown after a gloo group can abort in C++ ("terminate called without an active exception",
    SIGABRT after a finished train.py run: 2 of about 37 two-process runs, torch 2.13 CPU, 2026-12-07; 0 of 70 so)."""
    global _cpu_group
    if is_distributed():
        _cpu_group = None  # its C++ object goes with the group, not with the interpreter's teardown
        torch.distributed.destroy_process_group()
        exit_now(code)


def exit_now(code):
    """End this process at once, without destroy_process_group or the interpreter's teardown. On an error: NCCL's
    shutdown waits for the peers' outstanding collectives (PyTorch >= 2.6), and a peer waiting in a collective for
    this failed rank never ends them: every GPU would idle until the collective timeout. Exiting lets torchrun see the
    failure and stop the other ranks within seconds. After shutdown(): see there."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_now_after_uncaught_exceptions():
    """A traceback under torchrun (a bug, a CUDA error, a peer's collective failing because a rank died) is printed
    as before (torch's hook prefixes [rankN]), then the rank exits at once with 1 (see exit_now)."""
    print_traceback = sys.excepthook

    def hook(*args):
        print_traceback(*args)
        exit_now(1)
    sys.excepthook = hook


def all_reduce_sum(x):
    """In-place sum across ranks; works for CPU (gloo) and CUDA (NCCL) tensors alike."""
    if is_distributed():
        torch.distributed.all_reduce(x)
    return x


def broadcast_(x, src=0):
    if is_distributed():
        torch.distributed.broadcast(x, src=src)
    return x


def any_rank(flag):
    """True on every rank when `flag` is true on any: an all-reduce of a CPU tensor (gloo), cheap enough for every
    step and never waiting for the GPU."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, group=_cpu_group)
    return bool(t.item() > 0)


def all_gather_object(obj):
    """[every rank's obj], in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src=0):
    """Rank src's value of a picklable object, on every rank."""
    if is_distributed():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        obj = box[0]
    return obj


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)
