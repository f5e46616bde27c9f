"""DisBack: Distribution Backtracking (Zhang et al., arXiv 2408.15991) as a plug-in on DMD.

Stage 1, degradation recording: an auxiliary score s' starts as the teacher and is trained by denoising on the
frozen initial generator G0's samples (DMD's fake-score update, with G not updated) for K1 steps; N+1 snapshots
s'_0 = teacher, ..., s'_N ~ p_G0 at even intervals are written to the run directory as plain state dicts
(path-000.pt ... path-00N.pt). Stage 2, distribution backtracking: DMD whose fake score starts from s'_N and whose
distribution-matching target walks s'_{N-1}, ..., s'_1, s'_0 = the teacher itself, one node every K2 generator
steps (or once the distribution-matching loss stops falling), then stays at the teacher.
"""

import copy
import os
import re

import torch

import dnnlib
from torch_utils import distributed, misc, training_stats
from training.distill.dmd import DMD

# ----------------------------------------------------------------------------
# The recorded path on disk.

def node_path(path_dir, i):
    return os.path.join(path_dir, f'path-{i:03d}.pt')


def recorded_nodes(path_dir):
    """N of the path recorded in a directory: path-000.pt ... path-N.pt, none missing, N >= 1."""
    if not os.path.isdir(path_dir):
        raise FileNotFoundError(f'--path: "{path_dir}" is not a directory; pass the run directory of a DisBack stage 1')
    found = sorted(int(m.group(1)) for n in os.listdir(path_dir) if (m := re.fullmatch(r'path-(\d{3})\.pt', n)))
    if len(found) < 2 or found != list(range(len(found))):
        raise ValueError(f'--path: "{path_dir}" holds path snapshots {found}, but a recorded path is path-000.pt ... '
                         f'path-N.pt with N >= 1 and none missing; record one with --method=disback (stage 1)')
    return len(found) - 1

# ----------------------------------------------------------------------------

