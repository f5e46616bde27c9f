"""The count of host-device synchronisations inside a block (bench/gpu_check.py, bench/bench_syncs.py, tests).
Imports torch only, so that bench_syncs.py can count inside an older checkout's code."""

import warnings
import weakref

import torch


class SyncCounter:
    """Host-device synchronisations inside the block. CUDA: its sync debug mode warns on each. CPU, where nothing
    waits: the calls that would wait on CUDA (a value read on the host, a data-dependent shape), counted by name."""
    NAMES = ['item', 'tolist', '__bool__', '__float__', '__int__', 'numpy', 'nonzero', '__format__', '__repr__']

    def __init__(self, device):
        self.device = torch.device(device)
        self.calls = []

    @property
    def count(self):
        return len(self.calls)

    def __enter__(self):
        if self.device.type == 'cuda':
            self._warnings = warnings.catch_warnings(record=True)
            self._log = self._warnings.__enter__()
            warnings.simplefilter('always')
            torch.cuda.set_sync_debug_mode('warn')
            return self
        self._saved = {name: getattr(torch.Tensor, name) for name in [*self.NAMES, '__getitem__']}
        for name in self.NAMES:
            setattr(torch.Tensor, name, self._counting(name, self._saved[name]))
        getitem = self._saved['__getitem__']

        def masked_getitem(t, idx):  # boolean-mask indexing: the result's shape depends on the data
            if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
                self.calls.append('bool index')
            return getitem(t, idx)
        torch.Tensor.__getitem__ = masked_getitem
        return self

    def _counting(self, name, fn):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.set_sync_debug_mode('default')
            self._warnings.__exit__(*exc)
            self.calls = [str(w.message) for w in self._log if 'synchroniz' in str(w.message)]
            return
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)


# id -> weakref of the tensors on the "host" in the CPU emulation, kept from one block to the next (a host
# accumulator made in one step is still on the host in the next).
_HOST = {}


class HostCopyCounter(torch.overrides.TorchFunctionMode):
    """Host-to-device copies inside the block: a tensor made on the device from Python/numpy data, a host tensor
    moved or copied to the device, a host tensor (not a scalar) fed to an op on device tensors (indexing copies it).
    On CUDA each is a copy from pageable memory, which waits for the stream. On CUDA a tensor's place is its device;
    on the CPU, which is both, the CUDA placement is emulated: a tensor is on the host if the block made it without
    naming a device (from Python/numpy data, a factory without device=, torch.from_numpy, .cpu()) or computed it
    from such tensors only; every other tensor (made before the block, or on a named device) is on the device.
    A `.to(device, non_blocking=True)` of pinned memory does not wait and is not counted."""

    HOST_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
    MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.as_tensor, torch.tensor, torch.asarray}

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)
        self.calls = []
        self._host = _HOST

    @property
    def count(self):
        return len(self.calls)

    def _is_host(self, t):
        if self.device.type != 'cpu':
            return t.device.type == 'cpu'
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark_host(self, out):
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and self.device.type == 'cpu':
                key = id(t)  # the entry goes when the tensor does (unless the id was reused meanwhile)
                self._host[key] = weakref.ref(t, lambda ref, key=key: self._host.get(key) is ref and self._host.pop(key))

    def _named_device(self, func, args, kwargs):
        """The device a call names for its result: 'host', 'device', or None (none named)."""
        if func is torch.Tensor.cuda:
            return 'device'
        if func is torch.Tensor.cpu:
            return 'host'
        named = kwargs.get('device')
        if func is torch.Tensor.to:
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    named = a
                elif isinstance(a, torch.Tensor):
                    return 'host' if self._is_host(a) else 'device'
        if func is torch.Tensor.new_tensor and named is None:
            return 'host' if self._is_host(args[0]) else 'device'
        if named is None:
            return None
        return 'device' if torch.device(named).type == self.device.type else 'host'

    # Every torch call inside the block: run it, then count it or place its result (host or device).
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else kwargs.get('data'))
        tensors = [t for a in [*args, *kwargs.values()] for t in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(t, torch.Tensor)]
        if func is torch.Tensor.new_tensor:
            tensors = tensors[1:]
        target = self._named_device(func, args, kwargs) if func in self.MOVES | self.HOST_DATA | {torch.Tensor.cpu} else None
        if func in self.HOST_DATA and not isinstance(data, torch.Tensor):
            if target == 'device':
                self.calls.append(f'{func.__name__} of host data on the device')
            elif target is None:
                self._mark_host(out)
        elif func in self.MOVES or func is torch.Tensor.cpu:
            source_host = tensors and self._is_host(tensors[0])
            # A non-blocking copy from pinned memory waits for nothing (a CPU-only build cannot pin: trusted there).
            pinned = kwargs.get('non_blocking') and (self.device.type == 'cpu' or tensors[0].is_pinned())
            if target == 'device':
                if source_host and not pinned:
                    self.calls.append(f'{func.__name__} of a host tensor to the device')
                self._host.pop(id(out), None)  # on the CPU a move can return its (host-marked) input itself
            elif target == 'host' or (target is None and source_host):
                self._mark_host(out)
        elif func is torch.Tensor.copy_ and self._is_host(args[1]) and not self._is_host(args[0]):
            self.calls.append('copy_ of a host tensor to the device')
        elif not tensors:  # a factory: on the host unless it names the device
            if target is None and kwargs.get('device') is None:
                self._mark_host(out)
        else:
            host = [self._is_host(t) for t in tensors]
            if all(host):
                self._mark_host(out)
            elif any(h and t.dim() > 0 for h, t in zip(host, tensors)):
                self.calls.append(f'{getattr(func, "__name__", func)} with a host tensor among device tensors')
        return out

    def __enter__(self):
        self._from_numpy = torch.from_numpy
        torch.from_numpy = lambda a: self._marked(self._from_numpy(a))  # not seen by the mode: always on the host
        return super().__enter__()

    # torch.from_numpy's replacement inside the block: its tensor is on the host.
    def _marked(self, t):
        self._mark_host(t)
        return t

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)
