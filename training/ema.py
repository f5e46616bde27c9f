"""EMA of a network with EDM's half-life rule: beta = 0.5 ** (batch / halflife), half-life capped by a ramp-up."""

import copy

import torch

# ----------------------------------------------------------------------------

class EMA:
    def __init__(self, net, halflife_kimg=500, rampup_ratio=0.05):
        self.net = net
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup_ratio = rampup_ratio    # half-life <= rampup_ratio * images seen, so early weights fade fast

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        halflife_nimg = self.halflife_kimg * 1000
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
        # p_ema += (1 - beta) (p_net - p_ema) for every parameter at once: a few fused kernels, no temporaries.
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.net.parameters()], 1 - beta)
        for b_ema, b_net in zip(self.ema.buffers(), self.net.buffers()):
            b_ema.copy_(b_net)

    @torch.no_grad()
    def reset(self):
        """Restart the average from the current weights (e.g. at a new progressive-distillation round)."""
        for t_ema, t_net in zip(self.ema.state_dict().values(), self.net.state_dict().values()):
            t_ema.copy_(t_net)
