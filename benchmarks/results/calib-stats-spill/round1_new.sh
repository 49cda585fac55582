#!/bin/bash
# round 1, new: once the old pack (calib-spill/ab_pack.sh, PID 13614) ended, the tree at cf46b02 (worktree /tmp/wt-new) under the same timeline
while kill -0 13614 2>/dev/null; do sleep 5; done
cd /work/main
R=benchmarks/results
rm -rf /tmp/ab-new  # the tree at cf46b02
.venv/bin/python $R/calib-spill/rss_timeline.py $R/calib-stats-spill/m2-new-1.log -- .venv/bin/python $R/kernels-avx2-params/at_rev.py /tmp/wt-new $R/calib-spill/d2moe_main.py pack /work/scale/mixtral /tmp/ab-new --calib /work/models/train_mix.txt --calib-tokens 32768 --workers 2 --json
