#!/bin/bash
# the one-layer checkpoint with the new tree (cf46b02, worktree /tmp/wt-new), after round 2: flat in depth?
while pgrep -f round2.sh >/dev/null; do sleep 5; done
cd /work/main
R=benchmarks/results
rm -rf /tmp/ab-m1
.venv/bin/python $R/calib-spill/rss_timeline.py $R/calib-stats-spill/m1-new-1.log -- .venv/bin/python $R/kernels-avx2-params/at_rev.py /tmp/wt-new $R/calib-spill/d2moe_main.py pack /work/scale/mixtral1 /tmp/ab-m1 --calib /work/models/train_mix.txt --calib-tokens 32768 --workers 2 --json
