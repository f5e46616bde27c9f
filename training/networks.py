"""EDM-compatible networks: SongUNet (DDPM++/NCSN++), DhariwalUNet (ADM) and the VP/VE/iDDPM/EDM preconditioners.

Class names, constructor keywords and state-dict layout follow EDM (Karras et al. 2022), so official weights load
with `strict=True` and give the same outputs. This module's source is embedded into every pickle it writes and
executed by EDM-derived readers: it may import only the standard library, numpy, torch and torch_utils.persistence.
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch_utils import persistence

# ----------------------------------------------------------------------------
# Initial weights by name, scaled by fan-in/fan-out (EDM's `init_mode` values).

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init_mode "{mode}"; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal')

# ----------------------------------------------------------------------------
# Fully connected layer; weights are cast to the input dtype so the backbone can run in fp16.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **init_kwargs) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **init_kwargs) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

# ----------------------------------------------------------------------------
# Convolution with optional 2x up/downsampling by a separable FIR filter. kernel=0 is a parameter-free resampler.
# The filter is a buffer `[1,1,k,k]` (outer product of the 1-D taps, normalised to sum 1), present only when resampling.

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    def __init__(self,
        in_channels, out_channels, kernel, bias=True, up=False, down=False,
        resample_filter=[1,1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0,
    ):
        if up and down:
            raise ValueError('Conv2d cannot both upsample and downsample; set at most one of up, down')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.box_filter = len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]  # [1,1]: fast exact path
        init_kwargs = dict(mode=init_mode, fan_in=in_channels*kernel*kernel, fan_out=out_channels*kernel*kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **init_kwargs) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **init_kwargs) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            # Upsample without cropping, then a valid convolution: output 2H (unused by the official configs).
            x = _upsample(x, f, padding=max(f_pad - w_pad, 0), box=self.box_filter)
            return F.conv2d(x, w, b, padding=max(w_pad - f_pad, 0))
        if self.fused_resample and self.down and w is not None:
            # NCSN++'s FIR-downsampling convolution: convolve at full resolution with extra padding, then filter+decimate.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = _downsample(x, f, padding=0)
            return x.add_(b.reshape(1, -1, 1, 1)) if b is not None else x
        if self.up:
            x = _upsample(x, f, padding=f_pad, box=self.box_filter)
        if self.down:
            x = _downsample(x, f, padding=f_pad)
        if w is not None:
            x = F.conv2d(x, w, b, padding=w_pad)
        return x

# 2x upsampling: transposed depthwise convolution with the filter times 4 (the filter sums to 1 per output phase).
def _upsample(x, f, padding, box):
    if box and padding == 0:
        # With a 2-tap box filter each output pixel is 1.0 times one input pixel: nearest-neighbour, bit-exact and faster.
        return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    C = x.shape[1]
    return F.conv_transpose2d(x, f.mul(4).tile([C, 1, 1, 1]), groups=C, stride=2, padding=padding)

# 2x downsampling: depthwise convolution with the filter at stride 2.
def _downsample(x, f, padding):
    C = x.shape[1]
    return F.conv2d(x, f.tile([C, 1, 1, 1]), groups=C, stride=2, padding=padding)

# ----------------------------------------------------------------------------
# Group normalisation with EDM's group count: min(num_groups, C // min_channels_per_group).

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    # On x's dtype, autocast off: CUDA autocast lists group_norm as an fp32 op (CPU autocast does not), which would
    # make every norm and SiLU activation fp32 on a GPU. The kernels accumulate in fp32 (EDM's use_fp16 path).
    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

# ----------------------------------------------------------------------------
# Multi-head self-attention over pixels. qkv: [N, 3*C, H, W], channels ordered (head, channel-in-head, {q,k,v}) as in
# EDM's weights (i.e. [N*heads, C/heads, 3, H*W] with q, k, v on the "3" axis) -> [N, C, H, W]. Scaled by
# 1/sqrt(C/heads) like EDM's einsum version. q, k, v are laid out contiguously as [N, heads, pixels, C/heads] so that
# the fused (flash) kernel runs instead of the [pixels, pixels] math fallback.
def attention_op(qkv, num_heads):
    N, C, H, W = qkv.shape[0], qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
    q, k, v = qkv.reshape(N, num_heads, C // num_heads, 3, H * W).permute(3, 0, 1, 4, 2).contiguous().unbind(0)
    # Contiguous NCHW out: with one head the reshape is a channels-last view, which would spread to every later layer.
    return F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(N, C, H, W).contiguous()

# SiLU in place when no graph is recorded (saves a full-size buffer); under autograd in place would clone its input.
def _silu(x):
    return F.silu(x, inplace=not x.requires_grad)

# ----------------------------------------------------------------------------
# Dropout keyed by sample. Inside `keyed_dropout(keys)` (the training loop's steps) a mask element is a hash of
# (its sample's key, the dropout call's index in the block, the element's index), so a sample gets the same masks
# on any rank, in any accumulation round and batch: training with dropout is then world-size invariant. The hash
# uses int64 arithmetic on values below 2^63 only, so CPU and CUDA compute the same bits. Outside the block (and in
# EDM-derived readers of our pickles) dropout draws from torch's RNG as usual.

_keys = None        # [N] int64 per-sample keys in [0, 2^32) of the batch being evaluated, or None
_calls = 0          # keyed dropout calls so far in the current block

def _hash32(x):
    """Multiply, xorshift, multiply (mod 2^32) on int64 values in [0, 2^32), in place: the high bits, which the keep
    test reads, depend on every input bit. Products stay below 2^32 * 2^31, so int64 never overflows."""
    x *= 0x21f0aaad
    x &= 0xffffffff
    x ^= x >> 16
    x *= 0x735a2d97
    x &= 0xffffffff
    return x


class keyed_dropout:
    """Context: dropout masks keyed by `keys` ([N] ints in [0, 2^32), one per sample of the batch)."""
    def __init__(self, keys):
        self.keys = keys

    def __enter__(self):
        global _keys, _calls
        _keys, _calls = self.keys, 0

    def __exit__(self, *exc_info):
        global _keys
        _keys = None


def _keep(shape, p, device):
    """Boolean mask of `shape` ([N, ...]) with P(True) = 1 - p: keyed inside keyed_dropout, else torch's RNG."""
    global _calls
    if _keys is None:
        return torch.rand(shape, device=device) >= p
    if _keys.shape[0] != shape[0]:
        raise ValueError(f'keyed_dropout has {_keys.shape[0]} keys for a batch of {shape[0]}')
    call_keys = _hash32(_hash32((_keys.to(device) + _calls * 0x9e3779b9) & 0xffffffff))  # one key per sample and call
    _calls += 1
    index = torch.arange(int(np.prod(shape[1:])), dtype=torch.int64, device=device)
    return (_hash32(index ^ call_keys[:, None]) >= round(p * 2**32)).reshape(shape)


