"""Per-sample image distances for regression losses: LPIPS-VGG, L2 and pseudo-Huber, each forward(x, y) -> [N].

Images are in the generator's pixel space [-1, 1], shape [N, C, H, W].
"""

import torch
import torch.nn.functional as F

import dnnlib
from training import networks

# torchvision's ImageNet VGG16 (its `features.*` convolutions are LPIPS-VGG's backbone).
VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
# The LPIPS v0.1 linear heads for VGG, as shipped inside the `lpips` package (lpips/weights/v0.1/vgg.pth).
LPIPS_VGG_URL = 'https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth'

# VGG16's 13 convolutions: (our name, torchvision's index in `features`, in channels, out channels).
# A 2x2 max-pool precedes each of stages 2..5; LPIPS taps the ReLU after the last conv of every stage.
_VGG16_CONVS = [
    ('conv1_1', 0, 3, 64), ('conv1_2', 2, 64, 64),
    ('conv2_1', 5, 64, 128), ('conv2_2', 7, 128, 128),
    ('conv3_1', 10, 128, 256), ('conv3_2', 12, 256, 256), ('conv3_3', 14, 256, 256),
    ('conv4_1', 17, 256, 512), ('conv4_2', 19, 512, 512), ('conv4_3', 21, 512, 512),
    ('conv5_1', 24, 512, 512), ('conv5_2', 26, 512, 512), ('conv5_3', 28, 512, 512),
]
_STAGE_ENDS = ['conv1_2', 'conv2_2', 'conv3_3', 'conv4_3', 'conv5_3']
_LIN_CHANNELS = [64, 128, 256, 512, 512]

# ----------------------------------------------------------------------------

def _load_state_dict(path_or_url):
    """A plain tensor dict through open_url (path, file:// or cached http), never executing code."""
    with dnnlib.util.open_url(path_or_url) as f:
        return torch.load(f, map_location='cpu', weights_only=True)


def _take(sd, key, shape, source):
    """One tensor from a foreign state dict, with a one-line error naming the file when it is not the right one."""
    if key not in sd or tuple(sd[key].shape) != tuple(shape):
        found = tuple(sd[key].shape) if key in sd else 'missing'
        raise ValueError(f'"{source}" is not the expected weight file: "{key}" should be {list(shape)}, got {found}')
    return sd[key]


class LPIPS(torch.nn.Module):
    """LPIPS-VGG (Zhang et al. 2018, v0.1): unit-normalised VGG16 features, squared differences, learned 1x1 heads.

    State-dict keys: `conv1_1.weight`, `conv1_1.bias`, ..., `conv5_3.bias` (VGG16's convolutions, named by stage
    and position) and `lin0.weight` .. `lin4.weight` ([1, C, 1, 1], no bias). Parameters are frozen; gradients flow
    to the inputs. `resolution` resizes both inputs bilinearly first (DMD uses 224).
    """

    def __init__(self, vgg=VGG16_URL, lin=LPIPS_VGG_URL, resolution=None):
        super().__init__()
        self.resolution = resolution
        try:
            vgg_sd, lin_sd = _load_state_dict(vgg), _load_state_dict(lin)
        except OSError as e:
            raise OSError(f'LPIPS-VGG needs two weight files: the VGG16 backbone {VGG16_URL} and the LPIPS heads '
                          f'{LPIPS_VGG_URL} (`pip install --no-deps lpips` ships them as lpips/weights/v0.1/vgg.pth); '
                          f'download them and pass their local paths (train.py --lpips-vgg=PATH --lpips-lin=PATH; '
                          f'LPIPS(vgg=PATH, lin=PATH)) ({e})') from e
        for name, index, c_in, c_out in _VGG16_CONVS:
            conv = torch.nn.utils.skip_init(torch.nn.Conv2d, c_in, c_out, kernel_size=3, padding=1)  # no random init
            conv.weight.data.copy_(_take(vgg_sd, f'features.{index}.weight', conv.weight.shape, vgg))
            conv.bias.data.copy_(_take(vgg_sd, f'features.{index}.bias', conv.bias.shape, vgg))
            setattr(self, name, conv)
        for k, c in enumerate(_LIN_CHANNELS):
            # The lpips package stores each head as Sequential(Dropout, Conv2d): hence `.model.1.`.
            head = torch.nn.utils.skip_init(torch.nn.Conv2d, c, 1, kernel_size=1, bias=False)
            head.weight.data.copy_(_take(lin_sd, f'lin{k}.model.1.weight', head.weight.shape, lin))
            setattr(self, f'lin{k}', head)
        # LPIPS's fixed input normalisation, applied to [-1, 1] images (non-persistent: not in the state dict).
        self.register_buffer('shift', torch.tensor([-.030, -.088, -.188]).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor([.458, .448, .450]).reshape(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)

    def features(self, x):
        """The five ReLU taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)."""
        taps = []
        for name, _index, _c_in, _c_out in _VGG16_CONVS:
            if name.endswith('_1') and name != 'conv1_1':
                x = F.max_pool2d(x, kernel_size=2, stride=2)
            x = F.relu(getattr(self, name)(x))
            if name in _STAGE_ENDS:
                taps.append(x)
        return taps

    def forward(self, x, y):
        if x.shape[1] == 1:  # grayscale: VGG expects RGB
            x, y = x.repeat([1, 3, 1, 1]), y.repeat([1, 3, 1, 1])
        if self.resolution is not None:
            size = (self.resolution, self.resolution)
            x = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
            y = F.interpolate(y, size=size, mode='bilinear', align_corners=False)
        # One pass over both batches (the backbone dominates the cost), in the run's precision; the rest in fp32.
        with networks.autocast(x.device):
            taps = self.features((torch.cat([x, y]).to(torch.float32) - self.shift) / self.scale)
        d = 0
        for k, f in enumerate(taps):
            f = f.to(torch.float32)
            f = f / (f.square().sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            fx, fy = f.chunk(2)
            d = d + getattr(self, f'lin{k}')((fx - fy).square()).mean(dim=[1, 2, 3])
        return d

# ----------------------------------------------------------------------------

class L2(torch.nn.Module):
    """Mean squared error per sample."""

    def forward(self, x, y):
        return (x - y).square().flatten(1).mean(dim=1)


class PseudoHuber(torch.nn.Module):
    """sqrt(|x - y|^2 + c^2) - c per sample, c = 0.00054 sqrt(C*H*W) (Song & Dhariwal 2023, improved CT)."""

    def forward(self, x, y):
        c = 0.00054 * x[0].numel() ** 0.5
        return ((x - y).square().flatten(1).sum(dim=1) + c ** 2).sqrt() - c

# ----------------------------------------------------------------------------

_distances = {'lpips': LPIPS, 'l2': L2, 'pseudo_huber': PseudoHuber}


def make_distance(name, **kwargs):
    """'lpips' | 'l2' | 'pseudo_huber' -> a module whose forward(x, y) returns a per-sample [N] distance."""
    if name not in _distances:
        raise ValueError(f'Unknown distance "{name}": choose one of {", ".join(_distances)}')
    return _distances[name](**kwargs)