class DisBack(DMD):
    def __init__(self,
        teacher,                        # frozen teacher: s'_0, the final target, and the initial G0 and s'
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        run_dir         = None,         # run directory (given by the loop): stage 1 writes the path here
        path            = None,         # directory of a recorded path: skip stage 1 (path_nodes/path_steps unused)
        path_nodes      = 4,            # N: the path has N+1 snapshots s'_0 = teacher, ..., s'_N
        path_steps      = 1000,         # K1: stage-1 updates of s' on G0's samples
        switch_every    = 100,          # K2: generator steps per path node ('every'), or the window of 'converged'
        switch_rule     = 'every',      # 'every' K2 generator steps, or 'converged': when a window's mean L_DM
        switch_tol      = 0.05,         #   fell by less than switch_tol relative to the previous window
        **dmd_kwargs,                   # DMD / DMD2 options (lr, fake_steps, sigma_init, pairs, GAN head, ...)
    ):
        super().__init__(teacher, device, batch_size, **dmd_kwargs)
        if switch_rule not in ('every', 'converged'):
            raise ValueError(f'switch_rule must be "every" or "converged", not "{switch_rule}"')
        self.switch_every = switch_every
        self.switch_rule = switch_rule
        self.switch_tol = switch_tol
        self.target_net = copy.deepcopy(teacher).eval().requires_grad_(False)  # holds s'_i while i > 0
        self.stage = 1
        self.stage1_done = 0    # stage-1 updates of s' so far
        self.node = 0           # i of the current target s'_i (stage 2); 0 = the teacher itself
        self.node_g_steps = 0   # generator updates on the current target
        self.switches = []      # stage-2 generator step of each switch, for logs and tests
        self.window_sum = 0.0   # 'converged': sum of per-step mean L_DM in the current window
        self.window_prev = None # 'converged': mean L_DM of the previous window on this node
        self._dm_sum = 0

        if path is None:  # record the path in this run
            if run_dir is None:
                raise ValueError('DisBack stage 1 writes its path to the run directory: pass run_dir, or a recorded path')
            if path_steps < path_nodes:
                raise ValueError(f'Stage 1 has {path_steps} steps for {path_nodes} path intervals; lengthen it '
                                 f'(--stage1-kimg) or use fewer nodes (--path-nodes)')
            self.path_dir, self.num_nodes, self.path_steps = run_dir, path_nodes, path_steps
            self.record_at = [i * path_steps // path_nodes for i in range(path_nodes + 1)]  # s'_i after these updates
        else:  # a recorded path: start at stage 2 with s_phi <- s'_N
            self.path_dir, self.num_nodes, self.path_steps = path, recorded_nodes(path), 0
            self.target_net.load_state_dict(self._load_node(0), strict=True)
            if misc.checksum(self.target_net) != misc.checksum(self.real):
                raise ValueError(f'"{node_path(path, 0)}" is not this teacher (s\'_0 must equal it): use the --teacher '
                                 f'the path was recorded with, or record a new path')
            self.fake.load_state_dict(self._load_node(self.num_nodes), strict=True)
            self._start_backtracking()

    # ------------------------------------------------------------------------
    # The path.

    def _load_node(self, i):
        return torch.load(node_path(self.path_dir, i), map_location=self.device, weights_only=True)

    def _save_node(self, i):
        """s'_i = the auxiliary score now, as a plain state dict (rank 0 writes, atomically)."""
        if distributed.get_rank() == 0:
            state = {k: v.detach().cpu() for k, v in self.fake.state_dict().items()}
            dnnlib.util.atomic_write(node_path(self.path_dir, i), lambda f: torch.save(state, f))

    def _set_node(self, i):
        """Point the distribution-matching target at s'_i. strict=True: a load that matched no keys would leave the
        target unchanged (the official release's bug)."""
        self.node = i
        if i > 0:
            self.target_net.load_state_dict(self._load_node(i), strict=True)

    def _start_backtracking(self):
        """Stage 2 begins: s_phi = s'_N (already the fake score), fresh optimizer moments, target s'_{N-1}."""
        self.stage = 2
        self.opt_fake.reset()
        distributed.barrier()  # rank 0 has written the path before any rank reads it
        self._set_node(self.num_nodes - 1)

    def _switch(self):
        self._set_node(self.node - 1)
        self.switches.append(self.num_g_steps)
        self.node_g_steps = 0
        self.window_sum, self.window_prev = 0.0, None

    def target(self):
        """The current distribution-matching target network."""
        return self.target_net if self.stage == 2 and self.node > 0 else self.real

    def real_score(self, x_s, sigma, labels):
        return self.target()(x_s, sigma, labels)

    # ------------------------------------------------------------------------
    # One step: stage 1 trains s' on G0's samples; stage 2 is a DMD step against the current target.

    def step(self, rounds, cur_nimg):
        if self.stage == 1:
            if self.stage1_done in self.record_at:
                self._save_node(self.record_at.index(self.stage1_done))
            self.fake_step(rounds, [None] * len(rounds), cur_nimg)  # G is not updated: fresh samples are G0's
            self.stage1_done += 1
            if self.stage1_done == self.path_steps:
                self._save_node(self.num_nodes)
                self._start_backtracking()
        else:
            g_steps = self.num_g_steps
            self._dm_sum = 0
            super().step(rounds, cur_nimg - self.stage1_done * self.batch_size)  # EMA ramp-up counts stage-2 images
            if self.num_g_steps > g_steps:
                self._after_generator_update()
        training_stats.report('Progress/disback_stage', self.stage)
        training_stats.report('Progress/path_node', self.node)

    def distribution_matching_loss(self, x, r, c):
        loss = super().distribution_matching_loss(x, r, c)
        self._dm_sum = self._dm_sum + loss.detach().sum()  # per-step L_DM for the 'converged' rule
        return loss

    def _after_generator_update(self):
        """Advance along the path: after K2 generator steps on a node, or when a K2-step window's mean L_DM fell
        by less than switch_tol relative to the window before (at least two windows per node)."""
        self.node_g_steps += 1
        if self.node == 0:
            return
        if self.switch_rule == 'every':
            due = self.node_g_steps >= self.switch_every
        else:
            dm_sum = torch.as_tensor(self._dm_sum, dtype=torch.float64, device=self.device).reshape([1])
            self.window_sum += float(distributed.all_reduce_sum(dm_sum)) / self.batch_size
            due = False
            if self.node_g_steps % self.switch_every == 0:
                mean = self.window_sum / self.switch_every
                due = self.window_prev is not None and mean > (1 - self.switch_tol) * self.window_prev
                self.window_sum, self.window_prev = 0.0, mean
        if due:
            self._switch()

    # ------------------------------------------------------------------------
    # Resume: DMD's state plus the stage, the path position and the switching counters.

    def state_dict(self):
        return dict(super().state_dict(), stage=self.stage, stage1_done=self.stage1_done, node=self.node,
                    node_g_steps=self.node_g_steps, switches=list(self.switches), window_sum=self.window_sum,
                    window_prev=self.window_prev)

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.stage, self.stage1_done, self.node_g_steps = state['stage'], state['stage1_done'], state['node_g_steps']
        self.switches = list(state['switches'])
        self.window_sum, self.window_prev = state['window_sum'], state['window_prev']
        self._set_node(state['node'])
