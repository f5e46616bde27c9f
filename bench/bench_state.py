"""Training-state size and write time of the official ImageNet-64 DMD2 and SiD configurations (issue 23 item 5).

    python bench/bench_state.py --dir=/tmp      # needs about 8 GB of free disk and memory

Constructs EDM's ADM ImageNet-64 network (kd.TEACHER_CONFIGS['imagenet64'], the README's teacher) on the CPU and lays
out each method's training state as its state_dict does: DMD2's recipe (`--ema=0 --gan-g=3e-3`) stores G, the fake
score with its GAN head, and both AdamW optimizers' two moments; SiD's (`--ema=2`) stores G, the fake score, G's EMA
and both optimizers' second moments (beta1 = 0: training/optim.py leaves the first moments out). The moments hold
zeros (the write time does not depend on the values). Each state is written as the loop's background thread writes
it (training_loop._write_state: torch.save, sha256 while writing, fsync, the checksum file), checked as a resume
checks it (state_problem: one read against the checksum), and deleted. The CPU copy the loop makes before handing
a state to the thread is timed on one network.
"""

import os
import shutil
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training import training_loop  # noqa: E402
from training.distill import kd  # noqa: E402
from training.distill.dmd import GANHead  # noqa: E402

# ----------------------------------------------------------------------------

def adam_state(params, first_moments):
    """An optimizer state_dict as Updater.state_dict returns it after some steps."""
    state = {i: dict(step=torch.tensor(1000.0), exp_avg_sq=torch.zeros_like(p), **(dict(exp_avg=torch.zeros_like(p)) if first_moments else {}))
             for i, p in enumerate(params)}
    return dict(optimizer=dict(state=state, param_groups=[dict(lr=1e-5, params=list(range(len(params))))]))


def clone(net_state):
    return {k: v.clone() for k, v in net_state.items()}


def method_state(name, net):
    """The method part of a training state of the official ImageNet-64 recipe `name`."""
    G = net.state_dict()
    if name == 'dmd2':
        config = kd.TEACHER_CONFIGS['imagenet64']
        head = GANHead(config['model_channels'] * config['channel_mult'][-1]).state_dict()  # on the 8x8 bottleneck
        fake = clone(G)
        return dict(G=G, fake=fake, head=head, opt_G=adam_state(list(G.values()), True),
                    opt_fake=adam_state(list(fake.values()) + list(head.values()), True), num_steps=0, num_g_steps=0)
    fake = clone(G)
    return dict(G=G, fake=fake, G_ema=clone(G), opt_G=adam_state(list(G.values()), False),
                opt_fake=adam_state(list(fake.values()), False), num_steps=0, num_g_steps=0)


@click.command()
@click.option('--dir', 'root', help='Where the states are written (and deleted)', metavar='DIR', required=True)
@click.option('--methods', help='Comma list: dmd2, sid', default='dmd2,sid', show_default=True)
def main(root, methods):
    """Size, write time and resume-check time of ImageNet-64 training states."""
    torch.manual_seed(0)
    t = time.perf_counter()
    net = dnnlib.util.construct_class_by_name(**kd.TEACHER_CONFIGS['imagenet64'])
    params = sum(p.numel() for p in net.parameters())
    print(f'ADM ImageNet-64: {params / 1e6:.1f}M parameters, {sum(v.numel() * v.element_size() for v in net.state_dict().values()) / 1e9:.2f} GB '
          f'of state dict, constructed in {time.perf_counter() - t:.0f} s')
    t = time.perf_counter()
    copy = training_loop._cpu_copy(net.state_dict())
    print(f'CPU copy of one network (the loop\'s part of a write, here memory to memory): {time.perf_counter() - t:.2f} s')
    del copy
    workdir = tempfile.mkdtemp(prefix='bench-state-', dir=root)
    try:
        for name in methods.split(','):
            state = dict(method=method_state(name, net), cur_nimg=0, cur_tick=0, tick_start_nimg=0, step=0, world_size=8,
                         rng=[training_loop._rng_state(torch.device('cpu'))] * 8)
            path = os.path.join(workdir, 'training-state-000000.pt')
            t = time.perf_counter()
            training_loop._write_state(state, path)
            write_s = time.perf_counter() - t
            size = os.path.getsize(path)
            del state
            t = time.perf_counter()
            problem = training_loop.state_problem(path)
            check_s = time.perf_counter() - t
            assert problem is None, problem
            print(f'{name}: {size / 1e9:.2f} GB ({size / (params * 4):.2f} network copies), write {write_s:.1f} s '
                  f'({size / write_s / 1e9:.2f} GB/s), resume check {check_s:.1f} s')
            os.remove(path)
            os.remove(training_loop.checksum_path(path))
    finally:
        shutil.rmtree(workdir)


if __name__ == '__main__':
    main()
