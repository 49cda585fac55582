#!/bin/bash
# The whole calibrated pack of the 2-layer Mixtral-shaped checkpoint with each product dtype, one after the other
# (run from the repository root; OUT folders under /tmp/s14/mix).
R=benchmarks/results/calib-bf16
mkdir -p /tmp/s14/mix
for m in "$@"; do  # TAG: a suffix for the output names
  rm -rf /tmp/s14/mix/$m
  /usr/bin/time -v .venv/bin/python $R/products.py $m benchmarks/results/calib-fp32/d2moe_main.py pack /work/scale/mixtral /tmp/s14/mix/$m \
    --calib /work/models/train_mix.txt --json > $R/pack-calib-$m$TAG.json 2> $R/pack-calib-$m$TAG.time.txt
done
