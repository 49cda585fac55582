#!/bin/bash
# GPTQ damping 0.1 (pack's 0.01) for --calib at group 32, three seeds
cd /tmp
PY=/work/main/.venv/bin/python
for damp in 0.1; do
for m in tiny-k256 k256-s1 k256-s2; do
  $PY - /work/models/$m --heldout /tmp/m14/heldout_all.txt --variants calib:g32:r1 --bits 2,3,4 --train /tmp/m16/train_mix.txt > /tmp/m19/damp$damp-$m.jsonl 2> /tmp/m19/damp$damp-$m.err <<PYEOF
import sys, runpy
import d2moe.quantize.gptq as g
g.DAMP = $damp
sys.argv = ["study_nested_fits.py"] + sys.argv[1:]
runpy.run_path("/work/main/scripts/study_nested_fits.py", run_name="__main__")
PYEOF
done
done
touch /tmp/m19/damp.done
