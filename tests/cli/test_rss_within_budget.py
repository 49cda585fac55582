"""The memory promise as the operating system sees it: a fresh `d2moe run` process's RSS growth
after start-up stays within --memory-budget over a long generation, at the smallest budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ASSET = Path(__file__).parents[2] / "d2moe_cli" / "assets" / "tiny-mixtral"


def _d2moe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2moe", *args], capture_output=True, text=True, timeout=600)


def _at_smallest_budget(args: list[str]) -> tuple[dict, int]:
    """`d2moe run *args` at the smallest budget it accepts (the one its below-minimum error names): (stats, budget)."""
    too_small = _d2moe(*args, "-m", "1MiB")
    minimum = re.search(r"use --memory-budget (\d+)MiB", too_small.stderr)
    assert too_small.returncode == 2 and minimum, too_small.stderr
    proc = _d2moe(*args, "-m", f"{minimum.group(1)}MiB")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["stats"], int(minimum.group(1)) * 2**20


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    out = tmp_path_factory.mktemp("rss") / "packed"
    proc = _d2moe("pack", str(ASSET), str(out), "--bits", "2,3,4", "--json")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("dense", ["source", "int8", "int4"])  # converted while read; their saving goes to the cache
def test_rss_growth_stays_within_the_smallest_budget_over_a_long_generation(packed, dense):
    args = ["run", str(packed), "-p", "Once upon a time", "--max-new-tokens", "300", "--no-chat-template", "--json",
            "--dense-weights", dense]
    stats, budget = _at_smallest_budget(args)
    mem = stats["memory"]
    assert stats["generated_tokens"] >= 100 and stats["cache"]["evictions"] > 0  # it really offloaded
    assert 0 < mem["peak_bytes"] <= budget
    assert 0 < mem["rss_peak_delta_bytes"] <= budget, (mem["rss_peak_delta_bytes"], budget)


def test_rss_growth_stays_within_the_smallest_budget_over_a_long_prompt(packed):
    """A 3500-token prompt prefills in chunks, each routing a different count of tokens to every expert: bf16 GEMMs
    of every such shape kept one oneDNN kernel each, 147 MiB of growth under a 79 MiB budget (BENCHMARKS.md §0.18)."""
    text = (Path(__file__).parents[2] / "d2moe_cli" / "assets" / "text" / "grimm_tales.heldout.txt").read_text()[:12000]
    args = ["run", str(packed), "-p", text, "--max-new-tokens", "4", "--no-chat-template", "--json"]
    stats, budget = _at_smallest_budget(args)
    assert stats["prompt_tokens"] > 3000
    assert 0 < stats["memory"]["rss_peak_delta_bytes"] <= budget, (stats["memory"]["rss_peak_delta_bytes"], budget)


def test_rss_growth_stays_within_the_smallest_budget_over_a_long_prompt_with_narrow_experts(tmp_path):
    """DeepSeek-V3 with 96-wide experts, three of eight per token: the tiles' GEMMs take so many token counts that
    their kept kernels were most of the budget (71 MiB of 61 with columns padded to multiples of 16, on a CPU with
    AMX; BENCHMARKS.md §0.19). The padding now leaves fewer shapes and the plan counts them."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from tiny_models import make_tiny_checkpoint

    src = make_tiny_checkpoint("deepseek_v3", tmp_path / "src", dtype="bfloat16", tokenizer=False, hidden_size=128,
                               moe_intermediate_size=96, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
                               topk_group=2, n_shared_experts=2, vocab_size=4096, max_position_embeddings=4096,
                               q_lora_rank=48, initializer_range=0.15)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSET / name, src / name)
    weights = load_file(src / "model.safetensors")  # biased routers: uneven loads, many token counts per expert
    for name, t in weights.items():
        if name.endswith("e_score_correction_bias"):
            weights[name] = (torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) * 0.65).to(t.dtype)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    proc = _d2moe("pack", str(src), str(tmp_path / "packed"), "--bits", "2,3,4", "--json")
    assert proc.returncode == 0, proc.stderr
    text = (Path(__file__).parents[2] / "d2moe_cli" / "assets" / "text" / "grimm_tales.heldout.txt").read_text()[:12000]
    args = ["run", str(tmp_path / "packed"), "-p", text, "--max-new-tokens", "4", "--no-chat-template", "--json"]
    stats, budget = _at_smallest_budget(args)
    assert stats["prompt_tokens"] > 3000
    assert 0 < stats["memory"]["rss_peak_delta_bytes"] <= budget, (stats["memory"]["rss_peak_delta_bytes"], budget)


SCALE = Path(os.environ.get("D2MOE_SCALE_CHECKPOINT", "/work/scale/olmoe-d2"))


@pytest.mark.slow
@pytest.mark.skipif(not (SCALE / "d2moe.json").is_file(),
                    reason=f"no real-shape packed checkpoint at {SCALE}: build one with scripts/make_scale_checkpoint.py "
                           "and `d2moe pack`, then set D2MOE_SCALE_CHECKPOINT")
def test_rss_growth_stays_within_the_smallest_budget_at_real_expert_shapes():
    """The same promise at real expert shapes (OLMoE: 64 experts of 1024x2048 per layer, bf16 dense)."""
    args = ["run", str(SCALE), "-p", "Once upon a time", "--max-new-tokens", "200", "--no-chat-template", "--json"]
    stats, budget = _at_smallest_budget(args)
    mem = stats["memory"]
    assert stats["generated_tokens"] >= 100 and stats["cache"]["evictions"] > 0
    assert 0 < mem["peak_bytes"] <= budget
    assert 0 < mem["rss_peak_delta_bytes"] <= budget, (mem["rss_peak_delta_bytes"], budget)
