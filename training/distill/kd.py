"""Compression by knowledge distillation (BK-SDM, Kim et al. 2023; segmind distill-sd) of EDM's UNets.

A student is the teacher's own network class with blocks removed, its weights copied from the teacher, then trained
with L = L_task + lambda_out * L_outKD + lambda_feat * L_featKD (BK-SDM's equation; all weights 1 there, 0.5 in
distill-sd). Variants, as in BK-SDM:

    base    fewer residual blocks per level: k = ceil(n/2) (SongUNet 4 -> 2, DhariwalUNet 3 -> 2), or `num_blocks`
    small   also without the deepest level's in0/in1 decoder blocks (the network keyword `mid_blocks=False`)
    tiny    also without the lowest-resolution level

Weight copy: encoder block j <- teacher block j (j < k), decoder block j <- teacher block j (j < k), the last decoder
block (k) <- the teacher's last (n), everything else by name. The student is a plain training.networks
preconditioner built from constructor keywords, so pickles, the safe loader, generate.py and every distillation
method accept it.

Loss reduction: L_task is EDM's loss, summed over pixels and averaged over the batch (EDM's training loop), and the
KD terms are per-pixel means scaled by the image size to the same sum. BK-SDM's script averages every term
(`F.mse_loss(..., reduction="mean")`) and clips at global norm 1; here a `--grad-clip` threshold therefore acts on a
gradient C*H*W times BK-SDM's scale (none is applied by default).
"""

import contextlib
import inspect
import re

import torch

import dnnlib
from torch_utils import distributed, training_stats
from training import networks_edm2, optim
from training.dataset import check_network_matches
from training.ema import EMA
from training.teacher import EDM

VARIANTS = ('base', 'small', 'tiny')

# EDM's official teachers (the configurations of EDM's train.py), so student sizes can be computed without the pickles.
TEACHER_CONFIGS = dict(
    cifar10=dict(class_name='training.networks.EDMPrecond', img_resolution=32, img_channels=3, label_dim=10,
                 augment_dim=9, model_type='SongUNet', model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
                 attn_resolutions=[16], dropout=0.13, embedding_type='positional', encoder_type='standard',
                 decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1]),
    ffhq64=dict(class_name='training.networks.EDMPrecond', img_resolution=64, img_channels=3, label_dim=0,
                augment_dim=9, model_type='SongUNet', model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=4,
                attn_resolutions=[16], dropout=0.05, embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1]),
    imagenet64=dict(class_name='training.networks.EDMPrecond', img_resolution=64, img_channels=3, label_dim=1000,
                    model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                    attn_resolutions=[32, 16, 8], dropout=0.10, use_fp16=True),
)

# ----------------------------------------------------------------------------
# Reading a network's configuration.

# A persistent module's constructor arguments as one flat keyword dict (positional ones named, **model_kwargs merged).
def _init_kwargs(module):
    if not hasattr(module, 'init_kwargs'):
        raise ValueError(f'A {type(module).__name__} does not record its constructor arguments; KD needs a teacher '
                         f'built from training.networks (e.g. an EDM snapshot read by persistence.load_network_pkl)')
    orig_class = type(module).__bases__[0]  # the class under the persistent_class decorator
    bound = inspect.signature(orig_class.__init__).bind(None, *module.init_args, **module.init_kwargs)
    rest = ('model_kwargs', 'unet_kwargs')  # EDM's and EDM2's **kwargs for the backbone
    kwargs = {name: value for name, value in bound.arguments.items() if name not in ('self', *rest)}
    return {**kwargs, **{k: v for name in rest for k, v in bound.arguments.get(name, {}).items()}}


def _backbone(net):
    """(state-dict prefix, backbone module): EDM's `model` or EDM2's `unet`."""
    return ('unet', net.unet) if isinstance(net, networks_edm2.Precond) else ('model', getattr(net, 'model', None))


