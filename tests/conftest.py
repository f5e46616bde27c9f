"""One intra-op thread per process: the tests use tiny networks, where extra threads only add contention
(and the torchrun tests start two processes on a 2-core machine). Signal handlers and torch's
deterministic mode are restored after each test."""

import os
import signal

import pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')

import torch  # noqa: E402 (after the environment is set, so child processes inherit it)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_process_settings():
    """train.main keeps its SIGTERM/SIGINT handlers until its process exits, and --deterministic sets a torch-wide
    mode: in the test process both end with the test (so that Ctrl-C still stops pytest)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    torch.use_deterministic_algorithms(deterministic)
