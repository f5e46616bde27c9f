"""Small tensor/module utilities used by the training loop and the methods."""

import hashlib

import torch

from torch_utils import distributed

# ----------------------------------------------------------------------------

def named_tensors(module):
    """Parameters and buffers in state-dict order."""
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def broadcast_module(module, src=0):
    """Make every rank hold rank 0's parameters and buffers (random buffers such as Fourier freqs included)."""
    if distributed.is_distributed():
        for _, t in named_tensors(module):
            torch.distributed.broadcast(t.data, src=src)


def checksum(module):
    """SHA-256 of all parameters and buffers, for tests that must prove weights changed (or did not)."""
    h = hashlib.sha256()
    for name, t in named_tensors(module):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def all_finite(modules):
    """One device-side check over every parameter (a single host sync at the end)."""
    flags = [torch.isfinite(p).all() for m in modules for p in m.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def save_image_grid(images, path, grid_w=None):
    """Float images in [-1, 1] (N, C, H, W) -> one PNG grid, grid_w images per row (default: about square)."""
    import PIL.Image
    import numpy as np
    n, c, h, w = images.shape
    grid_w = grid_w or max(int(np.ceil(np.sqrt(n))), 1)
    grid_h = -(-n // grid_w)
    x = (images.detach().to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu().numpy()
    x = np.concatenate([x, np.zeros([grid_w * grid_h - n, c, h, w], np.uint8)])
    x = x.reshape(grid_h, grid_w, c, h, w).transpose(0, 3, 1, 4, 2).reshape(grid_h * h, grid_w * w, c)
    from dnnlib.util import atomic_write
    img = PIL.Image.fromarray(x[:, :, 0] if c == 1 else x, 'L' if c == 1 else 'RGB')
    atomic_write(path, lambda f: img.save(f, format='PNG'))
