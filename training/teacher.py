"""Teacher training (`--method=edm`): EDM's denoising objective, as one method of the shared training loop.

Loss reduction, as EDM's training loop: the per-pixel loss summed over pixels and divided by the batch
(`loss.sum().mul(loss_scaling / batch_gpu_total)`); no gradient clipping (EDM has none: `--grad-clip` is refused).
"""

import copy

import torch

import dnnlib
from torch_utils import distributed, training_stats
from training import optim
from training.ema import EMA

# ----------------------------------------------------------------------------

def transfer_plan(net, source):
    """What copy_matching(net, source) does: (names of net it keeps because source lacks them, names of source it
    drops because net lacks them). A tensor both have with different shapes is a ValueError (EDM: an error too)."""
    ours, theirs = net.state_dict(), source.state_dict()
    bad = [f'{k} {list(theirs[k].shape)} vs {list(v.shape)}' for k, v in ours.items() if k in theirs and theirs[k].shape != v.shape]
    if bad:
        raise ValueError(f'{len(bad)} tensors have other shapes than in the network being trained ({"; ".join(bad[:3])}); '
                         f'pick a pickle of the same architecture (--arch, --cbase, --cres)')
    return [k for k in ours if k not in theirs], [k for k in theirs if k not in ours]


@torch.no_grad()
def copy_matching(net, source):
    """EDM's copy_params_and_buffers(require_all=False): every tensor of net that source has by name is copied."""
    transfer_plan(net, source)
    theirs = source.state_dict()
    for name, t in net.state_dict().items():
        if name in theirs:
            t.copy_(theirs[name])


class EDM:
    def __init__(self,
        device,                         # torch.device of this rank
        dataset,                        # training data (gives resolution, channels, label_dim)
        batch_size,                     # global batch
        network_kwargs,                 # class_name + constructor keywords of the preconditioned network
        loss_kwargs,                    # class_name + keywords of VPLoss / VELoss / EDMLoss
        optimizer_kwargs,               # class_name + keywords of the optimizer (lr is the base lr)
        augment_kwargs      = None,     # AugmentPipe keywords, or None
        ema_halflife_kimg   = 500,      # EMA half-life in thousands of images
        ema_rampup_ratio    = 0.05,     # EMA half-life ramp-up, None = off
        lr_rampup_kimg      = 10000,    # learning-rate warm-up
        transfer            = None,     # network whose weights initialise ours (fine-tuning)
        teacher             = None,     # unused: teacher training starts from scratch
        sample_steps        = 18,       # Heun steps of preview samples
    ):
        self.device = device
        self.batch_size = batch_size
        self.per_rank_batch = batch_size // distributed.get_world_size()
        self.label_dim = dataset.label_dim
        interface = dict(img_resolution=dataset.resolution, img_channels=dataset.num_channels, label_dim=dataset.label_dim)
        self.net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface).train().requires_grad_(True).to(device)
        if transfer is not None:
            copy_matching(self.net, transfer)
        self.loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
        self.augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
        self.lr = optimizer_kwargs['lr']
        self.optimizer = optim.Updater(self.net.parameters(), 'net', **optimizer_kwargs)  # EDM does not clip gradients
        self.ema = EMA(self.net, ema_halflife_kimg, ema_rampup_ratio)
        self.lr_rampup_kimg = lr_rampup_kimg
        self.sample_steps = sample_steps

    def _loss(self, r):
        """One round's per-pixel loss (the caller sums it)."""
        with r.keyed_dropout():
            loss = self.loss_fn(self.net, r.images, r.labels, self.augment_pipe, rnd=r)
        return training_stats.report('Loss/loss', loss)

    def step(self, rounds, cur_nimg):
        self.optimizer.backward(rounds, self._loss, self.per_rank_batch)
        self.optimizer.step(optim.rampup_lr(self.lr, cur_nimg, self.lr_rampup_kimg))
        self.ema.update(cur_nimg + self.batch_size, self.batch_size)

    def networks(self):
        return dict(net=self.net, ema=self.ema.ema)

    def snapshot(self):
        return dict(ema=copy.deepcopy(self.ema.ema).cpu(), loss_fn=self.loss_fn, augment_pipe=self.augment_pipe)

    @torch.no_grad()
    def sample(self, z, labels):
        from training.samplers import edm_sampler
        g = torch.Generator(z.device).manual_seed(0)  # sampler noise that leaves the training RNG untouched
        randn_like = lambda x: torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return edm_sampler(self.ema.ema, z, labels, randn_like=randn_like, num_steps=self.sample_steps).to(torch.float32)

    def state_dict(self):
        return dict(net=self.net.state_dict(), ema=self.ema.ema.state_dict(), optimizer=self.optimizer.state_dict())

    def load_state_dict(self, state):
        self.net.load_state_dict(state['net'])
        self.ema.ema.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])

