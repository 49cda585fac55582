"""d2moe as built at another commit: the editable install pointed at that commit's worktree (git worktree add /tmp/m20/old7a8 7a83518), then the CLI; bench_peers.py's cmd=python d2moe_at_rev.py (BENCHMARKS.md 0.16)."""
import __editable___d2moe_0_1_0_finder as f

for k, v in list(f.MAPPING.items()):
    f.MAPPING[k] = v.replace("/work/main", "/tmp/m20/old7a8")
from d2moe.cli import main

main()
