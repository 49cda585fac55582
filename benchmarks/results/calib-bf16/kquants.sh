#!/bin/bash
# The uncalibrated pack and llama.cpp's K-quants (plain and imatrix) on the bfloat16 copies quality.sh made:
# kquants.sh SEED... (from the repository root; LLAMA: llama.cpp source tree with build/bin; its converter needs
# `.venv/bin/pip install sentencepiece`, which d2moe itself does not).
R=benchmarks/results/calib-bf16
LLAMA=${LLAMA:-/work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp}
for s in "$@"; do
  .venv/bin/python scripts/study_nested_fits.py /work/models/seed$s-bf16 --heldout /work/models/heldout_all.txt \
    --threads 1 --variants subblock:g32:r1 --llama $LLAMA --train /work/models/train_mix.txt > $R/quality-seed$s-kquants.jsonl
done
