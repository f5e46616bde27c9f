"""Quality guard (issue 25): the best DMD and SiD recipes must train a one-step student on an exact problem.

Problem: bench_disback.py's `uncond8` (unconditional 8x8x3 mixture of 10 Gaussians, training/toy.py seed 0) with a
cheaper teacher than the bench's: the same SongUNet regressed onto the exact denoiser for 200 steps of batch 64
(FD of its 35-NFE Heun samples 1.519 on the 2,000 evaluation latents below; exact samples 0.110). Each arm trains
from that teacher with bench/bench_quality.py's recipe (`RECIPES['uncond8']`: DMD G lr 3e-4, fake lr 1e-3, three
fake updates per G update, s_init 80; SiD lr 1e-5, s_init 2.5; batch 16, one thread) for G_STEPS generator steps,
seed 0, and its generator's FD against the exact mixture is computed on 2,000 fixed latents every EVERY steps. The
test asserts that the best of these FDs is below THRESHOLD[arm] and below the initial generator's FD divided by
FACTOR[arm], so a training that does nothing fails as well as one that diverges.

Calibration (2026-12-07, the 2-core CPU machine, idle but for the other calibration process; one thread), after the
merge of the day's changes to the random streams (StepRandom's chunked draws changed every trajectory): FD at G steps
50, 100, 150 for seeds 0-5 (DMD) and 0-3 (SiD), initial FD (G = the teacher at s_init, the same for every seed):
  dmd: seed 0 7.93, 18.45, 12.31; 1: 9.32, 8.95, 5.47; 2: 8.02, 8.12, 4.95; 3: 12.83, 14.09, 11.97;
       4: 17.49, 7.85, 16.85; 5: 8.84, 10.07, 12.04; initial 18.27
  sid: seed 0 5.95, 4.81, 3.49; 1: 6.23, 4.79, 3.36; 2: 5.42, 5.42, 3.15; 3: 5.88, 4.64, 2.87; initial 7.36
DMD's FD swings by up to 2x between checkpoints 50 steps apart on this problem (docs/BENCHMARKS.md, issue 25), so
a single checkpoint is no guard (seed 0 ends at 12.31 after 7.93 and 18.45); the test takes the best of the three
checkpoints, as bench_quality.py's stop rule keeps the best evaluation. THRESHOLD is 1.25x the worst seed's best
(DMD 11.97, SiD 3.49) and FACTOR[arm] is below the worst seed's improvement of the best over the initial FD (DMD
1.53x, SiD 2.11x). The test runs seed 0 (best DMD 7.93, SiD 3.49). Earlier calibration on the same day, before the
stream change: DMD 5.48, 4.15, 5.72, 11.79 and SiD 2.70, 4.37, 3.18, 2.87 at 150 steps. Wall time on the idle
machine (the whole suite, 2026-12-07): about 25 s (DMD) and 17 s (SiD) plus 10 s for the teacher's fit.

Defects checked by hand (each applied to the code, the test run, the code restored; not committed), with the earlier
calibration's code and single-checkpoint thresholds; the caught ones are far past today's thresholds too:
  caught (the test fails):
  - DMD, the distribution-matching gradient's sign flipped ((p_real - p_fake) / w): FD 141.8;
  - DMD, G's loss with x detached (0.5 |sg(x) - sg(x - grad)|^2, G gets nothing): the updater raises;
  - SiD, the generator loss's sign flipped: FD 26.5;
  - SiD, the explicit x of (y_r - x) detached: FD 18.0;
  not caught at this length (within the seeds' spread, or harmless on this problem):
  - DMD, the per-sample normaliser w dropped (w = 1): FD 11.09 against 5.48 (seeds 4.15-11.79);
  - DMD, the fake-score loss's weight lambda(s) = 1/s^2 + 1/0.5^2 replaced by 1: FD 10.59;
  - SiD, the fake-score loss's lambda(s) replaced by 1: FD 2.86 against 2.70;
  - SiD, y_f evaluated at sg(x_t) (no gradient through the fake score's input): FD 2.61.
  A loss multiplied by a constant is not a defect these optimizers see (Adam divides it out; only eps and the
  clipping at 10 notice), so it was not tried.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'bench'))
import bench_disback  # noqa: E402
import bench_quality  # noqa: E402
from training import toy  # noqa: E402

G_STEPS = 150
THRESHOLD = {'dmd': 1.25 * 11.97, 'sid': 1.25 * 3.49}
FACTOR = {'dmd': 1.3, 'sid': 1.8}
EVERY = 50  # G steps between FD evaluations: the best of them is judged


@pytest.fixture(scope='module')
def problem():
    gmm = toy.GMMDenoiser(**bench_disback.UNCOND8)
    teacher = bench_disback.fit_uncond8_teacher(gmm, num_steps=200, batch_size=64)
    return bench_disback.Problem('uncond8', teacher, gmm.means.numpy(), gmm.stds.numpy(), gmm.weights.numpy(), 2000), gmm


@pytest.mark.parametrize('arm', ['dmd', 'sid'])
def test_one_step_student_improves_on_the_exact_problem(problem, arm):
    problem, gmm = problem
    rows, _G, _best = bench_quality.train(problem, arm, 0, gmm, every=EVERY, patience=G_STEPS, max_g_steps=G_STEPS,
                                          log=lambda _: None)
    fd0, fd = rows[0]['fd'], min(row['fd'] for row in rows[1:])
    assert rows[-1]['g_steps'] == G_STEPS and len(rows) == G_STEPS // EVERY + 1
    assert fd < THRESHOLD[arm], f'{arm}: best FD {fd:.3f} in {G_STEPS} G steps, threshold {THRESHOLD[arm]}'
    assert fd < fd0 / FACTOR[arm], f'{arm}: best FD {fd:.3f} in {G_STEPS} G steps, not {FACTOR[arm]}x below the initial {fd0:.3f}'
