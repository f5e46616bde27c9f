"""Calls that make the host wait for the device, per training step (DMD, DMD with the GAN head, EDM), counted on the
CPU by name (`.item()`, `.tolist()`, `bool(t)`, boolean-mask indexing, ...: what would wait on CUDA) with the
counter of bench/gpu_check.py (bench/sync_counter.py, torch only, so it also runs against an older checkout):

    python bench/bench_syncs.py .
    git worktree add /tmp/old 53d2c4f && python bench/bench_syncs.py /tmp/old
"""

import collections
import os
import sys
import tempfile

import numpy as np
import torch

root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else '.')
sys.path.insert(0, root)
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # this checkout's sync_counter.py, after the code counted
os.chdir(root)
torch.set_num_threads(1)

from dataset_tool import save_dataset  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402
from training.distill.dmd import DMD  # noqa: E402
from training.networks import EDMPrecond  # noqa: E402
from training.teacher import EDM  # noqa: E402
from sync_counter import SyncCounter  # noqa: E402


def main():
    workdir = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    save_dataset(os.path.join(workdir, 'data.zip'), [rng.integers(0, 256, [16, 16, 3], dtype=np.uint8) for _ in range(16)],
                 [i % 4 for i in range(16)])
    ds = ImageFolderDataset(path=os.path.join(workdir, 'data.zip'), use_labels=True)
    config = dict(model_type='SongUNet', model_channels=8, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[])
    torch.manual_seed(0)
    teacher = EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, **config).eval().requires_grad_(False)

    def rounds(step, batch=4):
        images = torch.stack([torch.from_numpy(ds[i][0]) for i in range(batch)]).float() / 127.5 - 1
        labels = torch.stack([torch.from_numpy(ds[i][1]) for i in range(batch)])
        return [Round(images, labels, StepRandom(0, step, batch, 'cpu'), 0, batch)]

    methods = dict(
        dmd=lambda: DMD(teacher, 'cpu', 4),
        dmd_gan=lambda: DMD(teacher, 'cpu', 4, dataset=ds, gan_g_weight=3e-3),
        edm=lambda: EDM('cpu', ds, 4, network_kwargs=dict(class_name='training.networks.EDMPrecond', **config),
                        loss_kwargs=dict(class_name='training.loss.EDMLoss'),
                        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-4)))
    for name, make in methods.items():
        method = make()
        method.step(rounds(0), 0)  # the first step creates optimizer states
        with SyncCounter('cpu') as counter:
            method.step(rounds(1), 4)
        print(f'{name}: {len(counter.calls)} calls per step {dict(collections.Counter(counter.calls))}')


if __name__ == '__main__':
    main()
