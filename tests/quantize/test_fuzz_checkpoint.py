"""A bounded run of the checkpoint fuzz campaign (scripts/fuzz_checkpoint.py runs >= 10,000 cases).

Every case damages one file of a packed checkpoint (with a gate) and goes through the library's
load path, `d2moe inspect --verify` or `d2moe run`; the only acceptable outcomes are d2moe's own
error or success with weights (and tokens) identical to the pristine checkpoint's.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))

import fuzz_cases as fc  # noqa: E402


def test_bounded_fuzz_campaign_has_no_crash_hang_or_silent_case(tmp_path):
    pristine = fc.build_fixture(tmp_path / "fixture")
    reference = fc.load_everything(pristine)
    tokens = fc.run_tokens(pristine)
    (tmp_path / "work").mkdir()
    outcomes = {}
    for i in range(120):  # run and inspect shares raised so that each path is exercised
        outcome, detail = fc.run_case(i, 1, pristine, reference, tokens, tmp_path / "work", run_share=0.05,
                                      inspect_share=0.15)
        outcomes.setdefault(outcome, []).append(detail)
    bad = {k: v for k, v in outcomes.items() if k not in ("clean", "benign")}
    assert not bad, bad
    assert len(outcomes.get("clean", [])) > 60
    paths = {d.split(" ", 1)[0] for v in outcomes.values() for d in v}
    assert paths == {"load", "inspect", "run"}
