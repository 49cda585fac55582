#!/bin/bash
cd /tmp
PY=/work/main/.venv/bin/python
rm -rf /tmp/m19/mixcal2
/usr/bin/time -v $PY -m d2moe pack /work/scale/mixtral /tmp/m19/mixcal2 --calib /tmp/m16/train_mix.txt --json > /tmp/m19/mixcal2.json 2> /tmp/m19/mixcal2.err
for m in tiny-k256 k256-s1 k256-s2; do
  $PY /work/main/scripts/study_nested_fits.py /work/models/$m --heldout /tmp/m14/heldout_all.txt --variants calib:g32:r1 --bits 2,3,4 --train /tmp/m16/train_mix.txt --calib-tokens 32768 > /tmp/m19/chunk32k-$m.jsonl 2> /tmp/m19/chunk32k-$m.err
done
touch /tmp/m19/after.done
