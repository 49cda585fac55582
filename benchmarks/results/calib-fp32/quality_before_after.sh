#!/bin/bash
# quality before/after: new tree (/work/main) and HEAD worktree (/tmp/s13/wt-head), per model
cd /work/main
L=/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp
AT=benchmarks/results/kernels-avx2-params/at_rev.py
for m in "$@"; do
  .venv/bin/python scripts/study_nested_fits.py /work/models/$m --heldout /work/models/heldout_all.txt --threads 1 \
     --variants subblock:g32:r1,calib:g32:r1 --llama $L --train /work/models/train_mix.txt > /work/models/q/new-$m.jsonl 2> /work/models/q/new-$m.err
  .venv/bin/python $AT /tmp/s13/wt-head /tmp/s13/wt-head/scripts/study_nested_fits.py /work/models/$m --heldout /work/models/heldout_all.txt --threads 1 \
     --variants calib:g32:r1 --train /work/models/train_mix.txt > /work/models/q/old-$m.jsonl 2> /work/models/q/old-$m.err
done
