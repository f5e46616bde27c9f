"""Train EDM teachers and distill them into fast generators: `python train.py --method=edm|dmd|... [options]`.

One process (CPU or one GPU) or `torchrun --nproc_per_node=N train.py ...` (NCCL on CUDA, gloo on CPU).
Options are turned into one config dict `c` (the keywords of training_loop), printed by --dry-run and saved
as training_options.json in the run directory.
"""

import importlib
import json
import math
import os
import pickle
import re
import warnings

import click
import torch

import dnnlib
from torch_utils import distributed
from torch_utils import options
from training import phema, run_dir, training_loop

warnings.filterwarnings('ignore', 'Grad strides do not match bucket view strides')

# ----------------------------------------------------------------------------
# Helpers for the option parser.

def parse_phema(ctx, param, s):
    """--phema=0.050,0.100 -> [0.05, 0.1]: distinct relative EMA stds, each in (0, 0.2887)."""
    if s is None:
        return None
    try:
        stds = [float(x) for x in s.split(',')]
    except ValueError:
        raise click.BadParameter(f'"{s}" is not a list of numbers, e.g. 0.050,0.100', param_hint='--phema') from None
    for std in stds:
        try:
            phema.std_to_exp(std)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint='--phema') from None
    if len({f'{x:.3f}' for x in stds}) != len(stds):
        raise click.BadParameter(f'"{s}" repeats a std (to 3 decimals, as the snapshot names show them)', param_hint='--phema')
    return stds


def next_run_dir(outdir, desc):
    """outdir/{id:05d}-{desc} with id one past the largest existing one."""
    ids = [int(m.group(1)) for n in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.match(r'^(\d+)-', n)) is not None and os.path.isdir(os.path.join(outdir, n))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def resolve_precision(opts, device, resolution=None):
    """(precision, loss scaling, note for the log's first line or None) of the run: bf16 on CUDA for distillation
    (DMD2's choice) where the GPU has bf16 hardware, else fp16 (V100, T4: bf16 would be emulated), EDM's --fp16 for
    teachers, fp32 on the CPU; SiD's official precisions on CUDA (fp32 up to 32x32, fp16 from 64x64: `resolution`,
    of the data or the teacher; fp32 when unknown); fp16 scales its losses (dynamic, or EDM's static --ls)."""
    if opts.fp16 and opts.precision not in (None, 'fp16'):
        raise click.ClickException(f'--fp16=1 means --precision=fp16, but --precision={opts.precision}; drop one of them')
    cuda_default = 'bf16' if opts.method != 'edm' else 'fp32'
    if opts.method in ('sid', 'sid-disback'):
        cuda_default = 'fp16' if resolution is not None and resolution >= 64 else 'fp32'
    precision = opts.precision or ('fp16' if opts.fp16 else cuda_default if device.type == 'cuda' else 'fp32')
    note = None
    if precision == 'bf16' and opts.precision is None and not torch.cuda.is_bf16_supported(including_emulation=False):
        precision = 'fp16'
        note = (f'Precision: fp16 with loss scaling, not the default bf16: {torch.cuda.get_device_name(device)} has no '
                f'bf16 hardware (--precision=fp32 for full precision)')
    if opts.ls is not None and precision != 'fp16':
        raise click.ClickException(f'--ls is a static fp16 loss scale, but the run is {precision}; drop --ls or use --precision=fp16')
    if opts.tf32 and device.type != 'cuda':
        raise click.ClickException('--tf32 applies to CUDA only; drop it on the CPU')
    opts.precision = precision
    return precision, (None if precision != 'fp16' else opts.ls or 'dynamic'), note


def open_dataset(data, cond, xflip, cache, max_size=None):
    """Build the dataset keywords and check the data now, before any directory exists."""
    from training.dataset import ImageFolderDataset
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=data, use_labels=cond,
                             xflip=xflip, cache=cache, max_size=max_size)
    problem = None
    try:
        ds = ImageFolderDataset(**{k: v for k, v in kwargs.items() if k != 'class_name'})
        # Every image readable and of one shape, before any directory exists; each rank reads its share.
        ds.verify(distributed.get_rank(), distributed.get_world_size())
    except (IOError, OSError, ValueError) as e:
        problem = f'--data: {e}'
    problems = [p for p in distributed.all_gather_object(problem) if p is not None]
    if problems:  # every rank stops with the same line
        raise click.ClickException(problems[0])
    if cond and not ds.has_labels:
        raise click.ClickException(f'--cond=1 needs labels, but "{data}" has no dataset.json labels; use --cond=0')
    kwargs.resolution = ds.resolution
    kwargs.max_size = len(ds)  # be explicit, in case the dataset changes later
    return kwargs, ds

# ----------------------------------------------------------------------------
# Per-method setup: fill c.method_kwargs (and friends) from the options; return the run-dir description.

def setup_edm(opts, c, ds):
    if opts.arch not in ('ddpmpp', 'ncsnpp', 'adm'):
        raise click.BadParameter(f'--arch must be ddpmpp, ncsnpp or adm, not "{opts.arch}"')
    if opts.grad_clip is not None:
        raise click.ClickException('--method=edm does not clip gradients (as EDM); drop --grad-clip')
    net = dnnlib.EasyDict(model_channels=opts.cbase, channel_mult=opts.cres, dropout=opts.dropout,
                          use_fp16=opts.precision == 'fp16')  # stored as EDM does, for EDM tools that sample it
    if opts.arch == 'ddpmpp':
        net.update(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1, 1], model_channels=opts.cbase or 128,
                   channel_mult=net.channel_mult or [2, 2, 2])
    elif opts.arch == 'ncsnpp':
        net.update(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=opts.cbase or 128,
                   channel_mult=net.channel_mult or [2, 2, 2])
    else:
        net.update(model_type='DhariwalUNet', model_channels=opts.cbase or 192, channel_mult=net.channel_mult or [1, 2, 3, 4])
    precond = dict(vp=('VPPrecond', 'VPLoss'), ve=('VEPrecond', 'VELoss'), edm=('EDMPrecond', 'EDMLoss'))[opts.precond]
    net.class_name = f'training.networks.{precond[0]}'
    augment_kwargs = None
    if opts.augment:
        augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8, yflip=1,
                                         scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        net.augment_dim = 9
    c.method_kwargs = dnnlib.EasyDict(
        class_name='training.teacher.EDM',
        network_kwargs=net,
        loss_kwargs=dnnlib.EasyDict(class_name=f'training.loss.{precond[1]}'),
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr or 10e-4, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=augment_kwargs,
        ema_halflife_kimg=(opts.ema if opts.ema is not None else 0.5) * 1000,
        lr_rampup_kimg=opts.lr_rampup if opts.lr_rampup is not None else 10000,  # EDM: 10 Mimg
    )
    if opts.transfer is not None:
        c.transfer = opts.transfer
        c.method_kwargs.ema_rampup_ratio = None  # as EDM: the copied weights are not a fresh start
    return f'{ds.name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{opts.precond}'


