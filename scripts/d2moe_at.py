"""Run the d2moe CLI from another checkout (e.g. an earlier commit) with this environment's packages.

For side-by-side benchmarks of two builds in one run (`bench_peers.py --d2moe "...,cmd=python
scripts/d2moe_at.py /tmp/old"`): the editable install maps `d2moe.*` onto this checkout's folders; this
points the same mapping at CHECKOUT before anything is imported.

    git worktree add /tmp/old 42f2db2
    .venv/bin/python scripts/d2moe_at.py /tmp/old run PACKED -m 2GiB --json
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def main() -> int:
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "d2moe_cli").is_dir():
        sys.exit("usage: d2moe_at.py CHECKOUT [d2moe arguments...]: CHECKOUT must hold a d2moe_cli/ folder")
    other = str(Path(sys.argv[1]).resolve())
    finder = next((m for name, m in sys.modules.items() if name.startswith("__editable__") and "d2moe" in name
                   and hasattr(m, "MAPPING")), None)
    if finder is None:
        sys.exit("d2moe_at.py needs d2moe installed in editable mode here (`make setup`)")
    for name, path in finder.MAPPING.items():
        finder.MAPPING[name] = path.replace(str(HERE), other)
    sys.argv = ["d2moe", *sys.argv[2:]]
    from d2moe.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
