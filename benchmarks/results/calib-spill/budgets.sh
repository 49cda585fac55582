#!/bin/bash
# pack --calib's fit (study_nested_fits.py's calib variant) on the three trained models, with the calibration's
# memory budgets as they are (whole second moments, 256 samples per expert) and as small as a deep model gets them
# under one budget for the whole model (Mixtral-8x7B, 256 experts: 32-column blocks, 56 samples per expert):
# HESSIAN_BYTES=0.8e6 and SAMPLE_BYTES=688e3 (budgets per layer) give these 8-expert layers the same blocks and sample size.
# usage: budgets.sh NAME HESSIAN_BYTES SAMPLE_BYTES SEEDS...
name=$1 hb=$2 sb=$3; shift 3
PY=/work/main/.venv/bin/python
cd "$(dirname "$0")"
for s in "$@"; do
  $PY - /work/models/seed$s --heldout /work/models/heldout_all.txt --variants calib:g32:r1 --bits 2,3,4 \
      --train /work/models/train_mix.txt > $name-seed$s.jsonl 2> $name-seed$s.err <<PYEOF
import runpy, sys
import d2moe.router_train.activations as a
a.HESSIAN_BYTES, a.SAMPLE_BYTES = int($hb), int($sb)
sys.argv = ["study_nested_fits.py"] + sys.argv[1:]
runpy.run_path("/work/main/scripts/study_nested_fits.py", run_name="__main__")
PYEOF
done
