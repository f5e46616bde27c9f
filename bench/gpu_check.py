"""One command that runs every CUDA path of the project and prints one table; exits non-zero on any failure.

    python bench/gpu_check.py                               # a CUDA machine: the official network configurations
    python bench/gpu_check.py --device=cpu --tiny           # the same checks on tiny networks (tests/test_precision.py)

Part 1, in one process (on the CPU: one per configuration, beside part 2), for each method (edm, dmd with pairs
and LPIPS, dmd with the GAN head, disback through its stage switch, pd across a round boundary, guided, kd, sid with
SiDA's GAN term, sid-disback through its stage switch), each configuration (CIFAR-10 DDPM++ cond 32x32; ImageNet-64 ADM cond with use_fp16=True) and each
precision (fp32, bf16, fp16): a few training steps with images/s, peak GPU memory, host syncs (CUDA's sync debug
mode) and host-to-device copies inside the steps, and the first step's gradient difference from fp32 (relative L2 over every updated network,
same weights, same random streams, nothing applied).
Part 1 runs under train.py's default TF32 and cuDNN benchmark settings, with the official dropout.
Part 2, the command lines: `torchrun --nproc_per_node=1 train.py --method=dmd` (pairs, LPIPS, GAN head) stopped by
SIGTERM and resumed (equal to an uninterrupted run: bitwise on the CPU and under --deterministic), the same with 2
processes when two GPUs exist (equal to 1 process), then generate.py and fid.py (pixel detector) on the result,
generate.py against the API on a use_fp16 network, and with two GPUs an error injected on one of 2 processes.
Part 3 (CUDA only): DMD step time and peak memory at the official per-GPU batches (ImageNet-64 35, CIFAR-10 49) in bf16, fp32 and fp32 with TF32, and generate.py's images/s for a one-step student
against a raw forward pass of the same network.

The networks are randomly initialised (no weights can be downloaded); speed and memory do not depend on the values.
"""

import contextlib
import copy
import io
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import click
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench_networks import randomize_weights_  # noqa: E402
from sync_counter import HostCopyCounter, SyncCounter  # noqa: E402
from dataset_tool import save_dataset  # noqa: E402
from torch_utils import training_stats  # noqa: E402
from training import networks, optim  # noqa: E402
from training.batching import Round, StepRandom  # noqa: E402
from training.dataset import ImageFolderDataset, check_network_matches  # noqa: E402
from training.distill import kd  # noqa: E402
import train  # noqa: E402 (its option defaults: the backend settings part 1 measures under)

PRECISIONS = ['fp32', 'bf16', 'fp16']
TRAIN_DEFAULTS = {p.name: p.default for p in train.main.params}
METHODS = ['edm', 'dmd', 'dmd-gan', 'disback', 'pd', 'guided', 'kd', 'sid', 'sid-disback']
GRAD_TOL = dict(fp32=0, bf16=0.15, fp16=0.05)  # relative L2 error of the first step's gradient against fp32

# The official configurations, dropout included: a step's dropout masks are keyed by sample (the same in every
# precision), so the first-step gradients of two precisions still differ by precision alone.
CONFIGS = dict(cifar10=kd.TEACHER_CONFIGS['cifar10'], imagenet64=kd.TEACHER_CONFIGS['imagenet64'])
# The same architectures shrunk for the CPU (16x16: the GAN head needs an 8x8 bottleneck). Only sizes change: the
# label counts stay, so the data written for either is related to its networks as in the official rows.
SHRINK = dict(img_resolution=16, model_channels=8, num_blocks=2, attn_resolutions=[8])
TINY = dict(cifar10=dict(CONFIGS['cifar10'], **SHRINK, channel_mult=[1, 1]),
            imagenet64=dict(CONFIGS['imagenet64'], **SHRINK, channel_mult=[1, 2]))

# ----------------------------------------------------------------------------
# Inputs: a teacher per configuration, labelled images, regression pairs, LPIPS weight files in the official formats.