def _dropout(x, p):
    if _keys is None:
        return F.dropout(x, p=p, training=True)
    return x * (_keep(x.shape, p, x.device) * (1 / (1 - p))).to(x.dtype)

# ----------------------------------------------------------------------------
# Residual block: GroupNorm-SiLU-Conv twice, conditioned on the embedding, optional resampling and self-attention.
# The qkv channels are ordered (head, channel-in-head, {q,k,v}), as in EDM's weights.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
        num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
        resample_filter=[1,1], resample_proj=False, adaptive_scale=True,
        init=dict(), init_zero=dict(init_weight=0), init_attn=None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        # A block asked for attention with fewer than channels_per_head channels gets 0 heads, i.e. none (as in EDM).
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = float(skip_scale)  # a Python float: numpy scalars become float64 tensors in every multiply
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels*(2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels*3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(_silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = _silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = _silu(self.norm1(x.add_(params)))
        if self.dropout and self.training:
            x = _dropout(x, self.dropout)
        x = self.conv1(x)
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        if self.skip_scale != 1:
            x = x.mul_(self.skip_scale)

        if self.num_heads:
            x = self.proj(attention_op(self.qkv(self.norm2(x)), self.num_heads)).add_(x)
            if self.skip_scale != 1:
                x = x.mul_(self.skip_scale)
        return x

# ----------------------------------------------------------------------------
# Sinusoidal embedding of the noise level (DDPM++ / ADM). endpoint=True spreads the frequencies up to 1/max_positions.

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        freqs = torch.arange(start=0, end=self.num_channels//2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

# ----------------------------------------------------------------------------
# Random Fourier features of the noise level (NCSN++). `freqs` is a buffer so every rank can be given the same draw.

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

# ----------------------------------------------------------------------------
# Guidance strength w of guided-distillation students (Meng et al. 2023): `map_guidance` embeds w sinusoidally,
# `map_guidance_layer` (zero-initialised) adds it to the noise embedding, so a new student equals its teacher.
# guidance: None (w = 0), a number or an [N] tensor; a network built without guidance_embed rejects it.

def _add_guidance(net, emb, guidance):
    if net.map_guidance_layer is None:
        if guidance is not None:
            raise ValueError('guidance=w given, but this network has no guidance input (guidance_embed=False); only '
                             'guided-distillation students take it (drop generate.py --guidance)')
        return emb
    w = torch.as_tensor(0 if guidance is None else guidance, device=emb.device).to(torch.float32).reshape(-1)
    return emb + net.map_guidance_layer(net.map_guidance(w)).to(emb.dtype)

# ----------------------------------------------------------------------------
# DDPM++ / NCSN++ backbone (Song et al. 2021, as reconfigured in EDM).

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.
        model_channels      = 128,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,2,2],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 4,            # Number of residual blocks per resolution.
        attn_resolutions    = [16],         # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels (classifier-free guidance).
        embedding_type      = 'positional', # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise  = 1,            # Noise embedding channels = model_channels * this.
        encoder_type        = 'standard',   # Encoder: 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type        = 'standard',   # Decoder: 'standard' or 'skip' (NCSN++).
        resample_filter     = [1,1],        # Resampling filter taps: [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
        guidance_embed      = False,        # Take a guidance strength w (guided-distillation students)?
        mid_blocks          = True,         # Start the deepest decoder level with in0 (attention) and in1? False = compressed (KD) student.
    ):
        if embedding_type not in ['fourier', 'positional']:
            raise ValueError(f'Invalid embedding_type "{embedding_type}"; use "positional" or "fourier"')
        if encoder_type not in ['standard', 'skip', 'residual']:
            raise ValueError(f'Invalid encoder_type "{encoder_type}"; use "standard", "skip" or "residual"')
        if decoder_type not in ['standard', 'skip']:
            raise ValueError(f'Invalid decoder_type "{decoder_type}"; use "standard" or "skip"')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network: noise level (+ class, + augmentation labels) -> embedding.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_guidance = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if guidance_embed else None
        self.map_guidance_layer = Linear(in_features=noise_channels, out_features=noise_channels, init_weight=0) if guidance_embed else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder: attention only on the last block of a level; the deepest level starts with in0 (attention), in1.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                if mid_blocks:
                    self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                    self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, guidance=None):
        # Mapping: the positional embedding's [cos, sin] halves are swapped to [sin, cos], as DDPM++ was trained.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        emb = _add_guidance(self, emb, guidance)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * _keep([x.shape[0], 1], self.label_dropout, x.device).to(tmp.dtype)
            emb = emb + self.map_label(tmp * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder; `aux` carries the downsampled input image for the skip/residual encoders.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; `aux` accumulates the output image across levels for the skip decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

# ----------------------------------------------------------------------------
# ADM backbone (Dhariwal & Nichol 2021, as reconfigured in EDM).

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.
        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 3,            # Number of residual blocks per resolution.
        attn_resolutions    = [32,16,8],    # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels (classifier-free guidance).
        mid_blocks          = True,         # Start the deepest decoder level with in0 (attention) and in1? False = compressed (KD) student.
        guidance_embed      = False,        # Take a guidance strength w (guided-distillation students)?
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_guidance = PositionalEmbedding(num_channels=model_channels) if guidance_embed else None
        self.map_guidance_layer = Linear(in_features=model_channels, out_features=model_channels, init_weight=0) if guidance_embed else None
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                if mid_blocks:
                    self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                    self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, guidance=None):
        # Mapping: no SiLU after map_layer1 until the (bias-free) label embedding has been added.
        emb = self.map_noise(noise_labels)
        emb = _add_guidance(self, emb, guidance)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * _keep([x.shape[0], 1], self.label_dropout, x.device).to(tmp.dtype)
            emb = emb + self.map_label(tmp)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))