def setup_dmd(opts, c, ds):
    if opts.teacher is None:
        raise click.ClickException('--method=dmd needs --teacher=PKL|URL (an EDM network pickle)')
    if opts.gan_g > 0 and ds is None:
        raise click.ClickException('--gan-g > 0 trains a GAN head on real images: pass --data=ZIP|DIR')
    reg_kwargs = dnnlib.EasyDict()  # LPIPS: the method upsamples to DMD's 224 by default
    if opts.reg_loss == 'lpips':
        if opts.lpips_vgg is not None:
            reg_kwargs.vgg = opts.lpips_vgg
        if opts.lpips_lin is not None:
            reg_kwargs.lin = opts.lpips_lin
    c.method_kwargs = dnnlib.EasyDict(
        class_name='training.distill.dmd.DMD',
        sigma_init=opts.sigma_init,                             # generator input noise level
        lr=opts.lr or 5e-5,                                     # generator learning rate
        fake_lr=opts.fake_lr,                                   # fake-score learning rate (None = lr)
        max_grad_norm=opts.grad_clip if opts.grad_clip is not None else 10,  # DMD: global norm 10
        lr_rampup_kimg=opts.lr_rampup or 0,                     # learning-rate warm-up (DMD2: see README)
        fake_steps=opts.fake_steps,                             # DMD2 two-time-scale rule
        fake_sigma=opts.fake_sigma,                             # fake-score noise levels: Karras grid or log-normal
        pairs=opts.pairs,                                       # regression pairs (make_pairs.py)
        reg_weight=opts.reg_weight,                             # regression loss weight
        reg_loss=opts.reg_loss,                                 # regression distance
        reg_kwargs=reg_kwargs,
        gan_g_weight=opts.gan_g,                                # DMD2 GAN head, generator weight (0 = off)
        gan_d_weight=opts.gan_d,                                # DMD2 GAN head, classifier weight
        ema_halflife_kimg=opts.ema * 1000 if opts.ema else None,  # DMD2's official code: no EMA
    )
    name = os.path.splitext(os.path.basename(opts.teacher.rstrip('/')))[0]
    return f'{name}{"-gan" if opts.gan_g > 0 else ""}{"-reg" if opts.pairs else ""}'


def setup_kd(opts, c, ds):
    from torch_utils import persistence
    from training.distill import kd
    if opts.teacher is None or ds is None:
        raise click.ClickException('--method=kd needs --teacher=PKL|URL (the network to compress) and --data=ZIP|DIR (its data)')
    if opts.transfer is not None:
        raise click.ClickException('--method=kd builds its student from --teacher; drop --transfer')
    if not (opts.dry_run and dnnlib.util.is_url(opts.teacher)):  # a dry run downloads nothing
        try:  # bad variant/teacher combinations fail here, before any directory exists
            teacher = persistence.load_network_pkl(opts.teacher, allow_code=opts.trust_pickle)
            kd.student_config(teacher, opts.kd_variant, opts.num_blocks)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--teacher: {e}')
        if (teacher.img_resolution, teacher.img_channels, teacher.label_dim) != (ds.resolution, ds.num_channels, ds.label_dim):
            raise click.ClickException(f'--teacher is {teacher.img_resolution}x{teacher.img_resolution}x{teacher.img_channels} with '
                                       f'{teacher.label_dim} labels, --data {ds.resolution}x{ds.resolution}x{ds.num_channels} '
                                       f'with {ds.label_dim} labels; pick matching ones (--cond)')
    augment_kwargs = None
    if opts.augment:  # the KD method uses it only if the teacher takes augment labels
        augment_kwargs = dnnlib.EasyDict(class_name='training.augment.AugmentPipe', p=opts.augment, xflip=1e8, yflip=1,
                                         scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    c.method_kwargs = dnnlib.EasyDict(
        class_name='training.distill.kd.KD',
        variant=opts.kd_variant,                                # student: base, small or tiny
        num_blocks=opts.num_blocks,                             # residual blocks per level (None = variant's)
        lambda_out=opts.kd_out,                                 # weight of L_outKD
        lambda_feat=opts.kd_feat,                               # weight of L_featKD
        feat_norm=opts.kd_feat_norm,                            # feature terms relative to the teacher's variance
        loss_kwargs=dnnlib.EasyDict(class_name='training.loss.EDMLoss'),  # L_task
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr or 1e-4, betas=[0.9, 0.999], eps=1e-8),
        augment_kwargs=augment_kwargs,                          # EDM's augmentation (if the teacher was trained with it)
        ema_halflife_kimg=(opts.ema if opts.ema is not None else 0.5) * 1000,
        lr_rampup_kimg=opts.lr_rampup or 0,                     # fine-tuning copied weights: no warm-up by default
        max_grad_norm=opts.grad_clip,                           # gradient clipping (BK-SDM: 1), None = off
    )
    name = os.path.splitext(os.path.basename(opts.teacher.rstrip('/')))[0]
    return f'{name}-{opts.kd_variant}{f"-k{opts.num_blocks}" if opts.num_blocks else ""}'


# Progressive distillation (--method=pd) and guided distillation stage one (--method=guided).

def _given(name):
    """Whether the user gave an option (its value may equal the default)."""
    return click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT


def _w_range(s):
    """'0,4' -> [0.0, 4.0]; None stays None."""
    if s is None:
        return None
    try:
        w = [float(v) for v in s.split(',')]
    except ValueError:
        w = []
    if len(w) != 2 or not 0 <= w[0] <= w[1]:
        raise click.BadParameter(f'"{s}" is not a guidance range MIN,MAX with 0 <= MIN <= MAX, e.g. 0,4', param_hint='--w-range')
    return w


