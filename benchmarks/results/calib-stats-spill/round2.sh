#!/bin/bash
# second round, new first then old (alternating order against round 1)
cd /work/main
R=benchmarks/results
args=(--calib /work/models/train_mix.txt --calib-tokens 32768 --workers 2 --json)
rm -rf /tmp/ab-new /tmp/ab-old
.venv/bin/python $R/calib-spill/rss_timeline.py $R/calib-stats-spill/m2-new-2.log -- .venv/bin/python $R/kernels-avx2-params/at_rev.py /tmp/wt-new $R/calib-spill/d2moe_main.py pack /work/scale/mixtral /tmp/ab-new "${args[@]}"
.venv/bin/python $R/calib-spill/rss_timeline.py $R/calib-stats-spill/m2-old-2.log -- .venv/bin/python $R/kernels-avx2-params/at_rev.py /tmp/wt-old $R/calib-spill/d2moe_main.py pack /work/scale/mixtral /tmp/ab-old "${args[@]}"
