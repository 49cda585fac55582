#!/bin/bash
# Quality of pack --calib's two product dtypes on bfloat16 copies of the trained models: quality.sh SEED...
# (from the repository root; models under /work/models, trained here if missing, ~15 min each on one thread).
R=benchmarks/results/calib-bf16
for s in "$@"; do
  M=/work/models/seed$s
  [ -f $M/config.json ] || .venv/bin/python scripts/train_tiny_moe.py --hidden 256 --intermediate 512 --steps 400 \
      --threads 1 --seed $s --out $M > $M.train.log 2>&1
  .venv/bin/python $R/to_bf16.py $M $M-bf16 > /dev/null
  for mode in float32 bfloat16; do
    .venv/bin/python $R/products.py $mode scripts/study_nested_fits.py $M-bf16 --heldout /work/models/heldout_all.txt \
      --threads 1 --variants calib:g32:r1 --train /work/models/train_mix.txt > $R/quality-seed$s-$mode.jsonl
  done
done
