"""EDM2's magnitude-preserving UNet and its preconditioning (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", config G), written from the paper.

Class names (Precond, UNet, Block, MPConv, MPFourier), constructor keywords and state-dict keys follow NVlabs/edm2's
`training/networks_edm2.py`, so its released pickles load with `strict=True` and give the same outputs, and the
pickles this project writes are read by EDM2's tools. Like EDM2, there are no biases and no normalisation layers:
every weight is normalised on use, and in train mode also in place ("forced weight normalisation", Sec. 3.2).
This module's source is embedded into every pickle of its classes and executed by EDM2's readers: it may import
only the standard library, numpy, torch and torch_utils.persistence.
"""

import copy
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch_utils import persistence

# ----------------------------------------------------------------------------
# Magnitude-preserving primitives (paper Sec. 3 and Appendix B).

def normalize(x, dim=None, eps=1e-4):
    """x / (eps + RMS of x over `dim`), by default over every dimension but the first (one row per output channel)."""
    norm = torch.linalg.vector_norm(x, dim=dim if dim is not None else list(range(1, x.ndim)), keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))  # the norm's scale turned into an RMS
    return x / norm.to(x.dtype)


def resample(x, f=[1,1], mode='keep'):
    """2x down- ('down') or upsampling ('up') by the separable filter f, channel by channel. [1,1]: average pooling
    and nearest-neighbour upsampling."""
    if mode == 'keep':
        return x
    f = torch.as_tensor(f, dtype=torch.float32)
    f = (f.ger(f) / f.sum().square()).to(device=x.device, dtype=x.dtype)
    pad = (f.shape[-1] - 1) // 2
    c = x.shape[1]
    if mode == 'down':
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    if mode == 'up':
        return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    raise ValueError(f'Invalid resample mode "{mode}"; use keep, up or down')


def mp_silu(x):
    """SiLU divided by its output RMS for unit-normal input (0.596), so activations keep unit magnitude."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """(1-t)*a + t*b, rescaled to unit magnitude for uncorrelated unit-magnitude a and b (paper eq. 88)."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation that weights a by (1-t) and b by t, each relative to its channel count, at unit total magnitude."""
    Na, Nb = a.shape[dim], b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C / np.sqrt(Na) * (1 - t)), b * (C / np.sqrt(Nb) * t)], dim=dim)

# ----------------------------------------------------------------------------
# Fourier features of the noise level: random frequencies and phases, unit output magnitude.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * np.sqrt(2)).to(x.dtype)

# ----------------------------------------------------------------------------
# Convolution (kernel [kh,kw]) or fully connected layer (kernel []) with a normalised, magnitude-preserving weight.

@persistence.persistent_class
class MPConv(torch.nn.Module):
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        if self.training:
            # Forced weight normalisation: the stored weight itself is kept at unit norm per output channel.
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
        w = self.weight.to(torch.float32)
        if self.training:
            w = w.clone()  # autograd keeps the copy, so a later forward may renormalise the weight in place
        w = normalize(w)  # weight normalisation on use (a no-op up to eps after the in-place step)
        w = w * (gain / np.sqrt(w[0].numel()))  # unit output magnitude for unit input magnitude
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))

# ----------------------------------------------------------------------------
# Residual block: optional resampling, two 3x3 convolutions modulated by the embedding, optional self-attention.
# 'enc' blocks normalise their input pixel-wise (after a 1x1 skip convolution if the width changes); 'dec' blocks
# apply the skip convolution to the residual path's input instead.

