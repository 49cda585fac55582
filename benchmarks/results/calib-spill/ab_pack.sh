#!/bin/bash
# pack --calib of CHECKPOINT at the starting commit (worktree OLD) and this tree, alternating, each under
# rss_timeline.py (RssAnon every 0.5 s, stderr lines timestamped, the --json report at the end):
# ab_pack.sh OLD CHECKPOINT TAG ROUNDS [LOG_DIR] (logs in LOG_DIR, default this folder)
old=$1 ckpt=$2 tag=$3 rounds=${4:-1}
here=$(cd "$(dirname "$0")" && pwd)
logs=$(cd "${5:-$here}" && pwd)
cd /work/main
PY=.venv/bin/python
args=(--calib /work/models/train_mix.txt --calib-tokens 32768 --workers 2 --json)
for r in $(seq 1 "$rounds"); do
  rm -rf /tmp/ab-old /tmp/ab-new
  $PY "$here/rss_timeline.py" "$logs/$tag-old-$r.log" -- $PY benchmarks/results/kernels-avx2-params/at_rev.py "$old" \
      "$here/d2moe_main.py" pack "$ckpt" /tmp/ab-old "${args[@]}"
  $PY "$here/rss_timeline.py" "$logs/$tag-new-$r.log" -- .venv/bin/d2moe pack "$ckpt" /tmp/ab-new "${args[@]}"
done