# ----------------------------------------------------------------------------
# Shared by the preconditioners.

# The backbone named by `model_type`, with a clear error for anything else.
def _backbone(model_type, **kwargs):
    backbones = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)
    if model_type not in backbones:
        raise ValueError(f'Invalid model_type "{model_type}"; use "SongUNet" or "DhariwalUNet"')
    return backbones[model_type](**kwargs)

# Inputs in float32: sigma (scalar or [N]) as [N|1,1,1,1], labels None / zeros [1,label_dim] / [N,label_dim].
def _prepare(net, x, sigma, class_labels):
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
    return x, sigma, class_labels

# The run's backbone precision, set for every network of this module at once (one setting per run):
# None keeps EDM's rule (each network's stored use_fp16: its backbone in fp16 on CUDA); 'fp32', 'bf16' or
# 'fp16' run every backbone in that precision (bf16/fp16 by autocast), whatever use_fp16 says. Preconditioning,
# inputs and outputs stay float32 in every case.
PRECISIONS = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
_precision = None

@contextlib.contextmanager
def backbone_precision(precision):
    global _precision
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f'Unknown precision "{precision}"; use fp32, bf16 or fp16')
    prev, _precision = _precision, precision
    try:
        yield
    finally:
        _precision = prev

# Autocast to the run's precision (a no-op for None and fp32), for other networks of the run (LPIPS).
def autocast(device):
    enabled = _precision in ('bf16', 'fp16')
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[_precision] if enabled else None, enabled=enabled)

