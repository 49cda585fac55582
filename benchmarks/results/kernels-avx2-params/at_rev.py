"""Run a script (argv[2:]) with d2moe imported from another commit's worktree (argv[1], e.g. `git worktree add
/tmp/m21/head 08e4606`): the editable install's mapping pointed there. The before/after rows of BENCHMARKS.md 0.17
alternate `at_rev.py WORKTREE ../kernels-g16-ch/avx2_build.py ...` with the tree's own run, each in its own process."""
import runpy
import sys

import __editable___d2moe_0_1_0_finder as f

for k, v in list(f.MAPPING.items()):
    f.MAPPING[k] = v.replace("/work/main", sys.argv[1])
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
