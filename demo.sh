#!/usr/bin/env bash
# The README's quick start: install the project, build the exact toy problem, distil its fitted UNet teacher into a
# one-step generator with DMD, write a sample grid and print exact metrics beside the teacher's and the floor.
# Everything goes to demo/; re-running skips the toy build and the teacher's metrics once they are done.
set -euo pipefail
cd "$(dirname "$0")"
PY=python3
OUT=demo
TOY=$OUT/toy
NUM=2000        # images per metric (student, teacher and exact sampler alike)

# 1. Install (torch 2.13.0 is the CPU wheel; an unpinned torch pulls the CUDA build).
$PY -m pip install -q torch==2.13.0 -r requirements.txt

# 2. The default toy problem: a 10-component Gaussian mixture of 16x16 RGB images with a known denoiser D*, and a
#    small SongUNet fitted to D* (the teacher). problem.json is written last, so it marks a complete build.
if [ ! -f $TOY/problem.json ]; then
    rm -rf $TOY
    $PY toy.py build --outdir=$TOY
fi

# 3. DMD, the `noreg-ttur5` configuration of docs/BENCHMARKS.md: G and the fake score start from the teacher; the
#    fake score learns 10x faster than G and takes five updates per G update (DMD2's two-time-scale rule); no
#    regression pairs (on the toy, L2 regression held G near its blurry start). 16 kimg = 250 fake-score updates,
#    50 generator updates.
$PY train.py --method=dmd --outdir=$OUT/dmd --teacher=$TOY/teacher-unet.pkl --device=cpu --seed=0 \
    --batch=64 --lr=2e-4 --fake-lr=2e-3 --fake-steps=5 --sigma-init=80 --ema=0.5 --duration=0.016 --tick=4 --snap=100
RUN=$(ls -d $OUT/dmd/*/ | sort | tail -n 1); RUN=${RUN%/}
SNAP=$(ls $RUN/network-snapshot-*.pkl | sort | tail -n 1)

# 4. A 10x10 grid: row k holds class k, sampled like generate.py (seeds 0-9, one network evaluation each).
$PY - "$SNAP" $OUT/grid.png <<'EOF'
import sys
import numpy as np
import generate
net = generate.load_network(sys.argv[1])
rows = [generate.generate_batch(net, list(range(10)), 'cpu', class_idx=k).numpy() for k in range(net.label_dim)]
generate.save_image_grid(np.concatenate(rows), sys.argv[2], grid_w=10, grid_h=len(rows))
EOF

# 5. Exact metrics (toy.py metrics, NUM images each): the one-step student, the teacher (18 Heun steps = 35 network
#    evaluations; measured once per toy build) and the exact sampler at the same count (the floor: FD is biased
#    upwards at finite counts, so compare with it).
$PY toy.py metrics --problem=$TOY --network="$SNAP" --num=$NUM --out=$RUN/metrics-$NUM.json > /dev/null
if [ ! -f $TOY/teacher-metrics-$NUM.json ]; then
    $PY toy.py metrics --problem=$TOY --network=$TOY/teacher-unet.pkl --num=$NUM --out=$TOY/teacher-metrics-$NUM.json > /dev/null
fi
$PY - $RUN/metrics-$NUM.json $TOY/teacher-metrics-$NUM.json <<'EOF'
import json, sys
student, teacher = (json.load(open(path)) for path in sys.argv[1:3])
print(f'Exact metrics, {student["num"]} images each, against the 10-component mixture (classes drawn uniformly):')
print(f'{"":12s}{"DMD 1 step":>12s}{"teacher 35":>12s}{"floor":>12s}')
for key, name in [(k, n) for k, n in [("fd", "FD"), ("mode_tv", "mode TV"), ("precision", "precision"), ("spread", "spread")] if k in student["images"]]:
    print(f'{name:12s}{student["images"][key]:12.5f}{teacher["images"][key]:12.5f}{student["floor"][key]:12.5f}')
EOF
$PY plot.py --run=$RUN --out=$OUT/plot.png > /dev/null  # losses and timing per tick
echo "Samples: $OUT/grid.png; curves: $OUT/plot.png; run directory: $RUN"