def make_network(config, seed, **overrides):
    """A randomly initialised network (a copy: each is made once, which takes seconds at ImageNet-64's size)."""
    key = json.dumps([config, seed, overrides], sort_keys=True)
    if key not in _networks:
        torch.manual_seed(seed)
        kwargs = dict(config, **overrides)
        cls = getattr(networks, kwargs.pop('class_name').rsplit('.', 1)[1])
        with torch.no_grad():
            _networks[key] = randomize_weights_(cls(**kwargs), seed).eval().requires_grad_(False)
    return copy.deepcopy(_networks[key])


_networks = {}


def write_inputs(workdir, name, config, device, num_images=64):
    import pickle
    paths = dict(teacher=os.path.join(workdir, f'{name}-teacher.pkl'), data=os.path.join(workdir, f'{name}-data.zip'),
                 pairs=os.path.join(workdir, f'{name}-pairs'))
    with open(paths['teacher'], 'wb') as f:
        pickle.dump(dict(ema=make_network(config, 0)), f)
    rng = np.random.default_rng(0)
    res = config['img_resolution']
    save_dataset(paths['data'], [rng.integers(0, 256, [res, res, 3], dtype=np.uint8) for _ in range(num_images)],
                 class_labels(num_images, config['label_dim']))
    check_network_matches(make_network(config, 0), ImageFolderDataset(path=paths['data'], use_labels=True), 'fix write_inputs')
    import make_pairs  # its command line, in this process
    make_pairs.main([f'--teacher={paths["teacher"]}', '--seeds=0-15', '--shard-size=16', '--steps=2',
                     f'--outdir={paths["pairs"]}', f'--device={device.type}'], standalone_mode=False)
    return paths


