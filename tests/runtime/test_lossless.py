"""run --lossless: exact source experts from the coded tier; logits equal transformers' in the same dtype."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_tiny_checkpoint

from d2moe.errors import UsageError
from d2moe.quantize import MWQConfig
from d2moe.quantize.convert.pack import pack_checkpoint
from d2moe.runtime.generate import SamplingOptions
from d2moe.runtime.session import RunOptions, Session

BIG = 1 << 30


@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def packs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lossless-{request.param}")
    src = make_tiny_checkpoint("mixtral", root / "src", dtype=request.param, num_local_experts=4)
    outs = {}
    for codec in ("zstd", "none"):
        outs[codec] = root / f"packed-{codec}"
        pack_checkpoint(src, outs[codec], MWQConfig(bits=(2, 4)), progress=False, lossless=codec)
    return request.param, src, outs


def test_logits_equal_transformers_in_the_same_dtype(packs):
    from transformers import AutoModelForCausalLM

    dtype, src, outs = packs
    torch.set_num_threads(1)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), experts_implementation="eager").eval()
    ids = torch.randint(0, 200, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
        for codec in ("zstd", "none"):
            with Session(outs[codec], RunOptions(memory_budget=BIG, lossless=True, max_tokens=64, threads=1)) as s:
                assert s.model.dtype == getattr(torch, dtype)
                assert torch.equal(s.model(input_ids=ids).logits, want), codec
        greedy = ref.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))[0, 20:]
    with Session(outs["zstd"], RunOptions(memory_budget=BIG, lossless=True, max_tokens=64, threads=1)) as s:
        report = s.generate(token_ids=[ids[0].tolist()], sampling=SamplingOptions(max_new_tokens=8))
    assert report.token_ids[0] == greedy.tolist()
    assert report.stats["lossless"]["codec"] == "zstd" and report.stats["tokens_per_level"].keys() == {
        str(torch.finfo(getattr(torch, dtype)).bits)}


def test_budget_never_changes_lossless_output(packs):
    from d2moe.runtime.session import plan_run

    _, _, outs = packs
    ckpt, *_, plan = plan_run(outs["zstd"], RunOptions(memory_budget=BIG, lossless=True, max_tokens=64, threads=1))
    small = plan.budget - plan.expert_cache + 3 * ckpt.raw_nbytes  # room for 3 of 8 experts
    got = []
    for budget in (BIG, small):
        with Session(outs["zstd"], RunOptions(memory_budget=budget, lossless=True, max_tokens=64, threads=1)) as s:
            r = s.generate(token_ids=[[5, 6, 7, 8, 9]], sampling=SamplingOptions(max_new_tokens=10))
        got.append((r.token_ids[0], r.stats["bytes_read"], r.stats["memory"]["peak_bytes"] <= budget))
    assert got[0][0] == got[1][0] and got[1][1] > got[0][1] and got[1][2]


def test_lossless_needs_the_tier(tmp_path_factory):
    from packed import packed_tiny

    _, packed = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8))
    with pytest.raises(UsageError, match="--lossless"):
        Session(packed, RunOptions(memory_budget=BIG, lossless=True))


@pytest.mark.parametrize("option, match", [
    (dict(policy="hold-int8"), "at no level: drop --policy hold-int8"),
    (dict(level=2), "at no level: drop --level"),
    (dict(router_levels=(4, 2)), "at no level: drop --router-levels"),
    (dict(dense_weights="int8"), "drop --dense-weights int8"),
    (dict(on_miss="skip"), "--on-miss skip would make its output inexact"),
])
def test_lossless_refuses_level_and_dense_options_by_name(packs, option, match):
    """They used to say re-pack with --bits 8,16 (16 is no level) or blame a missing C compiler."""
    from d2moe.runtime.run_plan import plan_run

    _, _, outs = packs
    with pytest.raises(UsageError, match=match):
        plan_run(outs["zstd"], RunOptions(memory_budget=BIG, lossless=True, **option))