def setup_pd(opts, c, ds):
    from training.distill.progressive import round_schedule
    if opts.teacher is None or ds is None:
        raise click.ClickException('--method=pd needs --teacher=PKL|URL and --data=ZIP|DIR (the images it noises)')
    round_kimg = opts.round_kimg if opts.round_kimg is not None else 50000 * opts.batch / 1000  # official: 50k updates
    final_kimg = opts.final_round_kimg if opts.final_round_kimg is not None else round_kimg  # official: every round
    if opts.lr_rampup is not None:
        raise click.ClickException('--method=pd has no lr warm-up (each round decays linearly from --lr to 0, as the '
                                   'official configs); drop --lr-rampup')
    try:
        schedule = round_schedule(opts.start_steps, opts.end_steps, round_kimg, final_kimg, opts.batch)
    except ValueError as e:
        raise click.ClickException(str(e))
    if _given('duration'):
        raise click.ClickException('--method=pd takes its duration from the rounds; drop --duration, use --round-kimg')
    total_nimg = sum(updates for _, updates in schedule) * opts.batch
    opts.duration = total_nimg / 1e6
    while opts.duration * 1000 * 1000 > total_nimg:  # float rounding must not add a step to the last round
        opts.duration = math.nextafter(opts.duration, 0)
    w_range = _w_range(opts.w_range)
    if not opts.dry_run:  # the teacher against the data, before any directory exists (a dry run may name URLs)
        from torch_utils import persistence
        from training.distill.progressive import check_teacher
        try:
            check_teacher(persistence.load_network_pkl(opts.teacher, allow_code=opts.trust_pickle), ds, w_range)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--teacher: {e}')
    c.method_kwargs = dnnlib.EasyDict(
        class_name='training.distill.progressive.ProgressiveDistillation',
        start_steps=opts.start_steps,                           # the first teacher's Euler steps
        end_steps=opts.end_steps,                               # the last student's steps
        round_kimg=round_kimg,                                  # length of a halving round
        final_round_kimg=final_kimg,                            # length of the rounds to 2 and 1 steps
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr or 5e-5, betas=[0.9, 0.999], eps=1e-8),
        max_grad_norm=opts.grad_clip if opts.grad_clip is not None else 1.0,  # official: global norm 1
        weight=opts.pd_weight,                                  # loss weight: truncated SNR (official) or EDM's
        ema_halflife_kimg=opts.ema * 1000 if opts.ema else None,  # paper: no EMA
        ema_teacher=opts.ema_teacher,                           # the EMA becomes the next teacher
        guidance_range=w_range,                                 # w carried through (a --method=guided teacher)
    )
    name = os.path.splitext(os.path.basename(opts.teacher.rstrip('/')))[0]
    return f'{name}-{opts.start_steps}to{opts.end_steps}{"-w" if opts.w_range else ""}'


def setup_guided(opts, c, ds):
    if opts.teacher is None or ds is None or not opts.cond:
        raise click.ClickException('--method=guided needs a class-conditional --teacher=PKL|URL and labelled '
                                   '--data=ZIP|DIR with --cond=1')
    if opts.dry_run:  # a dry run may name URLs: check only that local files exist
        if opts.guide != 'null' and not dnnlib.util.is_url(opts.guide) and not os.path.isfile(opts.guide):
            raise click.ClickException(f'--guide: no such file "{opts.guide}"')
    else:  # teacher and guide against the data, before any directory exists
        from torch_utils import persistence
        from training.distill import guided
        load = lambda path: persistence.load_network_pkl(path, allow_code=opts.trust_pickle)
        try:
            teacher = load(opts.teacher)
            guided.check_teacher(teacher, ds)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--teacher: {e}')
        try:
            if opts.guide == 'null':
                guided.check_null_guide(teacher)
            else:
                guided.check_guide(load(opts.guide), teacher)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--guide: {e}')
    if not _given('duration'):
        opts.duration = 20  # our default for this fine-tuning (Mimg), not a paper setting
    c.method_kwargs = dnnlib.EasyDict(
        class_name='training.distill.guided.GuidedDistillation',
        guide=opts.guide,                                       # null, or an unconditional / weaker network
        trust_pickle=opts.trust_pickle,                         # for the guide pickle
        guidance_range=_w_range(opts.w_range) or [0.0, 4.0],    # w ~ U[w_min, w_max]
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr or 1e-4, betas=[0.9, 0.999], eps=1e-8),
        lr_rampup_kimg=opts.lr_rampup or 0,                     # fine-tuning copied weights: no warm-up
        max_grad_norm=opts.grad_clip,                           # gradient clipping, None = off
        ema_halflife_kimg=(opts.ema if opts.ema is not None else 0.5) * 1000 or None,
    )
    name = os.path.splitext(os.path.basename(opts.teacher.rstrip('/')))[0]
    guide = 'null' if opts.guide == 'null' else os.path.splitext(os.path.basename(opts.guide.rstrip('/')))[0]
    return f'{name}-guide-{guide}'


