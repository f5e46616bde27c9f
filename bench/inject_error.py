"""train.py under torchrun with an error injected on one rank (bench/gpu_check.py's error rows, issue 23 item 3):
the job must end on every rank within seconds with train.py's one-line error and exit code 1, not wait for the
collective timeout. Run as torchrun's script in place of train.py, with the same arguments:

    INJECT_RANK=1 INJECT_AT=step  torchrun --nproc_per_node=2 bench/inject_error.py <train.py options>  # OOM in a step
    INJECT_RANK=0 INJECT_AT=state torchrun --nproc_per_node=2 bench/inject_error.py <train.py options>  # disk full
"""

import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def inject(at):
    """Patch this process only: the method's third step raises CUDA's OOM ('step'), or rank 0's training-state
    write fails as a full disk would ('state')."""
    from training import training_loop
    from training.distill.dmd import DMD
    if at == 'state':
        def write_state(state, path):
            raise OSError(28, 'No space left on device (injected)', path)
        training_loop._write_state = write_state
        return
    real_step, calls = DMD.step, []

    def step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError('CUDA out of memory (injected)')
        return real_step(self, *args, **kwargs)
    DMD.step = step


if __name__ == '__main__':
    if int(os.environ.get('RANK', 0)) == int(os.environ['INJECT_RANK']):
        inject(os.environ['INJECT_AT'])
    sys.argv = [os.path.join(ROOT, 'train.py'), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name='__main__')
