"""DisBack: Distribution Backtracking (Zhang et al., arXiv 2408.15991) as a plug-in on DMD.

Stage 1, degradation recording: an auxiliary score s' starts as the teacher and is trained by denoising on the
frozen initial generator G0's samples (DMD's fake-score update, with G not updated, at its own learning rate) for K1
updates or until its denoising loss on a fixed probe stops falling (the paper's "until converged"). N+1 snapshots
s'_0 = teacher, ..., s'_N ~ p_G0 are written to the run directory as plain state dicts (path-000.pt ... path-00N.pt),
placed evenly or geometrically in update count, or evenly in distance from the teacher; path.json records each
node's distance from the teacher and from its neighbours. Stage 2, distribution backtracking: DMD whose fake score
starts from s'_N and whose distribution-matching target walks s'_{N-1}, ..., s'_1, s'_0 = the teacher itself, one
node every K2 generator steps (or once the distribution-matching loss stops falling), then stays at the teacher.

Placing nodes by distance (or ending stage 1 at a plateau) needs the final distance, which is known only at the end
of stage 1. One pass, no stage-1 compute repeated: s' is measured on the probe after every update up to N, at powers
of two (the fast start) and at every window end, and each measured s' is kept as a candidate snapshot
(stage1-XXXXXXXX.pt). At window ends the pool is thinned to 4N candidates along the placement axis (the candidate
whose neighbours are closest goes); at the end s'_i is the candidate nearest to i/N of the way and the others are
deleted. A resume replays stage 1 from its last state and makes the same choices.

The stage logic is the mixin `Backtracking`, so that it composes with any DMD-like base class; see its docstring.
`SiDDisBack` is DisBack on SiD: the walk replaces SiD's real score f_phi as it replaces DMD's mu_real.
Loss reduction and clipping: those of its base class (DMD's: means over pixels and batch, clip at 10, as DMD2's code,
on which the official DisBack release is built).
"""

import copy
import json
import math
import os
import re

import torch

import dnnlib
from torch_utils import distributed, misc, training_stats
from training.distill.dmd import DMD
from training.distill.sid import SiD

PROBE_NUM = 32      # G0 samples of the probe on which stage 1 measures losses and distances
PROBE_LEVELS = 4    # its noise levels: the midpoints of 4 equal parts of the distribution-matching index range
PROBE_SEED = 0x5eed  # the probe's latents, labels and noise (fixed: the same probe in every run of a teacher)

# ----------------------------------------------------------------------------
# The recorded path on disk.

def node_path(path_dir, i):
    return os.path.join(path_dir, f'path-{i:03d}.pt')


def candidate_path(path_dir, k):
    """s' after k stage-1 updates, kept while the placement of the nodes is not yet known."""
    return os.path.join(path_dir, f'stage1-{k:08d}.pt')


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
# Node placement: where s'_1 ... s'_{N-1} go between the teacher and s'_N.

def place_coordinate(place, update, distance):
    """The axis along which nodes are spaced evenly: updates ('even'), log updates ('geometric'), or distance from
    the teacher on the probe ('distance'). The teacher (update 0) is at 0, or -inf in log updates."""
    if place == 'even':
        return float(update)
    if place == 'geometric':
        return math.log(update) if update > 0 else -math.inf
    return float(distance)


