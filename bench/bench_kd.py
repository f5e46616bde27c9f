"""KD compression benchmarks: student sizes, forward speed of each variant against its teacher, and a toy run.

    python bench/bench_kd.py counts                         # official configs (or --teacher=PKL)
    python bench/bench_kd.py speed --device=cpu --batch=4   # forward-pass time ratio student / teacher
    python bench/bench_kd.py toy --workdir=/tmp/kd-toy      # KD student vs the same network from scratch
"""

import json
import os
import statistics
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dnnlib  # noqa: E402
from training.distill import kd  # noqa: E402

# ----------------------------------------------------------------------------

# The teacher and its students (meta tensors unless `device`), by name; variants that do not apply are left out.
def family(teacher_kwargs, device=None):
    with torch.device(device or 'meta'):
        nets = {'teacher': dnnlib.util.construct_class_by_name(**teacher_kwargs)}
        for variant in kd.VARIANTS:
            try:
                config = kd.student_config(nets['teacher'], variant)
            except ValueError as e:
                nets[variant] = str(e)
                continue
            nets[variant] = dnnlib.util.construct_class_by_name(**config)
    return nets


def num_params(net):
    return sum(p.numel() for p in net.parameters())


@click.group()
def cli():
    """KD compression benchmarks."""


@cli.command()
@click.option('--teacher', help='A teacher pickle instead of the official configs', metavar='PKL|URL', type=str)
@click.option('--trust-pickle', help='Allow code embedded in the pickle to run', is_flag=True)
def counts(teacher, trust_pickle):
    """Parameter counts of the students of the official teachers (or of --teacher)."""
    if teacher is not None:
        from torch_utils import persistence
        try:
            net = persistence.load_network_pkl(teacher, allow_code=trust_pickle)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--teacher: {e}')
        configs = {os.path.basename(teacher): dict(class_name=f'training.networks.{type(net).__name__}', **kd._init_kwargs(net))}
    else:
        configs = kd.TEACHER_CONFIGS
    for name, config in configs.items():
        nets = family(config)
        n_teacher = num_params(nets['teacher'])
        click.echo(f'{name:12s} teacher {n_teacher:>13,d}')
        for variant in kd.VARIANTS:
            if isinstance(nets[variant], str):
                click.echo(f'{"":12s} {variant:7s} not available: {nets[variant]}')
            else:
                n = num_params(nets[variant])
                click.echo(f'{"":12s} {variant:7s} {n:>13,d}  ({n / n_teacher:.1%} of the teacher)')

# ----------------------------------------------------------------------------