# The full configuration of a preconditioner's backbone: its recorded keywords over the signature's defaults.
def backbone_config(net):
    precond, backbone = type(net).__name__, type(_backbone(net)[1]).__name__
    if (precond, backbone) != ('Precond', 'UNet') and (precond not in ('VPPrecond', 'VEPrecond', 'iDDPMPrecond', 'EDMPrecond')
                                                     or backbone not in ('SongUNet', 'DhariwalUNet')):
        raise ValueError(f'KD compresses EDM2 networks and VP/VE/iDDPM/EDMPrecond networks with a SongUNet or '
                         f'DhariwalUNet backbone; the teacher is a {precond} with a {backbone} backbone')
    orig_class = type(_backbone(net)[1]).__bases__[0]
    defaults = {name: p.default for name, p in inspect.signature(orig_class.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return dnnlib.EasyDict({'mid_blocks': True, **defaults, **_init_kwargs(_backbone(net)[1])})

# ----------------------------------------------------------------------------
# Building a student.

# class_name + constructor keywords of the student of `teacher`; raises ValueError for combinations that do not work.
def student_config(teacher, variant=None, num_blocks=None):
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f'Invalid KD variant "{variant}"; use base, small or tiny (or only num_blocks)')
    if variant is None and num_blocks is None:
        raise ValueError('Give a KD variant (base, small, tiny) or num_blocks')
    cfg = backbone_config(teacher)
    n, channel_mult = cfg.num_blocks, list(cfg.channel_mult)
    k = num_blocks if num_blocks is not None else (n + 1) // 2
    if not 1 <= k <= n:
        raise ValueError(f'num_blocks={k} must be between 1 and the teacher\'s {n} blocks per level')
    kwargs = _init_kwargs(teacher)
    kwargs.update(num_blocks=k)
    edm2 = isinstance(teacher, networks_edm2.Precond)
    if edm2 and variant in ('small', 'tiny'):
        raise ValueError(f'KD variant "{variant}" removes the in0/in1 decoder blocks, which EDM2\'s UNet always has; '
                         f'use base or num_blocks')
    if variant in ('small', 'tiny'):
        kwargs.update(mid_blocks=False)
    if variant == 'tiny':
        if len(channel_mult) < 2:
            raise ValueError('KD variant "tiny" drops the lowest-resolution level, but the teacher has only one level; '
                             'use base or small')
        if channel_mult[-1] != channel_mult[-2]:
            # The new deepest level's first decoder block would see other input channels than the teacher's.
            raise ValueError(f'KD variant "tiny" needs equal channels at the two lowest resolutions (channel_mult '
                             f'{channel_mult}) to copy the teacher\'s weights; use base or small')
        kwargs.update(channel_mult=channel_mult[:-1])
    mid_blocks = cfg.mid_blocks and variant not in ('small', 'tiny')
    levels = len(channel_mult) - (variant == 'tiny')
    if variant is not None and (k, mid_blocks, levels) == (n, cfg.mid_blocks, len(channel_mult)):
        raise ValueError(f'KD variant "{variant}" removes nothing from this teacher ({n} blocks per level'
                         f'{"" if cfg.mid_blocks else ", no in0/in1"}); pick a smaller variant or num_blocks')
    module = 'training.networks_edm2' if edm2 else 'training.networks'
    return dnnlib.EasyDict(class_name=f'{module}.{type(teacher).__name__}', **kwargs)


# The teacher state-dict key a student key is copied from: the student's last decoder block k <- the teacher's n.
def teacher_key(key, k, n):
    m = re.fullmatch(r'(model|unet)\.dec\.(\d+x\d+)_block(\d+)\.(.+)', key)
    if m is not None and int(m.group(3)) == k:
        return f'{m.group(1)}.dec.{m.group(2)}_block{n}.{m.group(4)}'
    return key


# Overwrite every student tensor with its teacher tensor; an unmapped or mis-shaped one is an error, never skipped.
@torch.no_grad()
def copy_teacher_weights(student, teacher):
    k, n = backbone_config(student).num_blocks, backbone_config(teacher).num_blocks
    source = teacher.state_dict()
    problems = []
    for key, value in student.state_dict().items():
        src = source.get(teacher_key(key, k, n))
        if src is None or src.shape != value.shape:
            problems.append(f'{key} ({"absent" if src is None else f"shape {list(src.shape)} vs {list(value.shape)}"})')
        else:
            value.copy_(src)
    if problems:
        raise ValueError(f'{len(problems)} student tensors have no teacher tensor to copy: {"; ".join(problems[:3])}')


# The student of `teacher` (same device), every weight copied from it.
def make_student(teacher, variant=None, num_blocks=None):
    config = student_config(teacher, variant, num_blocks)
    student = dnnlib.util.construct_class_by_name(**config)  # random init, overwritten below
    student.to(next(teacher.parameters()).device)
    copy_teacher_weights(student, teacher)
    return student

# ----------------------------------------------------------------------------
# Features for L_featKD.

# (student module, teacher module) names: each student level's last encoder block and last decoder block.
def feature_pairs(student, teacher):
    s, t = backbone_config(student), backbone_config(teacher)
    p = _backbone(student)[0]
    pairs = []
    for level in range(len(s.channel_mult)):
        r = student.img_resolution >> level
        pairs.append((f'{p}.enc.{r}x{r}_block{s.num_blocks - 1}', f'{p}.enc.{r}x{r}_block{t.num_blocks - 1}'))
        pairs.append((f'{p}.dec.{r}x{r}_block{s.num_blocks}', f'{p}.dec.{r}x{r}_block{t.num_blocks}'))
    return pairs


# Record the outputs of the named submodules during forward passes inside the block; the hooks go away after.
@contextlib.contextmanager
def capture(net, names):
    features = dict()
    modules = dict(net.named_modules())
    store = lambda name: (lambda module, args, output: features.__setitem__(name, output))
    handles = [modules[name].register_forward_hook(store(name)) for name in names]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()

# ----------------------------------------------------------------------------
# The loss terms.

# Per-sample L_task, L_outKD, L_featKD, each a mean per pixel (task, out) or per feature element (feat).
# D_S and D_T see the same noisy input: the teacher is evaluated inside the student call the task loss makes.
def kd_terms(student, teacher, pairs, loss_fn, images, labels=None, augment_pipe=None, rnd=None, sigma_data=0.5,
             feat_norm=False):
    seen = dict()

    def both(x, sigma, class_labels, **model_kwargs):
        with torch.no_grad(), capture(teacher, [t for _, t in pairs]) as f_T:
            D_T = teacher(x, sigma, class_labels, **model_kwargs)
        with capture(student, [s for s, _ in pairs]) as f_S:
            D_S = student(x, sigma, class_labels, **model_kwargs)
        seen.update(D_S=D_S, D_T=D_T, sigma=sigma, f_S=f_S, f_T=f_T)
        return D_S

    L_task = loss_fn(both, images, labels, augment_pipe, rnd=rnd).flatten(1).mean(1)
    lam = 1 / seen['sigma'] ** 2 + 1 / sigma_data ** 2  # EDM's weight, lam(s) = 1/s^2 + 1/sd^2
    L_out = (lam * (seen['D_S'] - seen['D_T']) ** 2).flatten(1).mean(1)
    L_feat = torch.zeros_like(L_task)
    for s, t in pairs:
        f_S, f_T = seen['f_S'][s].to(torch.float32), seen['f_T'][t].to(torch.float32)
        term = (f_S - f_T).square().flatten(1).mean(1)
        if feat_norm:
            term = term / f_T.flatten(1).var(1).clamp(min=1e-8)  # a relative error, comparable across levels
        L_feat = L_feat + term
    return L_task, L_out, L_feat

# ----------------------------------------------------------------------------
# The method (`--method=kd`).

class KD(EDM):
    """EDM training of a compressed student plus KD terms; networks, snapshots, previews and state as in EDM."""

    def __init__(self,
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        teacher,                        # network to compress (eval, frozen)
        dataset,                        # training data for L_task
        variant             = 'base',   # 'base', 'small', 'tiny' (see the module docstring), None = num_blocks only
        num_blocks          = None,     # residual blocks per level, None = the variant's
        lambda_out          = 1,        # weight of L_outKD
        lambda_feat         = 1,        # weight of L_featKD
        feat_norm           = False,    # divide each feature term by the teacher feature's variance?
        sigma_data          = 0.5,      # sd in L_outKD's weight lam(s) = 1/s^2 + 1/sd^2
        loss_kwargs         = dict(class_name='training.loss.EDMLoss'),  # L_task: class_name + keywords
        optimizer_kwargs    = dict(class_name='torch.optim.Adam', lr=1e-4),  # lr is the base lr
        augment_kwargs      = None,     # AugmentPipe keywords, or None; used only if the teacher takes augment labels
        ema_halflife_kimg   = 500,      # EMA half-life in thousands of images
        ema_rampup_ratio    = 0.05,     # EMA half-life ramp-up, None = off
        lr_rampup_kimg      = 0,        # learning-rate warm-up
        max_grad_norm       = None,     # gradient clipping, None = off
        sample_steps        = 18,       # Heun steps of preview samples
    ):
        check_network_matches(teacher, dataset, 'pick matching ones')
        self.device = device
        self.batch_size = batch_size
        self.per_rank_batch = batch_size // distributed.get_world_size()
        self.teacher = teacher.eval().requires_grad_(False)
        self.net = make_student(teacher, variant, num_blocks).train().requires_grad_(True).to(device)
        self.pairs = feature_pairs(self.net, teacher)
        self.loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
        takes_augment = getattr(_backbone(teacher)[1], 'map_augment', None) is not None  # only teachers trained with augment labels
        self.augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs and takes_augment else None
        self.lr = optimizer_kwargs['lr']
        self.optimizer = optim.Updater(self.net.parameters(), 'net', max_grad_norm=max_grad_norm, **optimizer_kwargs)
        self.ema = EMA(self.net, ema_halflife_kimg, ema_rampup_ratio)
        self.lambda_out = lambda_out
        self.lambda_feat = lambda_feat
        self.feat_norm = feat_norm
        self.sigma_data = sigma_data
        self.lr_rampup_kimg = lr_rampup_kimg
        self.sample_steps = sample_steps

    # One round's per-sample loss; the per-pixel means times the image size follow EDM's sum over pixels.
    def _loss(self, r):
        with r.keyed_dropout():
            L_task, L_out, L_feat = kd_terms(self.net, self.teacher, self.pairs, self.loss_fn, r.images, r.labels,
                                             self.augment_pipe, rnd=r, sigma_data=self.sigma_data, feat_norm=self.feat_norm)
        loss = L_task + self.lambda_out * L_out + self.lambda_feat * L_feat
        training_stats.report('Loss/task', L_task)
        training_stats.report('Loss/out', L_out)
        training_stats.report('Loss/feat', L_feat)
        training_stats.report('Loss/loss', loss)
        return loss * r.images[0].numel()