# EDM's rule, for a network run outside any backbone_precision block (the API, generate.py's --precision=auto,
# EDM's tools): its stored use_fp16 means fp16 on CUDA, else fp32.
def edm_precision(net, device):
    return 'fp16' if getattr(net, 'use_fp16', False) and torch.device(device).type == 'cuda' else 'fp32'

# The backbone on float32 inputs in the run's precision (force_fp32: float32 always); float32 output. One path for
# every precision, EDM's rule included, so that the API and generate.py sample a use_fp16 network alike.
def _run_backbone(net, x, noise_labels, class_labels, force_fp32, model_kwargs):
    precision = 'fp32' if force_fp32 else _precision or edm_precision(net, x.device)
    if precision == 'fp32':
        with torch.autocast(x.device.type, enabled=False):
            return net.model(x, noise_labels, class_labels=class_labels, **model_kwargs).to(torch.float32)
    with torch.autocast(x.device.type, dtype=PRECISIONS[precision]):
        return net.model(x, noise_labels, class_labels=class_labels, **model_kwargs).to(torch.float32)

# ----------------------------------------------------------------------------
# VP preconditioning (Song et al. 2021 "DDPM++ cont. (VP)"), EDM Table 1.

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the backbone in fp16 on CUDA?
        beta_d          = 19.9,         # Extent of the noise level schedule.
        beta_min        = 0.1,          # Initial slope of the noise level schedule.
        M               = 1000,         # Original number of timesteps in the DDPM formulation.
        epsilon_t       = 1e-5,         # Minimum t-value used during training.
        model_type      = 'SongUNet',   # Backbone class name.
        **model_kwargs,                 # Keyword arguments for the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        with torch.device('cpu'):  # plain numbers, also when the network is built on the meta device
            self.sigma_min = float(self.sigma(epsilon_t))   # float32 as in EDM (0.000977: exp(x)-1 cancels at t=1e-5)
            self.sigma_max = float(self.sigma(1))
        self.model = _backbone(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare(self, x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        F_x = _run_backbone(self, c_in * x, c_noise.flatten(), class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x

    # sigma(t) of the VP SDE.
    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    # t(sigma), the inverse of sigma(t).
    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    # Continuous-time model: any sigma is representable.
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

# ----------------------------------------------------------------------------
# VE preconditioning (Song et al. 2021 "NCSN++ cont. (VE)"), EDM Table 1.

@persistence.persistent_class
class VEPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                 # Image resolution.
        img_channels,                   # Number of color channels.
        label_dim       = 0,            # Number of class labels, 0 = unconditional.
        use_fp16        = False,        # Run the backbone in fp16 on CUDA?
        sigma_min       = 0.02,         # Minimum supported noise level.
        sigma_max       = 100,          # Maximum supported noise level.
        model_type      = 'SongUNet',   # Backbone class name.
        **model_kwargs,                 # Keyword arguments for the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _backbone(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare(self, x, sigma, class_labels)
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        F_x = _run_backbone(self, c_in * x, c_noise.flatten(), class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x

    # Continuous-time model: any sigma is representable.
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

# ----------------------------------------------------------------------------
# Improved DDPM preconditioning (Nichol & Dhariwal 2021), EDM Table 1: a discrete set of M noise levels `u`.

@persistence.persistent_class
class iDDPMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of class labels, 0 = unconditional.
        use_fp16        = False,            # Run the backbone in fp16 on CUDA?
        C_1             = 0.001,            # Timestep adjustment at low noise levels.
        C_2             = 0.008,            # Timestep adjustment at high noise levels.
        M               = 1000,             # Original number of timesteps in the DDPM formulation.
        model_type      = 'DhariwalUNet',   # Backbone class name.
        **model_kwargs,                     # Keyword arguments for the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        # The backbone also predicts the variance (2*C channels); only the first C are used.
        self.model = _backbone(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels*2, label_dim=label_dim, **model_kwargs)

        # u[j] = noise level of DDPM step j, by EDM's recurrence from u[M] = 0 (float32, as the official buffer).
        with torch.device('cpu'):  # a table of numbers, also when the network is built on the meta device
            u = torch.zeros(M + 1)
            for j in range(M, 0, -1):
                u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer('u', u)
        self.sigma_min = float(u[M - 1])
        self.sigma_max = float(u[0])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare(self, x, sigma, class_labels)
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        F_x = _run_backbone(self, c_in * x, c_noise.flatten(), class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x[:, :self.img_channels]

    # Cosine schedule of the DDPM formulation.
    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * np.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    # Snap sigma to a level u[j] (or return j) as EDM defines it: the argmin of torch.cdist in float32. For 1001 levels
    # cdist computes |a|^2 + |b|^2 - 2ab, whose cancellation picks a neighbour of the exactly nearest level for about
    # 0.2% of sigmas; EDM's iDDPM networks sample with that choice, so it is reproduced, not the exact nearest.
    # Keeps sigma's shape, dtype and device.
    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(self.u.device, torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(dim=2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)

# ----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1), unit-variance network inputs and targets at every sigma.

@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of class labels, 0 = unconditional.
        use_fp16        = False,            # Run the backbone in fp16 on CUDA?
        sigma_min       = 0,                # Minimum supported noise level.
        sigma_max       = float('inf'),     # Maximum supported noise level.
        sigma_data      = 0.5,              # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet',   # Backbone class name.
        **model_kwargs,                     # Keyword arguments for the backbone.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _backbone(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x, sigma, class_labels = _prepare(self, x, sigma, class_labels)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        F_x = _run_backbone(self, c_in * x, c_noise.flatten(), class_labels, force_fp32, model_kwargs)
        return c_skip * x + c_out * F_x

    # Continuous-time model: any sigma is representable.
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

# ----------------------------------------------------------------------------