def record_updates(place, num_nodes, num_updates):
    """The updates after which s'_0 ... s'_N are taken when K1 is known in advance: i K1 / N ('even') or K1^(i/N)
    ('geometric', strictly increasing, so early nodes follow the fast first updates)."""
    if place == 'even':
        return [i * num_updates // num_nodes for i in range(num_nodes + 1)]
    at = [0]
    for i in range(1, num_nodes + 1):
        at.append(min(max(round(num_updates ** (i / num_nodes)), at[-1] + 1), num_updates - (num_nodes - i)))
    return at


def thin(coords):
    """Index (into coords[1:], the candidates after the teacher) of the candidate to drop from a full pool: the one
    whose neighbours are closest along the placement axis, never the newest; the earliest on ties."""
    gaps = [abs(coords[j + 1] - coords[j - 1]) for j in range(1, len(coords) - 1)]
    return gaps.index(min(gaps))


def select(coords, num_nodes):
    """Indices (into coords[1:]) of s'_1 ... s'_N among the candidates: s'_N is the newest; s'_i the candidate
    nearest to i/N of the way along the placement axis, in time order, the earliest on ties."""
    start, end, last = max(coords[0], 0.0), coords[-1], len(coords) - 1
    chosen, lo = [], 1
    for i in range(1, num_nodes):
        target = start + i / num_nodes * (end - start)
        hi = last - (num_nodes - i)  # leave one candidate for each later node
        j = min(range(lo, hi + 1), key=lambda j: (abs(coords[j] - target), j))
        chosen.append(j - 1)
        lo = j + 1
    return chosen + [last - 1]

# ----------------------------------------------------------------------------

class Backtracking:
    """DisBack's two stages on top of a DMD-like base class (put it first: `class X(Backtracking, Base)`).

    The base provides: `real`, `fake`, `G` networks, the fake-score optimizer `opt_fake` with `reset()`,
    `fake_lr`, `fake_step(rounds, x_per_round, cur_nimg)` (fresh G samples where x is None), `step`,
    `generate(net, z, labels)`, `sigma_grid`, `dm_t_lo`/`dm_t_hi`, `num_g_steps`, `distribution_matching_loss(x, r, c)`
    and `real_score(x_s, sigma, labels)`: the target hook, which this class points at the current path node.
    """

    def __init__(self,
        teacher,                        # frozen teacher: s'_0, the final target, and the initial G0 and s'
        device,                         # torch.device of this rank
        batch_size,                     # global batch
        run_dir         = None,         # run directory (given by the loop): stage 1 writes the path here
        path            = None,         # directory of a recorded path: skip stage 1 (the stage-1 options are unused)
        path_nodes      = 4,            # N: the path has N+1 snapshots s'_0 = teacher, ..., s'_N
        path_steps      = 1000,         # K1: stage-1 updates of s' on G0's samples (the most, with 'plateau')
        path_place      = 'distance',   # node placement: 'even' or 'geometric' in updates, or 'distance' from the teacher
        stage1_lr       = None,         # learning rate of s' in stage 1, None = the fake score's / 10 (measured: at
                                        #   the fake score's, s' covers its whole distance in 1-2 updates: a jump)
        stage1_stop     = 'fixed',      # 'fixed': K1 updates; 'plateau': when the probe's denoising loss fell by
        stage1_window   = 50,           #   less than stage1_tol over a window of this many updates (at most K1)
        stage1_tol      = 0.01,
        switch_every    = 100,          # K2: generator steps per path node ('every'), or the window of 'converged'
        switch_rule     = 'every',      # 'every' K2 generator steps, or 'converged': when a window's mean L_DM
        switch_tol      = 0.05,         #   fell by less than switch_tol relative to the previous window
        **base_kwargs,                  # the base method's options (DMD: lr, fake_steps, sigma_init, pairs, GAN head, ...)
    ):
        super().__init__(teacher, device, batch_size, **base_kwargs)
        if switch_rule not in ('every', 'converged'):
            raise ValueError(f'switch_rule must be "every" or "converged", not "{switch_rule}"')
        if path_place not in ('even', 'geometric', 'distance'):
            raise ValueError(f'path_place must be "even", "geometric" or "distance", not "{path_place}"')
        if stage1_stop not in ('fixed', 'plateau'):
            raise ValueError(f'stage1_stop must be "fixed" or "plateau", not "{stage1_stop}"')
        self.switch_every = switch_every
        self.switch_rule = switch_rule
        self.switch_tol = switch_tol
        self.target_net = copy.deepcopy(teacher).eval().requires_grad_(False)  # holds s'_i while i > 0
        self.stage2_fake_lr = self.fake_lr
        self.stage = 1
        self.stage1_done = 0    # stage-1 updates of s' so far
        self.node = 0           # i of the current target s'_i (stage 2); 0 = the teacher itself
        self.node_g_steps = 0   # generator updates on the current target
        self.switches = []      # stage-2 generator step of each switch, for logs and tests
        self.window_sum = 0.0   # 'converged': sum of L_DM in the current window (a device tensor once summed)
        self.window_prev = None # 'converged': mean L_DM of the previous window on this node
        self._dm_sum = 0

        if path is None:  # record the path in this run
            if run_dir is None:
                raise ValueError('DisBack stage 1 writes its path to the run directory: pass run_dir, or a recorded path')
            if path_steps < path_nodes:
                raise ValueError(f'Stage 1 has {path_steps} steps for {path_nodes} path intervals; lengthen it '
                                 f'(--stage1-kimg) or use fewer nodes (--path-nodes)')
            self.path_dir, self.num_nodes, self.path_steps = run_dir, path_nodes, path_steps
            self.place, self.stop, self.window, self.tol = path_place, stage1_stop, stage1_window, stage1_tol
            self.fake_lr = stage1_lr if stage1_lr is not None else self.fake_lr / 10
            # Nodes at known updates when K1 is fixed and placement is by update count; else a pool of candidates
            # (at most 4N files), thinned along the placement axis and chosen from once stage 1 ends.
            self.record_at = record_updates(path_place, path_nodes, path_steps) \
                if stage1_stop == 'fixed' and path_place != 'distance' else None
            self.pool_size = 4 * path_nodes
            self.curve = []       # [update, probe loss, distance from the teacher] at each check
            self.pool = []        # [update, distance from the teacher] of the candidate snapshots on disk
            self.loss_prev = None  # 'plateau': probe loss at the previous window end
            self.pending = []     # (update, device tensor [probe loss, distance]) of the checks since the last window end
            self.probe = self._make_probe()
            self.probe_teacher = self._probe_outputs(self.real)
        else:  # a recorded path: start at stage 2 with s_phi <- s'_N
            self.path_dir, self.num_nodes, self.path_steps = path, recorded_nodes(path), 0
            self.target_net.load_state_dict(self._load_node(0), strict=True)
            if misc.checksum(self.target_net) != misc.checksum(self.real):
                raise ValueError(f'"{node_path(path, 0)}" is not this teacher (s\'_0 must equal it): use the --teacher '
                                 f'the path was recorded with, or record a new path')
            self.fake.load_state_dict(self._load_node(self.num_nodes), strict=True)
            self._start_backtracking()

    # ------------------------------------------------------------------------
    # The probe: fixed G0 samples noised at fixed levels. Stage 1's plateau test, the distance placement and the
    # path table are measured on it.

    @torch.no_grad()
    def _make_probe(self):
        g = torch.Generator().manual_seed(PROBE_SEED)
        z = torch.randn([PROBE_NUM, *self.img_shape], generator=g).to(self.device)
        c = torch.eye(self.label_dim)[torch.arange(PROBE_NUM) % self.label_dim].to(self.device) if self.label_dim else None
        x0 = self.generate(self.G, z, c)  # G is G0 throughout stage 1
        span = self.dm_t_hi - self.dm_t_lo
        t = [self.dm_t_lo + round((j + 0.5) / PROBE_LEVELS * span) for j in range(PROBE_LEVELS)]
        sigma = self.sigma_grid[t]
        n = torch.randn([PROBE_LEVELS, PROBE_NUM, *self.img_shape], generator=g).to(self.device)
        return dnnlib.EasyDict(x0=x0, labels=c, sigma=sigma, x_s=x0[None] + sigma.view(-1, 1, 1, 1, 1) * n)

    @torch.no_grad()
    def _probe_outputs(self, net):
        """D(x_s; s) of a network on the probe, [levels, samples, C, H, W], one level per call."""
        p = self.probe
        return torch.stack([net(p.x_s[j], p.sigma[j].expand(PROBE_NUM), p.labels).to(torch.float32)
                            for j in range(PROBE_LEVELS)])

    def _probe_loss(self, D):
        """The stage-1 objective on the probe: mean over levels of lam(s) * mean |D - x0|^2."""
        lam = 1 / self.probe.sigma ** 2 + 1 / 0.5 ** 2
        return (lam * (D - self.probe.x0[None]).square().mean(dim=[1, 2, 3, 4])).mean()

    @staticmethod
    def _distance(Da, Db):
        """Per-level RMS of the denoisers' difference on the probe [levels], and over all levels (a device tensor)."""
        ms = (Da - Db).square().mean(dim=[1, 2, 3, 4])
        return ms.sqrt(), ms.mean().sqrt()

    # ------------------------------------------------------------------------
    # The path.

    def _load_node(self, i):
        return torch.load(node_path(self.path_dir, i), map_location=self.device, weights_only=True)

    def _save_fake(self, path):
        """The auxiliary score now, as a plain state dict (rank 0 writes, atomically)."""
        if distributed.get_rank() == 0:
            state = {k: v.detach().cpu() for k, v in self.fake.state_dict().items()}
            dnnlib.util.atomic_write(path, lambda f: torch.save(state, f))

    def _set_node(self, i):
        """Point the distribution-matching target at s'_i. strict=True: a load that matched no keys would leave the
        target unchanged (the official release's bug)."""
        self.node = i
        if i > 0:
            self.target_net.load_state_dict(self._load_node(i), strict=True)

    def _start_backtracking(self):
        """Stage 2 begins: s_phi = s'_N (already the fake score), fresh optimizer moments, target s'_{N-1}."""
        self.stage = 2
        self.fake_lr = self.stage2_fake_lr
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
    # Stage 1: checks on the probe, the candidate pool, the end of stage 1.

    def _is_check(self, k):
        """Updates after which s' is measured on the probe: every one up to N, powers of two (the fast start),
        every window end, and K1."""
        return k <= self.num_nodes or k & (k - 1) == 0 or k % self.window == 0 or k == self.path_steps

    def _check(self, k):
        """Measure s' after k updates on the probe (and keep it as a candidate); returns whether stage 1 ends here.
        The measurements stay on the device until a window end (or K1), where they are read together, the pool is
        thinned and the plateau test runs: no other step reads the device."""
        D = self._probe_outputs(self.fake)
        self.pending.append((k, torch.stack([self._probe_loss(D), self._distance(D, self.probe_teacher)[1]]).to(torch.float64)))
        if self.record_at is None:
            self._save_fake(candidate_path(self.path_dir, k))
        if k % self.window != 0 and k < self.path_steps:
            return False
        values = distributed.broadcast_(torch.stack([v for _, v in self.pending])).tolist()  # rank 0's, on every rank
        self.curve += [[u, loss, dist] for (u, _), (loss, dist) in zip(self.pending, values)]
        self.pending = []
        if self.record_at is None:
            self.pool += [[u, dist] for u, _loss, dist in self.curve[-len(values):]]
            while len(self.pool) > self.pool_size:
                coords = [place_coordinate(self.place, u, d) for u, d in [[0, 0.0]] + self.pool]
                self._remove_candidate(self.pool.pop(thin(coords))[0])
        if k >= self.path_steps:
            return True
        loss = self.curve[-1][1]
        if self.stop == 'plateau':
            done = self.loss_prev is not None and loss > (1 - self.tol) * self.loss_prev and k >= self.num_nodes
            self.loss_prev = loss
            return done
        return False

    def _finish_stage1(self):
        """s'_1 ... s'_N from the pool (or at their known updates), the path table, then stage 2."""
        k_end = self.stage1_done
        if self.record_at is not None:
            self._save_fake(node_path(self.path_dir, self.num_nodes))
            updates = self.record_at
        else:
            coords = [place_coordinate(self.place, u, d) for u, d in [[0, 0.0]] + self.pool]
            chosen = select(coords, self.num_nodes)
            updates = [0] + [self.pool[j][0] for j in chosen]
            if distributed.get_rank() == 0:
                for i, k in enumerate(updates[1:], 1):
                    self._take_candidate(k, i)
                for k, _ in self.pool:
                    if k not in updates:
                        self._remove_candidate(k)
        self._write_table(updates, k_end)
        self._start_backtracking()

    def _remove_candidate(self, k):
        """Rank 0 deletes a candidate snapshot. A resume replays stage 1 from its last state, so the candidate may be
        gone already: the run before it made the same choice."""
        path = candidate_path(self.path_dir, k)
        if distributed.get_rank() == 0 and os.path.exists(path):
            os.remove(path)

    def _take_candidate(self, k, i):
        """Candidate k becomes path-00i.pt. A resume that replays the end of stage 1 finds it moved there already
        (path.json then names update k for node i)."""
        src = candidate_path(self.path_dir, k)
        if os.path.exists(src):
            os.replace(src, node_path(self.path_dir, i))
            return
        table = os.path.join(self.path_dir, 'path.json')
        if os.path.isfile(table) and os.path.isfile(node_path(self.path_dir, i)):
            with open(table) as f:
                if json.load(f)['nodes'][i]['update'] == k:
                    return
        raise RuntimeError(f'Stage 1 snapshot "{src}" is missing, so node {i} of the path cannot be written; resume '
                           f'from the newest training state of "{self.path_dir}", or start a new run')

    def _write_table(self, updates, k_end):
        """path.json: each node's update and distances from the teacher and its neighbours on the probe; printed
        with a warning when the first interval holds more than half of the path's length (a jump)."""
        distributed.barrier()  # rank 0 has written the nodes before any rank reads them
        outputs = [self.probe_teacher]
        for i in range(1, self.num_nodes):
            self.target_net.load_state_dict(self._load_node(i), strict=True)
            outputs.append(self._probe_outputs(self.target_net))
        outputs.append(self._probe_outputs(self.fake))
        dist = lambda a, b: self._distance(outputs[a], outputs[b])
        nodes = []
        for i, k in enumerate(updates):
            per_level, total = dist(i, 0)
            nodes.append(dict(node=i, update=k, to_teacher=float(total), to_teacher_per_sigma=per_level.tolist(),
                              to_prev=float(dist(i, i - 1)[1]) if i > 0 else None,
                              to_next=float(dist(i, i + 1)[1]) if i < self.num_nodes else None))
        length = sum(n['to_prev'] for n in nodes[1:])
        first = nodes[1]['to_teacher'] / nodes[-1]['to_teacher'] if nodes[-1]['to_teacher'] > 0 else 0.0
        warning = None
        if first > 0.5:  # s'_1 is more than half as far from the teacher as s'_N
            fix = 'lower --stage1-lr' if self.place == 'distance' else 'use --path-place=distance or a lower --stage1-lr'
            warning = (f'Warning: the recorded path is a jump, not a trajectory: its first interval covers {first:.0%} '
                       f'of the distance from the teacher to s\'_N; {fix}')
        table = dict(nodes=nodes, length=length, first_interval_share=first, warning=warning,
                     sigmas=self.probe.sigma.tolist(), probe_num=PROBE_NUM, stage1_updates=k_end,
                     stage1_lr=self.fake_lr, stage1_stop=self.stop, path_place=self.place, curve=self.curve)
        if distributed.get_rank() == 0:
            dnnlib.util.atomic_write(os.path.join(self.path_dir, 'path.json'),
                                     lambda f: f.write(json.dumps(table, indent=1)), mode='w')
        lines = [f'Recorded path after {k_end} stage-1 updates ({self.place} placement); distances: RMS of the '
                 f'denoisers\' difference on {PROBE_NUM} G0 samples at sigma '
                 f'{", ".join(f"{s:.3g}" for s in table["sigmas"])}:',
                 f'{"node":>6s}{"update":>9s}{"to teacher":>12s}{"to previous":>13s}{"to next":>10s}']
        fmt = lambda v: '-' if v is None else f'{v:.4f}'
        lines += [f'{n["node"]:6d}{n["update"]:9d}{n["to_teacher"]:12.4f}{fmt(n["to_prev"]):>13s}{fmt(n["to_next"]):>10s}'
                  for n in nodes]
        distributed.print0('\n'.join(lines + ([warning] if warning else [])))
        return table

    # ------------------------------------------------------------------------
    # One step: stage 1 trains s' on G0's samples; stage 2 is a base step against the current target.

    def step(self, rounds, cur_nimg):
        if self.stage == 1:
            if self.stage1_done == 0:
                self._save_fake(node_path(self.path_dir, 0))  # s'_0 = the teacher
            if self.record_at is not None and 0 < self.stage1_done < self.path_steps and self.stage1_done in self.record_at:
                self._save_fake(node_path(self.path_dir, self.record_at.index(self.stage1_done)))
            self.fake_step(rounds, [None] * len(rounds), cur_nimg)  # G is not updated: fresh samples are G0's
            self.stage1_done += 1
            if self._is_check(self.stage1_done) and self._check(self.stage1_done):
                self._finish_stage1()
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
        if self.switch_rule == 'converged':
            self._dm_sum = self._dm_sum + loss.detach().sum()  # per-step L_DM, kept on the device
        return loss

    def _after_generator_update(self):
        """Advance along the path: after K2 generator steps on a node, or when a K2-step window's mean L_DM fell
        by less than switch_tol relative to the window before (at least two windows per node). The window's sum
        stays on the device (summed over ranks there); it is read once, at the window's end."""
        self.node_g_steps += 1
        if self.node == 0:
            return
        if self.switch_rule == 'every':
            due = self.node_g_steps >= self.switch_every
        else:
            dm_sum = torch.as_tensor(self._dm_sum, dtype=torch.float64, device=self.device).reshape([1]).clone()
            self.window_sum = self.window_sum + distributed.all_reduce_sum(dm_sum)  # the same on every rank
            due = False
            if self.node_g_steps % self.switch_every == 0:
                mean = float(self.window_sum) / (self.batch_size * self.switch_every)
                due = self.window_prev is not None and mean > (1 - self.switch_tol) * self.window_prev
                self.window_sum, self.window_prev = 0.0, mean
        if due:
            self._switch()

    # ------------------------------------------------------------------------
    # Resume: the base's state plus the stage, the path position, stage 1's checks and pool, the switching counters.

    def state_dict(self):
        state = dict(super().state_dict(), stage=self.stage, stage1_done=self.stage1_done, node=self.node,
                     node_g_steps=self.node_g_steps, switches=list(self.switches),
                     window_sum=float(self.window_sum), window_prev=self.window_prev)
        if self.stage == 1:
            state.update(curve=copy.deepcopy(self.curve), pool=copy.deepcopy(self.pool), loss_prev=self.loss_prev,
                         pending=[[k, *v.tolist()] for k, v in self.pending])
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.stage, self.stage1_done, self.node_g_steps = state['stage'], state['stage1_done'], state['node_g_steps']
        self.switches = list(state['switches'])
        self.window_sum, self.window_prev = state['window_sum'], state['window_prev']
        if self.stage == 1:
            self.curve, self.pool, self.loss_prev = copy.deepcopy(state['curve']), copy.deepcopy(state['pool']), state['loss_prev']
            self.pending = [(k, torch.tensor(v, dtype=torch.float64, device=self.device)) for k, *v in state['pending']]
        else:
            self.fake_lr = self.stage2_fake_lr
        self._set_node(state['node'])


class DisBack(Backtracking, DMD):
    """DisBack on DMD (with DMD2's options)."""


class SiDDisBack(Backtracking, SiD):
    """DisBack on SiD: the target walk is SiD's real score f_phi (in y_r and in the normalisation w). Only the 'every'
    switch rule: SiD's generator loss is no measure of convergence (with an exact fake score its expectation is
    (1 - alpha) times the score distance between G and the target, negative and rising to 0 as G converges when
    alpha > 1, zero throughout at alpha = 1), so the relative fall that 'converged' waits for is not a plateau test."""

    def __init__(self, *args, switch_rule='every', **kwargs):
        if switch_rule != 'every':
            raise ValueError(f'switch_rule "{switch_rule}" watches the generator loss fall, but SiD\'s loss is no measure '
                             f'of convergence; use switch_rule "every" with SiD')
        super().__init__(*args, switch_rule=switch_rule, **kwargs)