@persistence.persistent_class
class Block(torch.nn.Module):
    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        emb_channels,                   # Number of embedding channels.
        flavor              = 'enc',    # 'enc' or 'dec'.
        resample_mode       = 'keep',   # 'keep', 'up' or 'down'.
        resample_filter     = [1,1],    # Resampling filter taps.
        attention           = False,    # Self-attention after the residual branch?
        channels_per_head   = 64,       # Channels per attention head.
        dropout             = 0,        # Dropout probability in the residual branch (train mode only).
        res_balance         = 0.3,      # Weight t of the residual branch in mp_sum.
        attn_balance        = 0.3,      # Weight t of the attention branch in mp_sum.
        clip_act            = 256,      # Clip output activations to [-clip_act, clip_act]; None = no clipping.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))  # zero: the embedding starts without effect
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3,3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3,3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1,1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1,1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1,1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated channel-wise by 1 + the embedding (float32 path, cast at the multiply).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention with cosine-similarity logits: q, k, v are normalised per head and pixel.
        if self.num_heads != 0:
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])  # channels as (head, c, qkv)
            q, k, v = normalize(y, dim=2).unbind(3)
            w = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum('nhqk,nhck->nhcq', w, v)
            y = self.attn_proj(y.reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

# ----------------------------------------------------------------------------
# The UNet (paper Fig. 21): encoder blocks whose every output is a skip, a decoder that concatenates them back.

@persistence.persistent_class
class UNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Image channels.
        label_dim,                          # Class label dimensionality. 0 = unconditional.
        model_channels      = 192,          # Base channel count.
        channel_mult        = [1,2,3,4],    # Channel multiplier per resolution.
        channel_mult_noise  = None,         # Noise embedding width / model_channels. None = channel_mult[0].
        channel_mult_emb    = None,         # Embedding width / model_channels. None = max(channel_mult).
        num_blocks          = 3,            # Residual blocks per resolution (the decoder has one more).
        attn_resolutions    = [16,8],       # Resolutions with self-attention.
        label_balance       = 0.5,          # Weight t of the class embedding against the noise embedding.
        concat_balance      = 0.5,          # Weight t of the skip connection against the main path.
        guidance_embed      = False,        # Take a guidance strength w (guided-distillation students; not in EDM2)?
        **block_kwargs,                     # Block keywords.
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))  # zero: the network starts as D(x) = c_skip * x

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None
        # Guidance strength w (Meng et al. 2023), added to the embedding with a zero-initialised gain, so that a new
        # student equals its teacher.
        self.emb_guidance_fourier = MPFourier(cnoise) if guidance_embed else None
        self.emb_guidance = MPConv(cnoise, cemb, kernel=[]) if guidance_embed else None
        self.emb_guidance_gain = torch.nn.Parameter(torch.zeros([])) if guidance_embed else None

        # Encoder. The input gets a constant channel of ones, which gives the first convolution an offset.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, kernel=[3,3])
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                self.enc[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='enc', attention=(res in attn_resolutions), **block_kwargs)

        # Decoder: each block takes the main path concatenated with the matching encoder output.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f'{res}x{res}_block{idx}'] = Block(cin, cout, cemb, flavor='dec', attention=(res in attn_resolutions), **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, kernel=[3,3])

    def forward(self, x, noise_labels, class_labels, guidance=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            # One-hot labels scaled to unit RMS, balanced against the noise embedding.
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        if self.emb_guidance is not None:
            w = torch.as_tensor(0 if guidance is None else guidance, device=emb.device).to(torch.float32).reshape(-1)
            emb = emb + self.emb_guidance(self.emb_guidance_fourier(w), gain=self.emb_guidance_gain)
        elif guidance is not None:
            raise ValueError('guidance=w given, but this network has no guidance input (guidance_embed=False); only '
                             'guided-distillation students take it (drop generate.py --guidance)')
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if 'conv' in name else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if 'block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

# ----------------------------------------------------------------------------
# Preconditioning (EDM's c_skip, c_out, c_in, c_noise with sigma_data = 0.5) and the per-sigma log-variance head
# u(sigma) of the loss weighting (paper Sec. 5 / eq. 21), which sampling ignores.

def _backbone_dtype(net, x, force_fp32):
    """The backbone's precision: the project's run-wide --precision when training.networks is loaded (None there =
    EDM2's rule), else EDM2's rule: float16 when use_fp16 and on CUDA. fp16 on a use_fp16 network is EDM2's own
    float16 path (the main path cast, the embeddings in float32), other choices autocast. Returns (dtype, autocast
    dtype or None)."""
    run = getattr(sys.modules.get('training.networks'), '_precision', None)
    edm2_fp16 = net.use_fp16 and x.device.type == 'cuda'
    if force_fp32 or run == 'fp32':
        return torch.float32, None
    if run == 'bf16' or (run == 'fp16' and not edm2_fp16):
        return torch.float32, dict(bf16=torch.bfloat16, fp16=torch.float16)[run]
    return (torch.float16 if edm2_fp16 else torch.float32), None


@persistence.persistent_class
class Precond(torch.nn.Module):
    def __init__(self,
        img_resolution,         # Image resolution.
        img_channels,           # Image channels.
        label_dim,              # Class label dimensionality. 0 = unconditional.
        use_fp16        = True, # Run the backbone in float16 on CUDA?
        sigma_data      = 0.5,  # Expected standard deviation of the training data.
        logvar_channels = 128,  # Fourier features of the log-variance head.
        **unet_kwargs,          # UNet keywords.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    # The noise levels EDM's samplers clamp to (EDM2's sampler uses 0.002..80 without clamping: any sigma works),
    # and EDM2's sampler defaults where they differ from EDM's (generate_images.py: 32 Heun steps, 63 NFE).
    sigma_min = 0
    sigma_max = float('inf')
    sampler_defaults = dict(num_steps=32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, augment_labels=None, **unet_kwargs):
        if augment_labels is not None:  # EDM's losses pass augment_labels=None to any network they train
            raise ValueError('EDM2 networks take no augmentation labels; train them without --augment')
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype, autocast = _backbone_dtype(self, x, force_fp32)

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
        return D_x, logvar

@torch.no_grad()
def force_weight_normalization(net):
    """EDM2's forced weight normalisation for networks trained outside train mode (this project's distillation keeps
    its networks in eval mode, without dropout): every trainable MPConv weight of `net` becomes normalize(w). Applied
    after every update, the next eval-mode forward computes normalize(normalize(w)), as EDM2's train mode does."""
    for module in net.modules():
        if isinstance(module, MPConv) and module.weight.requires_grad:
            module.weight.copy_(normalize(module.weight.to(torch.float32)))

# ----------------------------------------------------------------------------
# The other objects of an EDM2 snapshot: the pixel encoder and the training loss (paper eq. 21), so that the
# pickles this project writes have EDM2's layout and EDM2's own files load safely.

@persistence.persistent_class
class StandardRGBEncoder:
    """uint8 RGB pixels <-> [-1, 1] (EDM2's encoder for pixel-space models such as img64)."""
    def init(self, device):  # EDM2's readers call this before decoding; nothing to set up
        pass

    def encode(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


@persistence.persistent_class
class EDM2Loss:
    """Denoising loss with EDM2's learned uncertainty: weight(sigma) / exp(u) * |D - y|^2 + u, log-normal sigma."""
    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None):
        sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        denoised, logvar = net(images + torch.randn_like(images) * sigma, sigma, labels, return_logvar=True)
        return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


def edm2_snapshot(net, dataset_kwargs=None):
    """What EDM2 pickles for a network (its training loop and reconstruct_phema.py): a dict with keys encoder,
    dataset_kwargs, loss_fn, ema; `ema` a frozen eval-mode float16 copy on the CPU. pickle.dump it to write a file
    EDM2's generate_images.py reads."""
    from dnnlib import EasyDict  # both this project and EDM2 have dnnlib.EasyDict (imported here: EDM2 execs this source)
    ema = copy.deepcopy(net).cpu().eval().requires_grad_(False).to(torch.float16)
    return EasyDict(encoder=StandardRGBEncoder(), dataset_kwargs=EasyDict(dataset_kwargs or {}), loss_fn=EDM2Loss(), ema=ema)
