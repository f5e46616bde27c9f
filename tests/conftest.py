"""One intra-op thread per process: the tests use tiny networks, where extra threads only add contention
(and the torchrun tests start two processes on a 2-core machine)."""

import os

os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch  # noqa: E402 (after the environment is set, so child processes inherit it)

torch.set_num_threads(1)