def class_labels(num_images, label_dim):
    """The images' classes, spread from 0 to label_dim - 1 (both present), so that the data's label count (its
    largest class + 1) is the network's whether there are more images than classes or fewer."""
    return [i * (label_dim - 1) // (num_images - 1) for i in range(num_images)]


def write_lpips_weights(workdir):
    from training.distances import _LIN_CHANNELS, _VGG16_CONVS
    g = torch.Generator().manual_seed(0)
    vgg = {}
    for _name, index, c_in, c_out in _VGG16_CONVS:
        vgg[f'features.{index}.weight'] = torch.randn([c_out, c_in, 3, 3], generator=g) * (2 / (9 * c_in)) ** 0.5
        vgg[f'features.{index}.bias'] = torch.zeros([c_out])
    lin = {f'lin{k}.model.1.weight': torch.rand([1, c, 1, 1], generator=g) for k, c in enumerate(_LIN_CHANNELS)}
    paths = dict(vgg=os.path.join(workdir, 'vgg16.pth'), lin=os.path.join(workdir, 'vgg.pth'))
    torch.save(vgg, paths['vgg'])
    torch.save(lin, paths['lin'])
    return paths

# ----------------------------------------------------------------------------
# Part 1: every method, configuration and precision in one process.

def training_backends(tf32=None):
    """TF32 and cuDNN benchmarking as a train.py run sets them by default (tf32: as --tf32 would, for part 3)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = TRAIN_DEFAULTS['tf32'] if tf32 is None else tf32
    torch.backends.cudnn.benchmark = TRAIN_DEFAULTS['bench']


def build_method(method, config, paths, lpips, device, batch, workdir, lpips_resolution):
    from training.distill.disback import DisBack, SiDDisBack
    from training.distill.dmd import DMD
    from training.distill.guided import GuidedDistillation
    from training.distill.progressive import ProgressiveDistillation
    from training.teacher import EDM
    dataset = ImageFolderDataset(path=paths['data'], use_labels=True)
    teacher = make_network(config, 0).to(device)
    torch.manual_seed(0)  # whatever a method initialises at random (EDM's network, the GAN head) is the same in every cell
    adam = dict(class_name='torch.optim.Adam', lr=1e-5)
    augment = dict(class_name='training.augment.AugmentPipe', p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                   aniso=1, translate_frac=1) if config.get('augment_dim') else None  # EDM's CIFAR-10 setting
    if method == 'edm':
        network_kwargs = {k: v for k, v in config.items() if k not in ('img_resolution', 'img_channels', 'label_dim')}
        return EDM(device, dataset, batch, network_kwargs=network_kwargs, loss_kwargs=dict(class_name='training.loss.EDMLoss'),
                   optimizer_kwargs=adam, augment_kwargs=augment, lr_rampup_kimg=0)
    if method in ('dmd', 'dmd-gan'):
        dmd = DMD(teacher, device, batch, pairs=paths['pairs'], reg_loss='lpips', reg_kwargs=dict(lpips, resolution=lpips_resolution)) \
            if method == 'dmd' else DMD(teacher, device, batch, dataset=dataset, gan_g_weight=3e-3, fake_steps=2)
        randomize_weights_(dmd.fake, 1)  # a fake score unlike the teacher, so that the first DM gradient is not zero
        return dmd
    if method in ('disback', 'sid-disback'):  # stage 1 (2 updates) here, as it reads the device at its end; measured:
        cls = DisBack if method == 'disback' else SiDDisBack  # stage 2 on the recorded path, a switch every G step
        path = tempfile.mkdtemp(dir=workdir)
        stage1 = cls(teacher, device, batch, run_dir=path, path_nodes=2, path_steps=2)
        for step in range(2):
            stage1.step(rounds_for(step, dataset, batch, device), step * batch)
        method = cls(teacher, device, batch, path=path, switch_every=1)
        randomize_weights_(method.fake, 1)  # s'_2 is about s'_1 (a tiny stage 1): a first gradient far from zero
        return method
    if method == 'pd':  # two updates per round: step 3 is in the second round
        return ProgressiveDistillation(teacher, device, batch, dataset, start_steps=8, end_steps=2,
                                       round_kimg=2 * batch / 1000, final_round_kimg=2 * batch / 1000,
                                       optimizer_kwargs=adam, max_grad_norm=1.0)
    if method == 'guided':
        guide = make_network(config, 1, label_dim=0).to(device)  # an unconditional model as D_u
        return GuidedDistillation(teacher, device, batch, dataset, guide=guide, optimizer_kwargs=adam)
    if method == 'kd':
        return kd.KD(device, batch, teacher, dataset, optimizer_kwargs=adam, augment_kwargs=augment)
    if method == 'sid':  # SiDA: the GAN term too (the SiD loss backpropagates through both score networks)
        from training.distill.sid import SiD
        sid = SiD(teacher, device, batch, dataset=dataset, sida=True, g_start_kimg=-1, gan_start_kimg=-1)  # G and GAN from step 0
        randomize_weights_(sid.fake, 1)  # a fake score unlike the teacher, so that the first gradient is not zero
        return sid
    raise ValueError(method)


def rounds_for(step, dataset, batch, device):
    """One rank's round of `batch` images, as the training loop makes it (positions step*batch ...)."""
    idx = [(step * batch + i) % len(dataset) for i in range(batch)]
    images = torch.stack([torch.from_numpy(dataset[i][0]) for i in idx]).to(device).to(torch.float32) / 127.5 - 1
    labels = torch.stack([torch.from_numpy(dataset[i][1]) for i in idx]).to(device)
    return [Round(images, labels, StepRandom(0, step, batch, device), 0, batch)]


def first_step_gradients(method, rounds, reference=None):
    """One step of a copy of `method` without applying it: {updater name: its unscaled gradient}. An fp16 step
    whose gradient overflows is tried again on a fresh copy at half the loss scale, as the dynamic scaler would;
    given the fp32 gradients, the first try starts where they fit in fp16 with a factor 2 to spare (SiD's first G
    gradient reaches about 1e3: 13 tries from 2^16 otherwise, 6 s of the CPU rehearsal)."""
    grads, overflow = {}, set()
    halvings = {name: max(0, math.ceil(math.log2(2 * g.abs().max().item()))) for name, g in (reference or {}).items()
                if g.abs().max() > 0}
    real_backward, real_step = optim.Updater.backward, optim.Updater.step

    def backward(self, *args):
        if self.scaler is not None:
            self.scaler.scale = self.scaler.scale / 2 ** halvings.get(self.name, 0)
        return real_backward(self, *args)

    def capture(self, lr):
        flat = self.flat / (self.scaler.scale if self.scaler is not None else 1)
        if not torch.isfinite(flat).all():
            overflow.add(self.name)
        grads[self.name] = flat.cpu()  # not kept on the GPU: the cell's peak memory is the training steps' alone
        for p in self.params:
            p.grad = None
        self.flat = None

    optim.Updater.backward, optim.Updater.step = backward, capture
    try:
        for _ in range(16):
            overflow.clear()
            copy.deepcopy(method).step(rounds, 0)
            if not overflow:
                return grads
            for name in overflow:
                halvings[name] = halvings.get(name, 0) + 1
        raise FloatingPointError('the gradient stayed non-finite at 16 halvings of the loss scale')
    finally:
        optim.Updater.backward, optim.Updater.step = real_backward, real_step


def check_cell(method_name, config_name, precision, ctx, reference):
    """One row of the table: a few steps of one method in one precision."""
    device, batch, steps = ctx['device'], ctx['batch'], ctx['steps']
    row = dict(part='1', method=method_name, config=config_name, precision=precision)
    config = ctx['configs'][config_name]
    with networks.backbone_precision(precision), optim.loss_scaling('dynamic' if precision == 'fp16' else None):
        method = build_method(method_name, config, ctx['inputs'][config_name], ctx['lpips'], device, batch, ctx['workdir'],
                              ctx['lpips_resolution'])
        dataset = ImageFolderDataset(path=ctx['inputs'][config_name]['data'], use_labels=True)
        grads = first_step_gradients(method, rounds_for(0, dataset, batch, device),
                                     reference.get((method_name, config_name)) if precision == 'fp16' else None)
        if precision == 'fp32':
            reference[(method_name, config_name)] = grads
        ref = reference[(method_name, config_name)]
        diff = max(((grads[k].double() - ref[k].double()).norm() / ref[k].double().norm().clamp(min=1e-30)).item()
                   for k in ref)
        row['grad_diff'] = diff
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        training_stats.collect(device)  # drop what the gradient capture reported
        syncs, copies = [], []
        start = None
        for step in range(steps):
            rounds = rounds_for(step, dataset, batch, device)
            if step == 1:  # the first step warms up kernels and allocators: time the rest
                if device.type == 'cuda':
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
            # The copy counter sees every torch call (Python overhead): on CUDA it runs in the untimed first step
            # only; later steps' pageable copies wait for the stream, which the sync counter reports.
            counted = step == 0 or device.type == 'cpu'
            copy_counter = HostCopyCounter(device) if counted else contextlib.nullcontext()
            with SyncCounter(device) as counter, copy_counter:
                method.step(rounds, step * batch)
            syncs.append(counter.count)
            copies.append(copy_counter.count if counted else 0)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        row['img_per_s'] = (steps - 1) * batch / (time.perf_counter() - start)
        row['peak_gib'] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None
        row['syncs'] = max(syncs[1:])
        row['h2d'] = max(copies)  # host-to-device copies: none in any step counted, the first included
        stats = training_stats.collect(device)
        nonfinite = sum(v.get('nonfinite', 0) for k, v in stats.items() if k.startswith('Loss/'))
        finite = all(torch.isfinite(p).all() for net in method.networks().values() for p in net.parameters())
        extra = ''
        if method_name in ('disback', 'sid-disback') and not method.switches:
            extra = 'no stage-2 switch'
        if method_name == 'pd' and method.round < 1:
            extra = 'no round boundary'
    ok = finite and nonfinite == 0 and diff <= GRAD_TOL[precision] and row['syncs'] == 0 and row['h2d'] == 0 and not extra
    row['result'] = 'pass' if ok else 'FAIL' + (f' ({extra})' if extra else '')
    return row


def check_config(config_name, methods, ctx):
    """Part 1's rows of one configuration (fp32 first: the other precisions' gradients are compared with it)."""
    rows, reference = [], {}
    for method in methods:
        for precision in PRECISIONS:
            try:
                rows.append(check_cell(method, config_name, precision, ctx, reference))
            except Exception as e:  # one failing cell must not hide the others: it becomes a FAIL row
                rows.append(fail_row(e, part='1', method=method, config=config_name, precision=precision))
                reference.setdefault((method, config_name), None)
    return rows


def fail_row(e, **row):
    return dict(row, result=f'FAIL ({type(e).__name__}: {str(e).splitlines()[0][:80]})')


# ----------------------------------------------------------------------------
# Part 2: the command lines under torchrun.

def run(cmd, timeout=600, env=None, expect=0):
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != expect:
        raise RuntimeError(f'{" ".join(cmd[:4])} ... exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}')
    return p


def torchrun(nproc, *args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *args]


def train_args(ctx, outdir):
    """train.py's DMD command line of part 2 (pairs, LPIPS, GAN head); the global batch is the same for 1 and 2
    processes. Under --deterministic where train.py has it (CUDA: bitwise resume)."""
    device, paths, batch = ctx['device'], ctx['inputs']['cifar10'], ctx['batch'] * 2
    # LPIPS runs at 224 pixels: the CPU rehearsal regresses with L2 here (part 1 covers LPIPS at a small size).
    reg = [f'--lpips-vgg={ctx["lpips"]["vgg"]}', f'--lpips-lin={ctx["lpips"]["lin"]}'] if ctx['lpips_resolution'] == 224 else ['--reg-loss=l2']
    det = [] if device.type == 'cpu' or 'deterministic' not in TRAIN_DEFAULTS else ['--deterministic=1']
    return ['train.py', '--method=dmd', f'--teacher={paths["teacher"]}', f'--data={paths["data"]}', '--cond=1',
            f'--pairs={paths["pairs"]}', *reg, *det, '--gan-g=3e-3', f'--batch={batch}', f'--tick={batch / 1000}', '--snap=2',
            '--dump=1', '--seed=1', f'--device={device.type}', f'--outdir={outdir}', '--nosubdir',
            f'--duration={CLI_STEPS * batch / 1e6}', '--workers=0']


CLI_STEPS = 6


def final_state(run_dir):
    return torch.load(max((os.path.join(run_dir, n) for n in os.listdir(run_dir) if re.fullmatch(r'training-state-\d+\.pt', n)),
                          key=os.path.getmtime), map_location='cpu', weights_only=True)


def check_cli(ctx, nproc):
    """DMD under torchrun: run, SIGTERM after the first state, resume to the end."""
    outdir = os.path.join(ctx['workdir'], f'cli-{nproc}')
    args = train_args(ctx, outdir)
    row = dict(part='2', method=f'train.py dmd x{nproc}', config='cifar10', precision='default')
    start = time.perf_counter()
    proc = subprocess.Popen(torchrun(nproc, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(outdir, 'training-state-000000.pt')) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    stopped = 'resume with --resume' in out
    run(torchrun(nproc, *args, f'--resume={outdir}'))
    row['img_per_s'] = CLI_STEPS * ctx['batch'] * 2 / (time.perf_counter() - start)
    state = final_state(outdir)
    row['result'] = 'pass' if stopped and state['method']['num_steps'] == CLI_STEPS else f'FAIL (stopped={stopped})'
    row['options'] = json.load(open(os.path.join(outdir, 'training_options.json')))
    row['precision'] = row['options']['precision']
    return row, outdir, state


def check_resume_exact(ctx, resumed):
    """The stopped and resumed 1-process run against an uninterrupted one: bitwise on the CPU and under
    --deterministic; else (CUDA's non-deterministic kernels) within the 1-vs-2-process tolerance."""
    outdir = os.path.join(ctx['workdir'], 'cli-uninterrupted')
    args = train_args(ctx, outdir)
    run(torchrun(1, *args))
    full = final_state(outdir)['method']['G']
    bitwise = ctx['device'].type == 'cpu' or '--deterministic=1' in args
    diff = relative_diff(resumed['method']['G'], full)
    ok = all(torch.equal(resumed['method']['G'][k], full[k]) for k in full) if bitwise else diff < 1e-4
    return dict(part='2', method='resumed vs uninterrupted, G' + (' (bitwise)' if bitwise else ''), config='cifar10',
                precision='default', grad_diff=diff, result='pass' if ok else 'FAIL')


def relative_diff(a, b):
    """Relative L2 distance over all of a state dict's tensors."""
    a, b = (torch.cat([v.double().flatten() for v in s.values()]) for s in (a, b))
    return ((a - b).norm() / b.norm()).item()


def check_error_injection(ctx):
    """2 processes, an error on one rank (a CUDA OOM in rank 1's third step; a full disk in rank 0's state write):
    the whole job ends within 60 s (not at the collective timeout), exit code 1, train.py's one-line error."""
    rows = []
    for rank, at in [(1, 'step'), (0, 'state')]:
        outdir = os.path.join(ctx['workdir'], f'inject-{at}')
        args = ['bench/inject_error.py', *train_args(ctx, outdir)[1:]]
        env = dict(os.environ, INJECT_RANK=str(rank), INJECT_AT=at, EDM_DISTILL_TIMEOUT_MIN='5')
        start = time.perf_counter()
        try:
            p = subprocess.run(torchrun(2, *args), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
            code, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            code, out = None, ''
        sec = time.perf_counter() - start
        one_line = any(line.startswith('Error: ') and '(injected)' in line for line in out.splitlines())
        ok = code == 1 and one_line and sec < 60
        rows.append(dict(part='2', method=f'x2, error on rank {rank} ({at})', config='cifar10', precision='default',
                         result='pass' if ok else f'FAIL (exit {code}, {sec:.0f} s, one line {one_line})'))
    return rows


def check_generate_fid(ctx, run_dir):
    """generate.py, fid.py ref and fid.py calc (their command lines, in this process) on the last snapshot, with the
    pixel detector."""
    import fid
    import generate
    device = ctx['device']
    snap = max(n for n in os.listdir(run_dir) if n.startswith('network-snapshot'))
    images = os.path.join(ctx['workdir'], 'images')
    generate.main([f'--network={os.path.join(run_dir, snap)}', f'--outdir={images}', '--seeds=0-63', f'--device={device.type}'],
                  standalone_mode=False)
    ref = os.path.join(ctx['workdir'], 'ref.npz')
    fid.main(['ref', f'--data={ctx["inputs"]["cifar10"]["data"]}', f'--dest={ref}', '--detector=pixels'], standalone_mode=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fid.main(['calc', f'--images={images}', f'--ref={ref}', '--num-images=64', '--detector=pixels'], standalone_mode=False)
    value = re.findall(r'([0-9.]+(?:e[+-]?\d+)?)\s*$', out.getvalue().strip())
    ok = len([n for n in os.listdir(images) if n.endswith('.png')]) == 64 and value and np.isfinite(float(value[-1]))
    return dict(part='2', method='generate.py + fid.py', config='cifar10', precision='auto', result='pass' if ok else 'FAIL')

def check_generate_use_fp16(ctx):
    """generate.py (its command line in this process) and generate.generate_batch sample a use_fp16 network (the
    ImageNet-64 teacher) alike: identical images (EDM's rule, one code path: fp16 autocast on CUDA, fp32 on the CPU)."""
    import generate
    import PIL.Image
    device, pkl = ctx['device'], ctx['inputs']['imagenet64']['teacher']
    images = os.path.join(ctx['workdir'], 'images-use-fp16')
    generate.main([f'--network={pkl}', f'--outdir={images}', '--seeds=0-3', '--steps=2', f'--device={device.type}'],
                  standalone_mode=False)
    cli = np.stack([np.asarray(PIL.Image.open(generate.image_path(images, s))).transpose(2, 0, 1) for s in range(4)])
    net = generate.load_network(pkl, device)
    api = generate.generate_batch(net, list(range(4)), device, num_steps=2).numpy()
    ok = net.use_fp16 and np.array_equal(cli, api)
    return dict(part='2', method='generate.py = API, use_fp16', config='imagenet64', precision='auto',
                result='pass' if ok else 'FAIL')

# ----------------------------------------------------------------------------
# Part 3 (CUDA): DMD at the official per-GPU batches, and one-step sampling speed.

def dmd_speed(ctx, config_name, batch, precision, tf32, steps=6):
    from training.distill.dmd import DMD
    device = ctx['device']
    training_backends(tf32)
    try:
        with networks.backbone_precision(precision):
            teacher = make_network(CONFIGS[config_name], 0).to(device)
            method = DMD(teacher, device, batch)
            torch.cuda.reset_peak_memory_stats(device)
            for step in range(steps):
                if step == 1:
                    torch.cuda.synchronize(device)
                    start = time.perf_counter()
                method.step([Round(None, None, StepRandom(0, step, batch, device), 0, batch)], step * batch)
            torch.cuda.synchronize(device)
            sec = (time.perf_counter() - start) / (steps - 1)
        training_stats.collect(device)
        return dict(part='3', method=f'dmd step, batch {batch}', config=config_name,
                    precision=precision + ('+tf32' if tf32 else ''), img_per_s=batch / sec,
                    peak_gib=torch.cuda.max_memory_allocated(device) / 2**30, result='pass', sec_per_step=sec)
    finally:
        training_backends()


def sampling_speed(ctx, batch=256, reps=5):
    import generate
    device = ctx['device']
    net = make_network(CONFIGS['cifar10'], 0, use_fp16=True).to(device)  # EDM's rule: fp16 on CUDA, as generate.py
    net.sampling_spec = dict(solver='euler', grid='nested', num_steps=1, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    z = torch.randn([batch, 3, 32, 32], device=device)
    c = torch.eye(10, device=device)[torch.arange(batch, device=device) % 10]
    rates = {}
    for name, fn in [('raw forward', lambda: net(z * 80, torch.full([batch], 80.0, device=device), c)),
                     ('generate.py batch', lambda: generate.generate_batch(net, list(range(batch)), device))]:
        with torch.no_grad():
            fn()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            torch.cuda.synchronize(device)
        rates[name] = batch * reps / (time.perf_counter() - start)
    return [dict(part='3', method=f'one-step sampling: {k}', config='cifar10', precision='auto (use_fp16)', img_per_s=v,
                 result='pass') for k, v in rates.items()]

# ----------------------------------------------------------------------------

def print_table(rows):
    head = ['part', 'method', 'config', 'precision', 'img/s', 'peak GiB', 'grad diff', 'syncs', 'h2d', 'result']
    fmt = lambda v, f: '-' if v is None else f.format(v)
    lines = [[r['part'], r['method'], r['config'], r['precision'], fmt(r.get('img_per_s'), '{:.1f}'),
              fmt(r.get('peak_gib'), '{:.2f}'), fmt(r.get('grad_diff'), '{:.2e}'), fmt(r.get('syncs'), '{}'), fmt(r.get('h2d'), '{}'), r['result']]
             for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    for line in [head, ['-' * w for w in widths], *lines]:
        print('  '.join(str(x).ljust(w) for x, w in zip(line, widths)), flush=True)


def check_command_lines(ctx):
    """Part 2's rows: train.py with 1 (and 2) processes, their agreement, generate.py and fid.py on the result."""
    device, rows, states = ctx['device'], [], {}
    for nproc in [1, 2] if device.type == 'cpu' or torch.cuda.device_count() >= 2 else [1]:
        try:
            row, run_dir, states[nproc] = check_cli(ctx, nproc)
            rows.append(row)
        except Exception as e:
            rows.append(fail_row(e, part='2', method=f'train.py dmd x{nproc}', config='cifar10', precision='default'))
    if 1 in states:
        try:
            rows.append(check_resume_exact(ctx, states[1]))
        except Exception as e:
            rows.append(fail_row(e, part='2', method='resumed vs uninterrupted, G', config='cifar10', precision='default'))
    if len(states) == 2:  # world-size invariance: the same weights from 1 and 2 processes
        # all of G: a single small bias can differ more (Adam's sign-like steps)
        diff = relative_diff(states[2]['method']['G'], states[1]['method']['G'])
        rows.append(dict(part='2', method='1 vs 2 processes, G', config='cifar10', precision='default', grad_diff=diff,
                         result='pass' if diff < 1e-4 else 'FAIL'))
    if 1 in states:
        try:
            rows.append(check_generate_fid(ctx, os.path.join(ctx['workdir'], 'cli-1')))
        except Exception as e:
            rows.append(fail_row(e, part='2', method='generate.py + fid.py', config='cifar10', precision='auto'))
    try:
        rows.append(check_generate_use_fp16(ctx))
    except Exception as e:
        rows.append(fail_row(e, part='2', method='generate.py = API, use_fp16', config='imagenet64', precision='auto'))
    if ctx['inject']:
        rows += check_error_injection(ctx)
    return rows


@click.command()
@click.option('--device', help='Device  [default: cuda]', type=click.Choice(['cpu', 'cuda']), default='cuda')
@click.option('--tiny', help='Tiny networks (the CPU rehearsal)', is_flag=True)
@click.option('--batch', help='Per-process batch of parts 1 and 2', metavar='INT', type=click.IntRange(min=2), default=8)
@click.option('--steps', help='Steps per cell of part 1 (the first is not timed)', metavar='INT', type=click.IntRange(min=3), default=4)
@click.option('--methods', help='Comma-separated subset of ' + ','.join(METHODS), metavar='LIST', type=str, default=','.join(METHODS))
@click.option('--workdir', help='Where to write the inputs and runs  [default: a temporary directory]', metavar='DIR', type=str)
@click.option('--json', 'json_path', help='Also write the rows as JSON here', metavar='PATH', type=str)
@click.option('--inject-errors', help='The 2-process error rows  [default: on CUDA with 2 GPUs]', metavar='BOOL', type=bool)
def main(device, tiny, batch, steps, methods, workdir, json_path, inject_errors):
    """Run every method, precision and command line once; print the table; exit 1 on any failure."""
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda, but CUDA is not available; use --device=cpu --tiny')
    device = torch.device(device)
    if tiny:  # tiny networks: threads only contend (also in the command lines it starts)
        torch.set_num_threads(1)
        os.environ['OMP_NUM_THREADS'] = '1'
    methods = [m.strip() for m in methods.split(',')]
    if any(m not in METHODS for m in methods):
        raise click.BadParameter(f'choose from {",".join(METHODS)}', param_hint='--methods')
    workdir = workdir or tempfile.mkdtemp(prefix='gpu-check-')
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    configs = TINY if tiny else CONFIGS
    print(f'gpu_check: {torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}, torch {torch.__version__}, '
          f'{"tiny" if tiny else "official"} configs, workdir {workdir}', flush=True)
    training_backends()  # part 1 measures what a train.py run executes
    if inject_errors is None:
        inject_errors = device.type == 'cuda' and torch.cuda.device_count() >= 2
    ctx = dict(device=device, batch=batch, steps=steps, workdir=workdir, configs=configs, lpips=write_lpips_weights(workdir),
               inject=inject_errors,
               lpips_resolution=16 if tiny else 224,
               inputs={name: write_inputs(workdir, name, config, device) for name, config in configs.items()})
    pool = None
    if device.type == 'cpu':  # the CPU rehearsal: part 1 in one process (one thread) per configuration, beside part 2
        pool = multiprocessing.get_context('fork').Pool(len(configs))
        pending = pool.starmap_async(check_config, [(name, methods, ctx) for name in configs])
    else:
        rows = [row for name in configs for row in check_config(name, methods, ctx)]
    t1 = time.perf_counter()
    rows2 = check_command_lines(ctx)
    t2 = time.perf_counter()
    if pool is not None:
        rows = [row for part in pending.get() for row in part]
        pool.close()
        pool.join()
    rows += rows2
    if device.type == 'cuda' and not tiny:
        for config_name, b in [('imagenet64', 35), ('cifar10', 49)]:
            for precision, tf32 in [('bf16', False), ('fp32', False), ('fp32', True)]:
                rows.append(dmd_speed(ctx, config_name, b, precision, tf32))
        rows += sampling_speed(ctx)
    rows = [{k: v for k, v in r.items() if k != 'options'} for r in rows]
    print_table(rows)
    print(f'Total time: {time.perf_counter() - t0:.0f} s (part 2 {t2 - t1:.0f} s' + (', beside part 1)' if pool else ')'), flush=True)
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(rows, f, indent=1)
    if any(r['result'] != 'pass' for r in rows):
        sys.exit(1)


if __name__ == '__main__':
    main()
