#!/bin/bash
# pack's default --calib-tokens (16384) against the studies' 32768, group 32, --bits 2,3,4
cd /tmp
PY=/work/main/.venv/bin/python
for m in tiny-k256 k256-s1 k256-s2; do
  $PY /work/main/scripts/study_nested_fits.py /work/models/$m --heldout /tmp/m14/heldout_all.txt --variants calib:g32:r1 --bits 2,3,4 --train /tmp/m16/train_mix.txt --calib-tokens 16384 > /tmp/m19/ct16k-$m.jsonl 2> /tmp/m19/ct16k-$m.err
done
touch /tmp/m19/ct.done
