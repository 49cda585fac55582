#!/bin/bash
# `d2moe run` of a long prompt at the smallest budget it accepts, old tree (worktree via at_rev.py) and this tree in
# turn: prompt tokens, RSS growth and budget in MiB.   at_minimum.sh WORKTREE TEXT CHARS PACK...
wt=$1 text=$2 chars=$3; shift 3
cli=$(mktemp --suffix=.py); printf 'import sys\nfrom d2moe.cli import main\nsys.exit(main(sys.argv[1:]))\n' > $cli
P="$(head -c $chars $text)"
for pack in "$@"; do
  for side in old new; do
    if [ $side = old ]; then pre="benchmarks/results/kernels-avx2-params/at_rev.py $wt"; else pre=""; fi
    m=$(.venv/bin/python $pre $cli run $pack -m 1MiB -p "$P" --max-new-tokens 8 2>&1 | grep -o 'use --memory-budget [0-9]*MiB' | awk '{print $3}')
    .venv/bin/python $pre $cli run $pack -m $m -p "$P" --max-new-tokens 8 --json 2>/dev/null | python3 -c "
import sys, json; s = json.load(sys.stdin)['stats']; m = s['memory']
print('$(basename $pack)', '$side', s['prompt_tokens'], 'tokens: RSS growth', round(m['rss_peak_delta_bytes'] / 2**20, 1),
      'MiB, budget', round(m['budget_bytes'] / 2**20), 'MiB')"
  done
done
rm -f $cli
