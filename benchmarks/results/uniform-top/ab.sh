#!/bin/bash
# ab.sh OLD_WORKTREE PACK BUDGET ROUNDS: `run --level 3 -m BUDGET` (every 3-bit expert fits, not every 4-bit one) at the old
# tree (through at_rev.py) and this one, alternating; one JSON line of stats each.
old=$1 pack=$2 budget=$3 rounds=${4:-2}
here=$(cd "$(dirname "$0")" && pwd)
cd /work/main
args=(run "$pack" -p "The history of the city begins" --max-new-tokens 32 --level 3 -m "$budget" --no-chat-template --json)
show='import json,sys; d=json.load(sys.stdin)["stats"]; print(json.dumps({k: d[k] for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "bytes_read", "setup_bytes_read", "fetch_ahead_reads", "reads")} | {"evictions": d["cache"]["evictions"], "budget": d["memory"]["budget_bytes"], "peak": d["memory"]["peak_bytes"]}))'
for r in $(seq 1 "$rounds"); do
  echo "old $(.venv/bin/python benchmarks/results/kernels-avx2-params/at_rev.py "$old" benchmarks/results/calib-spill/d2moe_main.py "${args[@]}" 2>/dev/null | .venv/bin/python -c "$show")"
  echo "new $(.venv/bin/d2moe "${args[@]}" 2>/dev/null | .venv/bin/python -c "$show")"
done
