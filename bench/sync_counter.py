"""The count of host-device synchronisations inside a block (bench/gpu_check.py, bench/bench_syncs.py, tests).
Imports torch only, so that bench_syncs.py can count inside an older checkout's code."""

import warnings

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
