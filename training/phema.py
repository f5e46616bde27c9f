"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Sec. 3 and
Appendix C.2): during training, track a few power-function EMA profiles of the trained network; afterwards,
reconstruct the network for any EMA length as a least-squares combination of the stored profiles.

A power-function EMA with exponent gamma averages the weights theta(t) seen up to time T (in images) with the
density p(t) = (gamma + 1) t^gamma / T^(gamma + 1) on [0, T]; its relative standard deviation (the EMA length
relative to T) is std = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Step by step it is the update
theta_ema <- beta theta_ema + (1 - beta) theta with beta = (1 - batch / t)^(gamma + 1), t the images seen after the
step; for weights that are constant during each step, this is the integral of p(t) theta(t) exactly.
"""

import copy

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Profiles.

def exp_to_std(gamma):
    """The relative standard deviation of the power-function profile with exponent gamma (paper eq. 123)."""
    gamma = np.float64(gamma)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(std):
    """gamma for a relative std in (0, 0.2887): the largest real root of the cubic that inverts exp_to_std,
    gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0."""
    std = float(std)
    if not 0 < std < exp_to_std(0):
        raise ValueError(f'EMA std {std} is out of range: use 0 < std < {exp_to_std(0):.4f} (EDM2 uses 0.050 and 0.100)')
    roots = np.roots([1, 7, 16 - std ** -2, 12 - std ** -2])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def profile_inner(T_a, std_a, T_b, std_b):
    """<p_a, p_b> = integral of p_a(t) p_b(t) dt of two power-function profiles (ending at T_a, T_b), in closed form:
    (ga+1)(gb+1) min(T_a,T_b)^(ga+gb+1) / ((ga+gb+1) T_a^(ga+1) T_b^(gb+1)), taken in logs for large exponents."""
    ga, gb = std_to_exp(std_a), std_to_exp(std_b)
    T_a, T_b = np.float64(T_a), np.float64(T_b)
    log = (ga + gb + 1) * np.log(min(T_a, T_b)) - (ga + 1) * np.log(T_a) - (gb + 1) * np.log(T_b)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * np.exp(log)


def solve_coefficients(in_T, in_std, out_T, out_std):
    """X[i, j]: the weight of stored profile i in the reconstruction of target j, the least-squares fit
    sum_i X_ij p_i ~ q_j (normal equations A X = B, A_ik = <p_i, p_k>, B_ij = <p_i, q_j>), columns scaled to sum 1
    (so that constant weights are reproduced exactly)."""
    A = np.array([[profile_inner(Ti, si, Tk, sk) for Tk, sk in zip(in_T, in_std)] for Ti, si in zip(in_T, in_std)])
    B = np.array([[profile_inner(Ti, si, Tj, sj) for Tj, sj in zip(out_T, out_std)] for Ti, si in zip(in_T, in_std)])
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0, keepdims=True)

# ----------------------------------------------------------------------------
# Tracking during training.

class PowerFunctionEMA:
    """Power-function EMAs of a network's parameters, one per std. Parameters only: buffers are taken from the
    network when a profile is written (as EDM2)."""
    def __init__(self, net, stds):
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_exp(s) for s in self.stds]  # validates every std
        self.emas = [{name: p.detach().clone() for name, p in net.named_parameters()} for _ in self.stds]

    @torch.no_grad()
    def update(self, net, cur_nimg, batch_size):
        """One step: cur_nimg is the number of images seen after it (the first step gives beta = 0)."""
        for gamma, ema in zip(self.gammas, self.emas):
            beta = (1 - batch_size / cur_nimg) ** (gamma + 1)
            for name, p in net.named_parameters():
                ema[name].lerp_(p.detach(), 1 - beta)

    @torch.no_grad()
    def profile_net(self, index, template):
        """A copy of `template` (the snapshot's network, same parameter names) holding profile `index`."""
        net = copy.deepcopy(template)
        load_parameters(net, self.emas[index])
        return net

    def state_dict(self):
        return dict(stds=list(self.stds), emas=[dict(ema) for ema in self.emas])

    def load_state_dict(self, state):
        if state['stds'] != self.stds:
            raise ValueError(f'the training state tracks post-hoc EMA stds {state["stds"]}, this run {self.stds}: '
                             f'pass --phema={",".join(f"{s:.3f}" for s in state["stds"])}')
        for ema, stored in zip(self.emas, state['emas']):
            for name, t in ema.items():
                t.copy_(stored[name])


@torch.no_grad()
def load_parameters(net, params):
    """Copy {name: tensor} into net's parameters (every one, same names), keeping net's dtype and device."""
    names = [name for name, _ in net.named_parameters()]
    if sorted(names) != sorted(params):
        raise ValueError(f'the stored profile has other parameters than the network ({len(params)} vs {len(names)})')
    for name, p in net.named_parameters():
        p.copy_(params[name])

# ----------------------------------------------------------------------------
# Reconstruction.

@torch.no_grad()
def reconstruct(inputs, out_T, out_std):
    """Networks for target profiles (out_T[j], out_std[j]) from stored profiles. `inputs` is a list of
    (T_i, std_i, load_i) with load_i() returning that profile's network: loaded one at a time and accumulated
    in float64, so memory holds the targets and one input. Buffers come from the latest input."""
    in_T = [T for T, _, _ in inputs]
    X = solve_coefficients(in_T, [s for _, s, _ in inputs], out_T, out_std)
    sums, template = None, None
    for i in np.argsort(in_T, kind='stable'):
        net = inputs[i][2]()
        params = {name: p.to(torch.float64) for name, p in net.named_parameters()}
        if sums is None:
            sums = [{name: torch.zeros_like(p) for name, p in params.items()} for _ in out_T]
        elif sorted(params) != sorted(sums[0]):
            raise ValueError('the stored profiles are of different networks (their parameter names differ)')
        for j, acc in enumerate(sums):
            for name, p in params.items():
                acc[name].add_(p, alpha=float(X[i, j]))
        template = net
    outs = []
    for acc in sums:
        net = copy.deepcopy(template)
        load_parameters(net, acc)
        outs.append(net)
    return outs