# One timed forward pass, synchronised on CUDA so the clock sees the work.
def timed_forward(net, inputs, device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        net(*inputs[:3], **inputs[3])
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# Inputs as in training: x = y + n*sigma with sigma log-normal, one-hot labels, zero augmentation labels.
def make_inputs(config, batch, device):
    g = torch.Generator().manual_seed(0)
    R, C, L = config['img_resolution'], config['img_channels'], config['label_dim']
    sigma = (torch.randn([batch], generator=g) * 1.2 - 1.2).exp()
    x = torch.randn([batch, C, R, R], generator=g) * (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25).sqrt()
    labels = torch.eye(L)[torch.randint(L, [batch], generator=g)] if L else None
    extra = dict(augment_labels=torch.zeros([batch, config['augment_dim']])) if config.get('augment_dim') else {}
    to = lambda t: t.to(device) if t is not None else None
    return to(x), to(sigma), to(labels), {k: to(v) for k, v in extra.items()}


# Floating-point operations of one forward pass per image (convolutions, matmuls, attention), counted on meta tensors.
def forward_flops(net, config):
    from torch.utils.flop_counter import FlopCounterMode
    x, sigma, labels, extra = make_inputs(config, 1, 'meta')
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(x, sigma, labels, **extra)
    return counter.get_total_flops()


@cli.command()
@click.option('--configs', help='Comma list of official configs', default='cifar10,imagenet64', show_default=True)
@click.option('--device', help='cpu or cuda', type=click.Choice(['cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--batch', help='Images per forward pass', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--iters', help='Timed passes per network, interleaved (median reported)', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--threads', help='CPU threads (torch.set_num_threads)', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--fp16', help='use_fp16 as the official ImageNet config (CUDA only)', is_flag=True)
def speed(configs, device, batch, iters, threads, fp16):
    """Forward-pass time of each student relative to its teacher (random weights, same inputs, one process)."""
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.BadParameter('CUDA is not available on this machine; use --device=cpu', param_hint='--device')
    torch.set_num_threads(threads)
    click.echo(f'torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {batch}, iters {iters}')
    for name in configs.split(','):
        if name not in kd.TEACHER_CONFIGS:
            raise click.BadParameter(f'unknown config "{name}"; choose from {", ".join(kd.TEACHER_CONFIGS)}', param_hint='--configs')
        config = dict(kd.TEACHER_CONFIGS[name], use_fp16=fp16 and device.type == 'cuda')
        flops = {k: forward_flops(v, config) for k, v in family(config).items() if not isinstance(v, str)}
        torch.manual_seed(0)
        nets = {k: v.to(device).eval() for k, v in family(config, device='cpu').items() if not isinstance(v, str)}
        inputs = make_inputs(config, batch, device)
        for net in nets.values():
            timed_forward(net, inputs, device)  # warm-up
        times = {k: [] for k in nets}
        for _ in range(iters):
            for k, net in nets.items():
                times[k].append(timed_forward(net, inputs, device))
        t = {k: statistics.median(v) for k, v in times.items()}
        for k in nets:
            click.echo(f'{name:10s} {k:7s} {num_params(nets[k]) / 1e6:6.1f}M  {flops[k] / 1e9:6.1f} GFLOP/img  '
                       f'FLOP ratio {flops[k] / flops["teacher"]:.3f}  {t[k] * 1e3 / batch:8.1f} ms/img  '
                       f'time ratio {t[k] / t["teacher"]:.3f} (speedup {t["teacher"] / t[k]:.2f}x)')
        del nets

# ----------------------------------------------------------------------------
# Toy: a fitted UNet teacher on the exact Gaussian-mixture problem, compressed, against the same student from scratch.

def run_arm(run_dir, problem, method_kwargs, steps, batch, seed):
    """Train with the real loop and return the final snapshot's network (one snapshot, at the end)."""
    from torch_utils import persistence
    from training import training_loop
    os.makedirs(run_dir, exist_ok=True)
    kimg = steps * batch / 1000
    training_loop.training_loop(
        run_dir=run_dir, method_kwargs=method_kwargs, seed=seed, batch_size=batch, total_kimg=kimg,
        teacher=os.path.join(problem, 'teacher-unet.pkl') if 'distill' in method_kwargs['class_name'] else None,
        dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=os.path.join(problem, 'dataset.zip'),
                            use_labels=True, cache=True),
        data_loader_kwargs=dict(num_workers=0), kimg_per_tick=kimg, snapshot_ticks=1, state_dump_ticks=None,
        preview_grid=0, device=torch.device('cpu'))
    snapshot = os.path.join(run_dir, f'network-snapshot-{int(steps * batch) // 1000:06d}.pkl')
    return persistence.load_network_pkl(snapshot).eval().requires_grad_(False)


def evaluate(net, problem, num, gmm):
    """Denoising RMS vs D* (mean over 10 sigmas) and Heun-18 sample metrics against the exact mixture."""
    import toy as toy_cli
    rms = toy_cli.fit_error(net, gmm)
    ref = toy_cli.load_reference(problem)
    m = toy_cli.measure(toy_cli.network_batches(net, ref, num, 'uniform', batch=500), ref, 'uniform')
    return dict(rms=sum(rms.values()) / len(rms), rms_per_sigma=rms, fd=m['images']['fd'], mode_tv=m['images']['mode_tv'],
                precision=m['images']['precision'], floor_fd=m['floor']['fd'])


@cli.command()
@click.option('--workdir', help='Problem and runs go here (the problem is built once)', metavar='DIR', required=True)
@click.option('--variant', help='Student', type=click.Choice(kd.VARIANTS), default='small', show_default=True)
@click.option('--steps', help='Training steps of every arm', type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--batch', help='Batch size', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--lr', help='Adam learning rate of every arm', type=float, default=1e-3, show_default=True)
@click.option('--num', help='Samples for the metrics', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--fit-kimg', help='Fitting of the teacher (thousands of images)', type=float, default=64, show_default=True)
@click.option('--seed', help='Seed of every arm', type=int, default=0, show_default=True)
def toy(workdir, variant, steps, batch, lr, num, fit_kimg, seed):
    """KD student (task only / +KD / +KD with feature normalisation) vs the same architecture from scratch."""
    import toy as toy_cli
    from torch_utils import persistence
    from training.toy import GMMDenoiser
    torch.set_num_threads(1)
    problem = os.path.join(workdir, 'problem')
    problem_kwargs = dict(img_resolution=8, img_channels=3, num_components=10, seed=0)
    if not os.path.isfile(os.path.join(problem, 'teacher-unet.pkl')):
        t0 = time.time()
        toy_cli.build(problem, dict(problem_kwargs), num_images=10000, fit_kimg=fit_kimg,
                      fit_kwargs=dict(batch_size=128, lr=2e-3, p_uncond=0.1),
                      net_kwargs=dict(model_type='SongUNet', model_channels=32, channel_mult=[1, 2, 2], num_blocks=2,
                                      attn_resolutions=[], dropout=0), log=click.echo)
        click.echo(f'problem built in {time.time() - t0:.0f} s')
    teacher = persistence.load_network_pkl(os.path.join(problem, 'teacher-unet.pkl')).eval()
    gmm = GMMDenoiser(**problem_kwargs, label_dim=problem_kwargs['num_components'])
    student_config = kd.student_config(teacher, variant)
    results = dict(teacher=dict(params=num_params(teacher), **evaluate(teacher, problem, num, gmm)))
    copy = kd.make_student(teacher, variant).eval()
    results['copy, no training'] = dict(params=num_params(copy), **evaluate(copy, problem, num, gmm))

    common = dict(optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=lr), ema_halflife_kimg=1, lr_rampup_kimg=0)
    network_kwargs = {k: v for k, v in student_config.items() if k not in ('img_resolution', 'img_channels', 'label_dim')}
    arms = {
        'scratch (EDM loss)': dict(class_name='training.teacher.EDM', network_kwargs=network_kwargs,
                                   loss_kwargs=dict(class_name='training.loss.EDMLoss'), **common),
        'copy + task only': dict(class_name='training.distill.kd.KD', variant=variant, lambda_out=0, lambda_feat=0, **common),
        'copy + KD (out 1, feat 1)': dict(class_name='training.distill.kd.KD', variant=variant, **common),
        'copy + KD, feat norm': dict(class_name='training.distill.kd.KD', variant=variant, feat_norm=True, **common),
    }
    for i, (name, method_kwargs) in enumerate(arms.items()):
        t0 = time.time()
        net = run_arm(os.path.join(workdir, f'arm{i}'), problem, method_kwargs, steps, batch, seed)
        seconds = time.time() - t0
        results[name] = dict(params=num_params(net), train_seconds=round(seconds, 1), **evaluate(net, problem, num, gmm))
        click.echo(f'{name}: {seconds:.0f} s', err=True)

    click.echo(f'variant {variant}, {steps} steps x batch {batch}, lr {lr}, {num} Heun-18 samples per network')
    click.echo(f'{"":28s}{"params":>9s}{"RMS vs D*":>11s}{"FD":>9s}{"mode TV":>9s}{"precision":>10s}')
    for name, r in results.items():
        click.echo(f'{name:28s}{r["params"]:9d}{r["rms"]:11.4f}{r["fd"]:9.4f}{r["mode_tv"]:9.4f}{r["precision"]:10.4f}')
    click.echo(f'exact sampler at the same count: FD {results["teacher"]["floor_fd"]:.4f}')
    dnnlib.util.atomic_write(os.path.join(workdir, 'results.json'), lambda f: f.write(json.dumps(results, indent=2)), mode='w')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    cli()
