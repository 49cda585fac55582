#!/bin/bash
# 65536 calibration tokens for both --calib and llama-imatrix, group 32, --bits 2,3,4
cd /tmp
PY=/work/main/.venv/bin/python
for m in tiny-k256 k256-s1 k256-s2; do
  $PY /work/main/scripts/study_nested_fits.py /work/models/$m --heldout /tmp/m14/heldout_all.txt --variants calib:g32:r1 --bits 2,3,4 --train /tmp/m16/train_mix.txt --calib-tokens 65536 --llama /work/peers/llama_cpp_python-0.3.36/vendor/llama.cpp > /tmp/m19/ct64k-$m.jsonl 2> /tmp/m19/ct64k-$m.err
done
touch /tmp/m19/ct64.done