def setup_disback(opts, c, ds, base=setup_dmd, class_name='training.distill.disback.DisBack'):
    from training.distill.disback import recorded_nodes
    if opts.teacher is None:
        raise click.ClickException(f'--method={opts.method} needs --teacher=PKL|URL (an EDM network pickle)')
    desc = base(opts, c, ds)  # DisBack is its base (DMD or SiD) with a moving target: the base's options and defaults apply
    c.method_kwargs.class_name = class_name
    given = lambda name: click.get_current_context().get_parameter_source(name) != click.core.ParameterSource.DEFAULT
    stage1 = ['stage1_kimg', 'path_nodes', 'stage1_lr', 'stage1_stop', 'stage1_window', 'stage1_tol', 'path_place']
    if opts.path is not None:
        if any(given(name) for name in stage1):
            raise click.ClickException(f'--path=DIR uses a recorded path (no stage 1): drop '
                                       f'{", ".join("--" + n.replace("_", "-") for n in stage1 if given(n))}')
        try:
            nodes = recorded_nodes(opts.path)
        except (OSError, ValueError) as e:
            raise click.ClickException(str(e))
        c.method_kwargs.path = opts.path                        # recorded path s'_0 ... s'_N: stage 2 only
    else:
        nodes = opts.path_nodes
        path_steps = max(round(opts.stage1_kimg * 1000 / opts.batch), 1)
        if opts.path_place == 'official':  # DisBack's scripts: a node every 100 stage-1 updates at the G lr
            nodes = _official_disback(opts, path_steps, given)
        if path_steps < nodes:
            raise click.ClickException(f'--stage1-kimg={opts.stage1_kimg} is {path_steps} steps of --batch={opts.batch}, '
                                       f'fewer than the {nodes} path intervals (--path-nodes); lengthen stage 1')
        c.method_kwargs.path_nodes = nodes                      # N: snapshots s'_0 = teacher, ..., s'_N
        c.method_kwargs.path_steps = path_steps                 # K1: stage-1 updates of the auxiliary score (the most, 'plateau')
        c.method_kwargs.path_place = 'even' if opts.path_place == 'official' else opts.path_place  # in updates, or by distance
        fake_lr = c.method_kwargs.fake_lr or c.method_kwargs.lr
        c.method_kwargs.stage1_lr = opts.stage1_lr or fake_lr / 10  # measured: at the fake lr the path is one jump
        if opts.path_place == 'official':
            c.method_kwargs.stage1_lr = c.method_kwargs.lr      # official: guidance_lr = generator_lr in stage 1
        c.method_kwargs.stage1_stop = opts.stage1_stop          # 'fixed' K1 updates, or 'plateau' of the probe loss
        c.method_kwargs.stage1_window = opts.stage1_window      # updates between probe checks (plateau windows)
        c.method_kwargs.stage1_tol = opts.stage1_tol            # 'plateau': least relative fall of the probe loss
    c.method_kwargs.switch_every = opts.switch_every            # K2: generator steps per path node (or window)
    if opts.path_place == 'official':  # official: the target moves every 1000 loop steps, i.e. fake-score updates
        c.method_kwargs.switch_every = max(1000 // c.method_kwargs.get('fake_steps', 1), 1)
    c.method_kwargs.switch_rule = opts.switch                   # 'every' K2 steps or 'converged'
    c.method_kwargs.switch_tol = opts.switch_tol                # 'converged': least relative fall of L_DM per window
    return f'{desc}-path{nodes}'


def _official_disback(opts, path_steps, given):
    """--path-place=official, DisBack's released schedule (SYZhang0805/DisBack: degradation script `--log_iters 100`,
    `--guidance_lr` = `--generator_lr`; main/train_sd.py moves the target one snapshot (100 updates) back every
    `--interval 1000` iterations): every 100th stage-1 update a node, stage-1 lr = the generator lr, the target moving
    every 1000 fake-score updates. Returns N; the options it sets may not be given."""
    clash = [n for n in ('path_nodes', 'stage1_lr', 'switch_every', 'stage1_stop', 'switch') if given(n)]
    if clash:
        raise click.ClickException(f'--path-place=official sets the path and its schedule as DisBack\'s scripts do; '
                                   f'drop {", ".join("--" + n.replace("_", "-") for n in clash)}')
    if path_steps < 100 or path_steps % 100:
        near = max(round(path_steps / 100), 1) * 100
        raise click.ClickException(f'--path-place=official takes a node every 100 stage-1 updates, but --stage1-kimg='
                                   f'{opts.stage1_kimg:g} is {path_steps} updates of --batch={opts.batch}; use '
                                   f'--stage1-kimg={near * opts.batch / 1000:g} ({near} updates)')
    return path_steps // 100


def setup_sid(opts, c, ds):
    if opts.teacher is None:
        raise click.ClickException('--method=sid needs --teacher=PKL|URL (an EDM network pickle)')
    if opts.gan_g > 0 and ds is None:
        raise click.ClickException('--gan-g > 0 (SiDA) trains its classifier on real images: pass --data=ZIP|DIR')
    for name in ('pairs', 'fake_steps'):
        if _given(name):
            raise click.ClickException(f'--{name.replace("_", "-")} is a DMD option: SiD has no regression loss and '
                                       f'updates both networks every step; drop it')
    c.method_kwargs = dnnlib.EasyDict(
        class_name='training.distill.sid.SiD',
        sigma_init=opts.sigma_init if _given('sigma_init') else 2.5,  # SiD's generator input noise level
        alpha=opts.alpha,                                       # loss weight alpha (paper 1.2; AFHQv2 and SiDA 1.0)
        t_max=opts.t_max,                                       # generator-loss noise levels t ~ U[0, t_max/1000]
        lr=opts.lr or 1e-5,                                     # generator learning rate
        fake_lr=opts.fake_lr,                                   # fake-score learning rate (None = lr)
        g_beta1=opts.g_beta1,                                   # generator Adam beta1 (fake score: 0)
        eps=1e-6 if opts.precision == 'fp16' else 1e-8,         # Adam eps, official per precision
        max_grad_norm=opts.grad_clip,                           # gradient clipping, None = off (SiD)
        lr_rampup_kimg=opts.lr_rampup or 0,                     # learning-rate warm-up
        fake_sigma=opts.fake_sigma if _given('fake_sigma') else 'lognormal',  # SiD: EDM's log-normal levels
        dropout=opts.dropout if _given('dropout') else None,   # G and f_psi dropout (None: the teacher's rate)
        augment_p=opts.augment if _given('augment') else None,  # fake-score augmentation (None: 0.12 if the teacher takes it)
        sida=opts.gan_g > 0,                                    # SiDA: encoder classifier and GAN term
        gan_g_weight=opts.gan_g or 0.01,                        # SiDA GAN weight (official 0.01 against SiD's 100)
        gan_d_weight=opts.gan_d if _given('gan_d') else 1.0,    # SiDA classifier weight (official 1)
        ema_halflife_kimg=(opts.ema if opts.ema is not None else 0.5) * 1000 or None,
    )
    name = os.path.splitext(os.path.basename(opts.teacher.rstrip('/')))[0]
    return f'{name}-a{opts.alpha:g}{"-sida" if opts.gan_g > 0 else ""}'


def setup_sid_disback(opts, c, ds):
    if opts.switch != 'every':
        raise click.ClickException('--switch=converged watches the generator loss fall, but SiD\'s loss is no measure of '
                                   'convergence; use --switch=every with --method=sid-disback')
    return setup_disback(opts, c, ds, base=setup_sid, class_name='training.distill.disback.SiDDisBack')


METHODS = {'edm': setup_edm, 'dmd': setup_dmd, 'kd': setup_kd, 'pd': setup_pd, 'guided': setup_guided,
           'disback': setup_disback, 'sid': setup_sid, 'sid-disback': setup_sid_disback}

# ----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True, max_content_width=120))
# Main options.
@click.option('--outdir',        help='Where to save the results', metavar='DIR', type=str, default='training-runs')
@click.option('--method',        help='What to train', type=click.Choice(sorted(METHODS)), default='edm')
@click.option('--data',          help='Path to the dataset (zip or folder)', metavar='ZIP|DIR', type=str)
@click.option('--cond',          help='Train class-conditional model', metavar='BOOL', type=bool, default=False)
@click.option('--teacher',       help='Teacher network pickle (distillation methods)', metavar='PKL|URL', type=str)
@click.option('--trust-pickle',  help='Allow code embedded in pickles to run (trusted files only)', is_flag=True)
# EDM (teacher) architecture.
@click.option('--arch',          help='Network architecture', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp')
@click.option('--precond',       help='Preconditioning & loss function', type=click.Choice(['vp', 've', 'edm']), default='edm')
@click.option('--cbase',         help='Channel multiplier  [default: varies]', metavar='INT', type=options.Int(min=1))
@click.option('--cres',          help='Channels per resolution  [default: varies]', metavar='LIST', type=options.IntList(min=1, max_len=16))
@click.option('--dropout',       help='Dropout probability (SiD: of G and the fake score; the teacher\'s unless given)', metavar='FLOAT', type=options.Float(min=0, max=1), default=0.13)
@click.option('--augment',       help='Augment probability (SiD: fake-score loss; 0.12 if the teacher takes augment labels, unless given)', metavar='FLOAT', type=options.Float(min=0, max=1), default=0.12)
@click.option('--xflip',         help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False)
@click.option('--transfer',      help='Initialise the network from a pickle', metavar='PKL|URL', type=str)
# DMD / DMD2.
@click.option('--sigma-init',    help='DMD: generator input noise level (SiD: 2.5 unless given)', metavar='FLOAT', type=options.Float(min=0, min_open=True), default=80)
@click.option('--fake-steps',    help='DMD2: fake-score updates per generator update', metavar='INT', type=options.Int(min=1), default=1)
@click.option('--fake-sigma',    help='DMD: fake-score noise levels, Karras grid (DMD) or EDM\'s log-normal (SiD unless given)', type=click.Choice(['karras', 'lognormal']), default='karras')
@click.option('--fake-lr',       help='DMD: fake-score learning rate  [default: --lr]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--pairs',         help='DMD: regression pairs directory (make_pairs.py)', metavar='DIR', type=str)
@click.option('--reg-weight',    help='DMD: regression loss weight', metavar='FLOAT', type=options.Float(min=0), default=0.25)
@click.option('--reg-loss',      help='DMD: regression distance', type=click.Choice(['lpips', 'l2', 'pseudo_huber']), default='lpips')
@click.option('--lpips-vgg',     help='DMD: VGG16 weights for LPIPS  [default: official URL]', metavar='PTH|URL', type=str)
@click.option('--lpips-lin',     help='DMD: LPIPS linear heads (vgg.pth)  [default: official URL]', metavar='PTH|URL', type=str)
@click.option('--gan-g',         help='DMD2: GAN generator loss weight (0 = no GAN head; paper 3e-3); SiD: SiDA\'s (official 0.01)', metavar='FLOAT', type=options.Float(min=0), default=0)
@click.option('--gan-d',         help='DMD2: GAN classifier loss weight (SiDA: 1 unless given)', metavar='FLOAT', type=options.Float(min=0), default=1e-2)
@click.option('--grad-clip',     help='Gradient clipping at this global norm  [default: dmd 10, pd 1, kd/guided/sid none]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
# KD (compression by knowledge distillation, BK-SDM).
@click.option('--kd-variant',    help='KD: student (base: fewer blocks; small: also no in0/in1; tiny: also no lowest level)', type=click.Choice(['base', 'small', 'tiny']), default='base')
@click.option('--num-blocks',    help='KD: residual blocks per level  [default: half the teacher\'s, rounded up]', metavar='INT', type=options.Int(min=1))
@click.option('--kd-out',        help='KD: weight of the output distillation loss', metavar='FLOAT', type=options.Float(min=0), default=1)
@click.option('--kd-feat',       help='KD: weight of the feature distillation loss', metavar='FLOAT', type=options.Float(min=0), default=1)
@click.option('--kd-feat-norm',  help='KD: divide feature losses by the teacher feature variance', metavar='BOOL', type=bool, default=False)
# PD (progressive distillation) and guided distillation.
@click.option('--start-steps',   help='PD: Euler steps of the first teacher (halved each round; official: CIFAR-10 8192, ImageNet-64 1024)', metavar='INT', type=options.Int(min=2), default=1024)
@click.option('--end-steps',     help='PD: steps of the last student', metavar='INT', type=options.Int(min=1), default=1)
@click.option('--round-kimg',    help='PD: length of a halving round  [default: 50k updates]', metavar='KIMG', type=options.Float(min=0, min_open=True))
@click.option('--final-round-kimg', help='PD: length of the rounds to 2 and 1 steps  [default: --round-kimg]', metavar='KIMG', type=options.Float(min=0, min_open=True))
@click.option('--pd-weight',     help='PD: loss weight, max(1/s^2, 1) (official) or EDM\'s 1/s^2 + 1/sd^2', type=click.Choice(['snr-trunc', 'edm']), default='snr-trunc')
@click.option('--ema-teacher',   help='PD: the EMA (--ema) becomes the next teacher', metavar='BOOL', type=bool, default=False)
@click.option('--w-range',       help='Guided: w ~ U[MIN,MAX]  [default: 0,4]; PD: carry w of a guided teacher', metavar='MIN,MAX', type=str)
@click.option('--guide',         help='Guided: D_u, an uncond./weaker network, or null (the teacher\'s zero label; needs label dropout)', metavar='PKL|URL|null', type=str, default='null')
# DisBack (on top of the DMD options).
@click.option('--path',          help='DisBack: recorded path (a stage-1 run directory): skip stage 1', metavar='DIR', type=str)
@click.option('--stage1-kimg',   help='DisBack: stage 1 (path recording) duration, part of --duration', metavar='KIMG', type=options.Float(min=0, min_open=True), default=200)
@click.option('--path-nodes',    help='DisBack: N, the path has N+1 snapshots', metavar='INT', type=options.Int(min=1), default=4)
@click.option('--path-place',    help='DisBack: nodes evenly or geometrically in stage-1 updates, evenly in distance from the teacher, or the official schedule (a node every 100 updates at the G lr, the target moving every 1000 fake updates)', type=click.Choice(['even', 'geometric', 'distance', 'official']), default='distance')
@click.option('--stage1-lr',     help='DisBack: stage-1 learning rate  [default: fake-score lr / 10]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--stage1-stop',   help='DisBack: stage 1 lasts --stage1-kimg, or until its probe loss plateaus (at most --stage1-kimg)', type=click.Choice(['fixed', 'plateau']), default='fixed')
@click.option('--stage1-window', help='DisBack: stage-1 updates between probe checks (the plateau test\'s window)', metavar='INT', type=options.Int(min=1), default=50)
@click.option('--stage1-tol',    help='DisBack: --stage1-stop=plateau ends when the probe loss fell by less than this over a window', metavar='FRAC', type=options.Float(0, 1), default=0.01)
@click.option('--switch-every',  help='DisBack: generator steps per path node (window of --switch=converged)', metavar='INT', type=options.Int(min=1), default=1000)
@click.option('--switch',        help='DisBack: move the target every K generator steps, or when L_DM stops falling', type=click.Choice(['every', 'converged']), default='every')
@click.option('--switch-tol',    help='DisBack: --switch=converged moves on when a window\'s L_DM fell by less than this', metavar='FRAC', type=options.Float(0, 1), default=0.05)
# SiD (with the DMD options --sigma-init, --fake-lr, --fake-sigma, --gan-g, --gan-d, --grad-clip).
@click.option('--guide-net',     help='DMD/SiD: autoguided real score D_g + w (D - D_g) with this guiding network (EDM2)', metavar='PKL|URL', type=str)
@click.option('--guidance',      help='DMD/SiD: autoguidance weight w of --guide-net (EDM2 img64-S: 1.7)', metavar='FLOAT', type=options.Float(min=0))
@click.option('--alpha',         help='SiD: loss weight, (y_r-y_f).(y_r-x) - alpha*|y_r-y_f|^2', metavar='FLOAT', type=options.Float(), default=1.2)
@click.option('--t-max',         help='SiD: generator-loss noise levels t ~ U[0, t_max/1000] on the Karras map', metavar='INT', type=options.Int(1, 1000), default=800)
@click.option('--g-beta1',       help='SiD: generator Adam beta1 (the fake score\'s is 0)', metavar='FLOAT', type=options.Float(0, 1, max_open=True), default=0)
# Hyperparameters.
@click.option('--duration',      help='Training duration', metavar='MIMG', type=options.Float(min=0, min_open=True), default=200)
@click.option('--batch',         help='Total batch size', metavar='INT', type=options.BATCH, default=512)
@click.option('--batch-gpu',     help='Limit batch size per GPU', metavar='INT', type=options.BATCH)
@click.option('--lr',            help='Learning rate  [default: varies]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--lr-rampup',     help='Learning-rate warm-up  [default: edm 10000, else 0; pd: none]', metavar='KIMG', type=options.Float(min=0))
@click.option('--ema',           help='EMA half-life  [default: varies]', metavar='MIMG', type=options.Float(min=0))
@click.option('--phema',         help='Post-hoc EMA: track power-function profiles of these relative stds (EDM2: 0.050,0.100); reconstruct_phema.py makes any other', metavar='LIST', type=str, callback=parse_phema)
@click.option('--precision',     help='Precision of every network  [default: bf16 on CUDA for distillation (SiD: fp32 to 32x32, fp16 from 64x64), else fp32]', type=click.Choice(['fp32', 'bf16', 'fp16']))
@click.option('--fp16',          help='EDM\'s flag: the same as --precision=fp16', metavar='BOOL', type=bool, default=False)
@click.option('--ls',            help='Static fp16 loss scale, as EDM  [default: dynamic]', metavar='FLOAT', type=options.Float(min=0, min_open=True))
@click.option('--tf32',          help='Allow TF32 matmuls/convolutions on CUDA', metavar='BOOL', type=bool, default=False)
# In-training metrics.
@click.option('--metrics',       help='Metrics at each snapshot: fidNk, isNk (Inception Score), prNk (precision/recall), e.g. fid50k,is50k,pr50k', metavar='LIST', type=str)
@click.option('--ref',           help='Reference statistics for --metrics=fidNk (fid.py ref)', metavar='NPZ|URL', type=str)
@click.option('--pr-data',       help='Real images for --metrics=prNk  [default: --data]', metavar='ZIP|DIR', type=str)
@click.option('--tensorboard',   help='Also write the statistics as TensorBoard event files (needs tensorboard)', is_flag=True)
@click.option('--detector',      help='Detector for every --metrics: inception, vgg16, pixels or PKL (--trust-pickle)  [default: inception for fid/is, vgg16 for pr]', metavar='NAME|PKL', type=str)
# Performance and I/O.
@click.option('--bench',         help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True)
@click.option('--deterministic', help='Deterministic CUDA kernels (--bench=0): bitwise resume on GPUs too', is_flag=True)
@click.option('--cache',         help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True)
@click.option('--workers',       help='DataLoader worker processes', metavar='INT', type=options.Int(min=0), default=1)
@click.option('--device',        help='Device  [default: cuda if available]', type=options.Device())
@click.option('--desc',          help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir',      help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick',          help='How often to print progress', metavar='KIMG', type=options.Float(min=0, min_open=True), default=50)
@click.option('--snap',          help='How often to save snapshots', metavar='TICKS', type=options.Int(min=1), default=50)
@click.option('--dump',          help='How often to dump state', metavar='TICKS', type=options.Int(min=1), default=500)
@click.option('--seed',          help='Random seed  [default: random]', metavar='INT', type=options.SEED)
@click.option('--resume',        help='Resume from a training state or a run directory (continues in that directory; pass the run\'s options)', metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
def main(**kwargs):
    """Train a diffusion model or distill one into a fast generator.

    \b
    # Train a DDPM++ teacher on CIFAR-10 with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp
    """
    try:
        finished = _main(dnnlib.EasyDict(kwargs))
    except (OSError, dnnlib.util.RunError, torch.OutOfMemoryError, click.ClickException) as e:
        error = _one_line(e)
        if distributed.is_distributed():  # under torchrun: the line, then exit before a peer's collective holds us
            error.show()
            distributed.exit_now(error.exit_code)
        if error is e:
            raise
        raise error from e
    code = dnnlib.util.EXIT_STOPPED if finished is False else 0  # stopped by SIGTERM/SIGINT: a scheduler requeues
    distributed.shutdown(code)  # finished or stopped with its peers; under torchrun the process ends here
    if code:
        raise click.exceptions.Exit(code)


def _one_line(e):
    """The error the user sees: one line naming the file or option and the fix."""
    if isinstance(e, click.ClickException):
        return e
    if isinstance(e, OSError):  # a full disk, a read-only --outdir, ...: one line naming the file
        return click.ClickException(dnnlib.util.os_error_message(e))
    if isinstance(e, torch.OutOfMemoryError):  # torch's message is a paragraph: its first two sentences
        return click.ClickException(f'{". ".join(str(e).split(". ")[:2])}; lower --batch-gpu (gradient accumulation '
                                    f'gives the same result) or use a device with more memory')
    return click.ClickException(str(e))


def _main(opts):
    """The command; returns True when training finished, False when it was stopped (None: dry run)."""
    if opts.deterministic:
        if _given('bench') and opts.bench:
            raise click.ClickException('--deterministic turns cuDNN benchmarking off (it picks kernels by timing); '
                                       'drop --bench=1')
        if os.environ.get('CUBLAS_WORKSPACE_CONFIG') not in (':4096:8', ':16:8'):  # cuBLAS's deterministic settings
            os.environ['CUBLAS_WORKSPACE_CONFIG'] = ':4096:8'  # before CUDA starts, as cuBLAS requires
    try:
        device = distributed.init(opts.device)
    except ValueError as e:  # a malformed $EDM_DISTILL_TIMEOUT_MIN
        raise click.ClickException(str(e))
    world_size = distributed.get_world_size()

    # Checks that need no files.
    if opts.batch % world_size != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by the {world_size} processes')
    per_rank = opts.batch // world_size
    batch_gpu = opts.batch_gpu or per_rank
    if per_rank % batch_gpu != 0:
        raise click.ClickException(f'--batch-gpu={batch_gpu} must divide the per-process batch {per_rank} '
                                   f'(--batch={opts.batch} over {world_size} processes)')

    c = dnnlib.EasyDict()
    ds = None
    if opts.data is not None:
        c.dataset_kwargs, ds = open_dataset(opts.data, opts.cond, opts.xflip, opts.cache)
        c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=device.type == 'cuda', num_workers=opts.workers,
                                               prefetch_factor=2 if opts.workers > 0 else None)
    elif opts.method == 'edm':
        raise click.ClickException('--method=edm needs --data=ZIP|DIR (make one with dataset_tool.py)')
    c.precision, c.loss_scaling, precision_note = resolve_precision(opts, device, _resolution(opts, ds, device))
    c.tf32 = opts.tf32
    with distributed.rank0_first():  # the checks load every network file: rank 0 fills the download cache first
        desc = METHODS[opts.method](opts, c, ds)
        transfer_note = None
        if opts.transfer is not None:
            if 'transfer' not in c:
                raise click.ClickException(f'--transfer initialises --method=edm only; drop it for --method={opts.method}')
            transfer_note = _check_transfer(c, ds, _check_network('--transfer', opts.transfer, ds, opts.trust_pickle))
        if opts.teacher is not None:
            c.teacher = opts.teacher
            if not opts.dry_run:
                teacher = _check_network('--teacher', opts.teacher, ds, opts.trust_pickle)
                if (c.method_kwargs.get('augment_p') or 0) > 0 and 'sid' in opts.method:
                    from training.distill.sid import takes_augment_labels
                    if not takes_augment_labels(teacher):
                        raise click.ClickException(f'--augment={opts.augment}: the teacher was trained without '
                                                   f'augmentation labels, so SiD cannot augment; use --augment=0')
                if c.method_kwargs.get('pairs') is not None:
                    _check_pairs(c.method_kwargs, opts.teacher, teacher)
            elif not dnnlib.util.is_url(opts.teacher) and not os.path.isfile(opts.teacher):
                raise click.ClickException(f'--teacher: no such file "{opts.teacher}"')
        _setup_autoguidance(opts, c, ds, teacher if opts.teacher is not None and not opts.dry_run else None)
    if opts.deterministic and device.type == 'cuda' and c.method_kwargs.get('pairs') and c.method_kwargs.reg_loss == 'lpips':
        raise click.ClickException('--deterministic: LPIPS upsamples bilinearly, whose CUDA backward has no '
                                   'deterministic kernel; use --reg-loss=l2 or pseudo_huber, or drop --deterministic')
    c.trust_pickle = opts.trust_pickle
    c.batch_size = opts.batch
    c.batch_gpu = batch_gpu
    c.total_kimg = max(opts.duration * 1000, 1e-3)
    c.kimg_per_tick = opts.tick
    c.snapshot_ticks = opts.snap
    c.state_dump_ticks = opts.dump
    c.cudnn_benchmark = opts.bench and not opts.deterministic
    if opts.deterministic:  # recorded only when on, so that runs from before the option resume
        c.deterministic = True
    if opts.phema is not None:
        c.phema_stds = opts.phema
    if opts.tensorboard:
        try:
            importlib.import_module('torch.utils.tensorboard')  # needs the tensorboard package
        except ImportError:
            raise click.ClickException('--tensorboard needs the tensorboard package: pip install tensorboard') from None
        c.tensorboard = True
    if opts.metrics:
        from training.metrics import parse_metric
        c.metrics = [m.strip() for m in opts.metrics.split(',') if m.strip()]
        try:
            kinds = {parse_metric(m)[0] for m in c.metrics}
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint='--metrics')
        if 'fid' in kinds and opts.ref is None:
            raise click.ClickException('--metrics=fidNk needs --ref=NPZ|URL (reference statistics from fid.py ref)')
        if opts.ref is not None and not dnnlib.util.is_url(opts.ref) and not os.path.isfile(opts.ref):
            raise click.ClickException(f'--ref: no such file "{opts.ref}"')
        pr_data = opts.pr_data or opts.data
        if 'pr' in kinds and pr_data is None:
            raise click.ClickException('--metrics=prNk compares with real images: pass --pr-data=ZIP|DIR (or --data)')
        c.metric_kwargs = dnnlib.EasyDict(ref=opts.ref, detector=opts.detector, trust_detector=opts.trust_pickle,
                                          pr_data=pr_data if 'pr' in kinds else None)
        if not opts.dry_run:
            shape = (ds.resolution, ds.num_channels) if ds is not None else (teacher.img_resolution, teacher.img_channels)
            with distributed.rank0_first():  # the detectors and statistics may be downloads
                _check_metrics(c.metrics, c.metric_kwargs, shape)

    # Random seed: drawn on rank 0 and shared, then recorded, so the run can be repeated from its options.
    if opts.seed is None:
        seed = torch.randint(1 << 31, size=[], device=device)
        distributed.broadcast_(seed)
        opts.seed = int(seed)
    c.seed = opts.seed

    # Run directory.
    desc = f'{opts.method}-{desc}-gpus{world_size}-batch{opts.batch}-{c.precision}' if opts.method != 'edm' else \
           f'{desc}-gpus{world_size}-batch{opts.batch}-{c.precision}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    if opts.resume is not None:
        if not os.path.exists(opts.resume):
            raise click.ClickException(f'--resume: "{opts.resume}" does not exist')
        c.resume_state = opts.resume
        c.run_dir = opts.resume if os.path.isdir(opts.resume) else os.path.dirname(os.path.abspath(opts.resume))
        old = run_dir.read_options(c.run_dir)
        if not _given('seed'):
            c.seed = old.get('seed')  # the seed the run drew: the same options continue the same run
        resume_changes = run_dir.check_options(old, c)
        resume_from = training_loop.find_latest_state(opts.resume)  # the state must load: checked now
    elif opts.nosubdir:
        c.run_dir = opts.outdir
        holds_run = os.path.isfile(os.path.join(c.run_dir, 'training_options.json'))  # a new run would overwrite it
        if distributed.broadcast_object(holds_run if distributed.get_rank() == 0 else None):  # before rank 0 writes
            raise click.ClickException(f'--outdir: "{c.run_dir}" holds a run (training_options.json); a new run there '
                                       f'would overwrite it: use --resume, or another --outdir')
    else:  # rank 0 decides: a rank that looked later would see rank 0's new directory and pick the next id
        c.run_dir = distributed.broadcast_object(next_run_dir(opts.outdir, desc) if distributed.get_rank() == 0 else None)

    if opts.dry_run:
        _print_options(c, world_size)
        distributed.print0('Dry run; exiting.')
        return None

    # Kept until the process exits (never restored): a signal during the shutdown after the loop must not turn the
    # exit code 0 or 75 into 143.
    training_loop.catch_stop_signals()
    lock = logger = None
    try:
        if distributed.get_rank() == 0:
            os.makedirs(c.run_dir, exist_ok=True)
            lock = run_dir.lock(c.run_dir)  # one run writes here at a time
            removed = dnnlib.util.remove_temp_files(c.run_dir)  # left by a killed run: never outputs
            if opts.resume is None:
                dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'),
                                         lambda f: json.dump(c, f, indent=2), mode='w')
            else:
                run_dir.record_resume(c.run_dir, resume_from, resume_changes)
            logger = dnnlib.util.Logger(os.path.join(c.run_dir, 'log.txt'), file_mode='a')
            if precision_note:  # the log's first line
                print(precision_note)
            if removed:
                print(f'Removed {len(removed)} temp file(s) left by a killed run: {", ".join(removed)}')
        _print_options(c, world_size)
        if transfer_note:
            distributed.print0(transfer_note)
        finished = training_loop.training_loop(**c, device=device)
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.close()  # releases the lock (the kernel does so too when a process dies)
    return finished


def _resolution(opts, ds, device):
    """The image resolution, where SiD's default precision needs it (CUDA, no --precision): the data's, else the
    teacher's (loaded here; not in a dry run, which reads no network); None when unknown."""
    if opts.method not in ('sid', 'sid-disback') or device.type != 'cuda' or opts.precision or opts.fp16:
        return None
    if ds is not None:
        return ds.resolution
    if opts.teacher is None or opts.dry_run:
        return None
    with distributed.rank0_first():
        return _check_network('--teacher', opts.teacher, None, opts.trust_pickle).img_resolution


def _print_options(c, world_size):
    distributed.print0()
    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0()
    distributed.print0(f'Output directory:        {c.run_dir}')
    distributed.print0(f'Number of processes:     {world_size}')
    distributed.print0(f'Batch size:              {c.batch_size}')
    distributed.print0()


def _check_network(option, path, ds, trust):
    """A network pickle must be readable (and match the data, when given) before any directory exists."""
    from torch_utils import persistence
    try:
        net = persistence.load_network_pkl(path, allow_code=trust)
    except (OSError, ValueError) as e:  # unreadable, unsafe or malformed: one line naming the file
        raise click.ClickException(f'{option}: {e}')
    if ds is not None:
        got = (net.img_resolution, net.img_channels, net.label_dim)
        want = (ds.resolution, ds.num_channels, ds.label_dim)
        if got != want:
            raise click.ClickException(f'{option}: network is {got[0]}x{got[0]}x{got[1]} with {got[2]} labels, but the data '
                                       f'is {want[0]}x{want[0]}x{want[1]} with {want[2]} labels; pick a matching network or dataset')
    return net


def _setup_autoguidance(opts, c, ds, teacher):
    """--guide-net/--guidance: the one-step methods' real score becomes the autoguided pair (EDM2) D_g.lerp(D, w)."""
    if opts.guide_net is None:
        if opts.guidance is not None:
            raise click.ClickException('--guidance is the autoguidance weight of --guide-net: give --guide-net=PKL too')
        return
    if opts.method not in ('dmd', 'sid'):
        raise click.ClickException(f'--guide-net autoguides the real score of --method=dmd or sid; drop it for --method={opts.method}')
    if opts.guidance is None:
        raise click.ClickException('--guide-net needs --guidance=W, the autoguidance weight (EDM2 img64-S with XS: 1.7)')
    c.guide_net = opts.guide_net
    c.method_kwargs.guidance = opts.guidance
    if teacher is not None:
        guide = _check_network('--guide-net', opts.guide_net, ds, opts.trust_pickle)
        got, want = [(n.img_resolution, n.img_channels, n.label_dim) for n in (guide, teacher)]
        if got != want:
            raise click.ClickException(f'--guide-net is {got[0]}x{got[0]}x{got[1]} with {got[2]} labels, the teacher '
                                       f'{want[0]}x{want[0]}x{want[1]} with {want[2]}: pick a guiding network of the same task')


def _check_transfer(c, ds, source):
    """--transfer copies the tensors the trained network shares with the pickle (EDM's require_all=False): check the
    shapes now; returns a line naming what is not copied, or None."""
    from training.teacher import transfer_plan
    interface = dict(img_resolution=ds.resolution, img_channels=ds.num_channels, label_dim=ds.label_dim)
    with torch.device('meta'):  # shapes only, no memory
        net = dnnlib.util.construct_class_by_name(**c.method_kwargs.network_kwargs, **interface)
    try:
        kept, dropped = transfer_plan(net, source)
    except ValueError as e:
        raise click.ClickException(f'--transfer: {e}')
    parts = [f'kept the initial {", ".join(kept)} (not in the pickle)'] if kept else []
    parts += [f'ignored the pickle\'s {", ".join(dropped)}'] if dropped else []
    return f'--transfer: {"; ".join(parts)}' if parts else None


def _check_pairs(method_kwargs, teacher_path, teacher):
    """DMD's regression pairs (and their distance's weights) must be readable and made by this teacher."""
    from training import pairs
    from training.distances import make_distance
    try:
        pair_set = pairs.PairSet(method_kwargs.pairs)
        pair_set.check_teacher(teacher)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'--pairs: {e}')
    if pair_set.teacher_sha256 != pairs.file_sha256(teacher_path):
        raise click.ClickException(f'--pairs: "{method_kwargs.pairs}" holds pairs of another teacher '
                                   f'({pair_set.teacher}); make pairs with this --teacher (make_pairs.py) or distill '
                                   f'the teacher they came from')
    try:
        make_distance(method_kwargs.reg_loss, **method_kwargs.reg_kwargs)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:  # offline, missing, not the weight files
        raise click.ClickException(f'--reg-loss={method_kwargs.reg_loss}: {e}')


def _check_metrics(names, metric_kwargs, shape):
    """--metrics: the reference statistics, the detectors and the real images load now, not at the first snapshot."""
    from training import metrics
    from training.dataset import ImageFolderDataset
    kinds = {metrics.parse_metric(m)[0] for m in names}
    if 'fid' in kinds:
        try:
            metrics.load_ref(metric_kwargs.ref)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--ref: {e}')
    for name in {metric_kwargs.detector or metrics.default_detector(kind) for kind in kinds}:
        try:
            metrics.load_detector(name, trust=metric_kwargs.trust_detector)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--detector: {e}')
    if 'pr' in kinds:
        try:
            real = ImageFolderDataset(metric_kwargs.pr_data)
        except (OSError, ValueError) as e:
            raise click.ClickException(f'--pr-data: {e}')
        if (real.resolution, real.num_channels) != shape or len(real) < 4:
            raise click.ClickException(f'--pr-data: "{metric_kwargs.pr_data}" holds {len(real)} images of '
                                       f'{real.resolution}x{real.resolution}x{real.num_channels}; precision/recall '
                                       f'needs at least 4 real images of the generator\'s {shape[0]}x{shape[0]}x{shape[1]}')


# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
