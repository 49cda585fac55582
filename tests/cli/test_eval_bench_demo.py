"""`d2moe eval`, `d2moe bench`, `d2moe demo` end to end on packed tiny models (and the embedded one)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_runner import invoke
from packed import packed_tiny
from tiny_models import make_tiny_checkpoint

from d2moe.apps.evaluate import lm_eval_available  # noqa: E402
from d2moe.errors import EXIT_ENVIRONMENT, EXIT_INPUT, EXIT_IO, EXIT_USAGE  # noqa: E402

TASKS = Path(__file__).parents[1] / "data" / "tasks"
TEXT = "the quick brown fox jumps over the lazy dog . a mixture of experts routes every token to a few experts . " * 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 3, 4))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "eval.txt"
    f.write_text(TEXT)
    return f


def _cli(capsys, *args) -> tuple[int, str, str]:
    return invoke(capsys, *args)


@torch.no_grad()
def _reference_nll(src: Path, packed: Path, ids: list[int], level: int | None) -> float:
    """Summed NLL by hand: the transformers model (with our level-`level` experts put in), one forward."""
    from transformers import AutoModelForCausalLM

    from d2moe.quantize import dequantize
    from d2moe.quantize.format import open_checkpoint

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    if level is not None:
        ckpt = open_checkpoint(packed)
        for layer in ckpt.moe_layers:
            experts = model.get_submodule(ckpt.adapter.experts_path(layer))
            for e in range(ckpt.num_experts):
                mats = ckpt.decode_expert(layer, e, level, ckpt.read_prefix(layer, e, level))
                mats = {m: t.to_mwq() for m, t in mats.items()}  # packed views -> MWQ tensors
                w = {m: dequantize(t, level) for m, t in mats.items()}
                experts.gate_up_proj[e].copy_(torch.cat([w["gate"], w["up"]], dim=0))
                experts.down_proj[e].copy_(w["down"])
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0]
    return F.cross_entropy(logits[:-1].double(), x[0, 1:], reduction="sum").item()


def test_eval_perplexity_per_level_equals_hand_computed_reference(pair, text_file, capsys):
    src, packed = pair
    code, out, err = _cli(capsys, "eval", packed, "--text", text_file, "--seq-len", 64, "--max-tokens", 50,
                          "--level", "all", "--reference", src, "--json")
    assert code == 0 and "is not the checkpoint" not in err  # the source pack recorded
    doc = json.loads(out)
    rows = {r["target"]: r for r in doc["results"]}
    assert list(rows) == ["2-bit", "3-bit", "4-bit", "reference"]
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(packed))(TEXT)["input_ids"][:50]
    assert doc["tokens"] == 50
    for target, level in (("4-bit", 4), ("2-bit", 2), ("reference", None)):
        ppl = rows[target]["perplexity"]
        assert ppl["tokens"] == 49 and ppl["windows"] == 1
        assert ppl["nll_sum"] == pytest.approx(_reference_nll(src, packed, ids, level), rel=1e-4), target
    for target in ("2-bit", "3-bit", "4-bit"):
        assert rows[target]["tokens_per_level"] == {target[0]: 2 * 2 * 50}  # 2 layers x top-2 x tokens in the window
        assert rows[target]["mean_bits"] == int(target[0])
    assert rows["2-bit"]["expert_bytes"] < rows["3-bit"]["expert_bytes"] < rows["4-bit"]["expert_bytes"]


def test_eval_policy_table_and_strided_windows(pair, text_file, capsys):
    _, packed = pair
    code, out, _ = _cli(capsys, "eval", packed, "--text", text_file, "--seq-len", 16, "--stride", 8,
                        "--max-tokens", 40, "--policy", "d2moe,moqe-dynaio@3", "--memory-budget", "32MiB")
    assert code == 0
    assert "d2moe" in out and "moqe-dynaio@3" in out and "perplexity" in out
    assert "router weight" in out  # d2moe without a trained gate: router-weight levels


@pytest.mark.skipif(not lm_eval_available(), reason="lm-eval is not installed (pip install lm-eval)")
def test_eval_zero_shot_local_task(pair, capsys):
    _, packed = pair
    code, out, _ = _cli(capsys, "eval", packed, "--tasks", "d2moe_tiny_mc", "--tasks-dir", TASKS, "--level", "4",
                        "--json")
    assert code == 0
    (row,) = json.loads(out)["results"]
    assert row["perplexity"] is None
    acc = row["zero_shot"]["d2moe_tiny_mc"]
    assert set(acc) >= {"acc", "acc_norm", "acc_stderr"}
    assert acc["acc"] in {i / 5 for i in range(6)}  # five items


def test_eval_errors_are_one_line(pair, text_file, capsys, monkeypatch):
    _, packed = pair
    code, _, err = _cli(capsys, "eval", packed)
    assert code == EXIT_USAGE and "nothing to evaluate" in err
    code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--level", "8")
    assert code == EXIT_USAGE and "--level 8 is not a packed level" in err
    code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--level", "4", "--policy", "d2moe")
    assert code == EXIT_USAGE and "exclude each other" in err
    code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--seq-len", 8, "--stride", 9)
    assert code == EXIT_USAGE and "--stride" in err
    binary = text_file.parent / "shard.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    code, out, err = _cli(capsys, "eval", packed, "--text", binary, "--level", "4")  # was scored: ppl of garbage
    assert code == EXIT_INPUT and "is not UTF-8 text" in err and out == ""
    for empty in ("", " ", ","):  # audit: --level "" ended in an IndexError traceback
        code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--level", empty)
        assert code == EXIT_USAGE and "give a bit-width (4), a list (2,4) or 'all'" in err and err.count("\n") == 1
        code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--policy", empty)  # ran the default
        assert code == EXIT_USAGE and "names no policy" in err
    code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--limit", 0)  # did nothing without --tasks
    assert code == EXIT_USAGE and "--limit caps the items of each --tasks task" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    code, _, err = _cli(capsys, "eval", packed, "--tasks", "piqa")
    assert code == EXIT_ENVIRONMENT and "pip install lm-eval" in err


def test_bench_plot_that_cannot_be_written_is_refused_before_the_sweep(pair, tmp_path, capsys):
    _, packed = pair
    (tmp_path / "afile").write_text("")  # a folder that cannot be, even for root
    code, out, err = _cli(capsys, "bench", packed, "--budgets", "100%", "--policies", "d2moe", "--max-new-tokens", 2,
                          "--repeats", 1, "--plot", tmp_path / "afile" / "b.png")
    assert code == EXIT_IO and "--plot" in err and "cannot write in" in err and out == ""


def test_bench_json_plot_and_table(pair, tmp_path, capsys):
    _, packed = pair
    png = tmp_path / "bench.png"
    code, out, _ = _cli(capsys, "bench", packed, "--budgets", "25%,100%", "--policies", "d2moe,hold-int4",
                        "--max-new-tokens", 3, "--repeats", 1, "--prompt", "hello world", "--plot", png, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == "d2moe.bench/1" and doc["policies"] == ["d2moe", "hold-int4"]
    by = {(r["policy"], r["budget_label"]): r for r in doc["results"]}
    assert by[("hold-int4", "25%")]["status"] == "n/a" and by[("hold-int4", "100%")]["status"] == "ok"
    assert by[("d2moe", "25%")]["status"] == "ok"
    assert png.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = _cli(capsys, "bench", packed, "--budgets", "25%", "--policies", "hold-int4,d2moe",
                        "--max-new-tokens", 2, "--repeats", 1)
    assert code == 0 and "n/a (needs" in out and "d2moe" in out
    code, _, err = _cli(capsys, "bench", packed, "--policies", "warp-drive")
    assert code == EXIT_USAGE and "warp-drive" in err
    # a sweep that measured nothing fails a CI job, its JSON still on stdout
    code, out, err = _cli(capsys, "bench", packed, "--budgets", "1MiB", "--policies", "d2moe", "--max-new-tokens", 2,
                          "--repeats", 1, "--json")
    assert code == EXIT_USAGE and "no configuration ran" in err and json.loads(out)["results"][0]["status"] == "n/a"


def test_demo_packs_once_streams_and_reports(pair, tmp_path, capsys):
    src, _ = pair
    out_dir = tmp_path / "demo"
    code, out, err = _cli(capsys, "demo", "--model", src, "--out", out_dir, "--max-new-tokens", 4,
                          "--prompt", "the quick brown fox")
    assert code == 0
    assert "packing" in err and out.startswith("the quick brown fox")
    assert "peak memory / budget" in out and "expert cache hit rate" in out
    code, out, err = _cli(capsys, "demo", "--model", src, "--out", out_dir, "--max-new-tokens", 4, "--json")
    assert code == 0 and "packing" not in err
    doc = json.loads(out)
    assert doc["packed_now"] is False
    mem = doc["stats"]["memory"]
    assert mem["peak_bytes"] <= mem["budget_bytes"]
    # the budget leaves room for under half the experts: the rest must stream from disk
    assert doc["stats"]["cache"]["capacity_bytes"] < 0.5 * doc["expert_bytes"]
    assert doc["stats"]["bytes_read"] > 0


def test_demo_out_never_replaces_another_models_pack_or_a_users_folder(pair, tmp_path, capsys):
    """`demo --out` may repack its own model (other --bits) but not a pack of another model (audit: it replaced one
    silently) nor a folder that is not a pack (whose message named a --force demo does not have)."""
    src, packed = pair
    theirs = tmp_path / "theirs"
    shutil.copytree(packed, theirs)
    other_src = make_tiny_checkpoint("olmoe", tmp_path / "other")
    code, _, err = _cli(capsys, "demo", "--model", other_src, "--out", theirs, "--max-new-tokens", 2)
    assert code == EXIT_USAGE and "holds a packed checkpoint of another model" in err and err.count("\n") == 1, err
    assert all((theirs / f.name).read_bytes() == f.read_bytes() for f in Path(packed).iterdir() if f.is_file())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    code, _, err = _cli(capsys, "demo", "--model", src, "--out", mine, "--max-new-tokens", 2)
    assert code == EXIT_USAGE and "is not a packed checkpoint: name a new folder" in err and "--force" not in err
    code, _, err = _cli(capsys, "demo", "--model", src, "--out", theirs, "--max-new-tokens", 2, "--bits", "2,4", "--json")
    assert code == 0, err  # the same model at other levels: the demo's own to repack


def test_demo_on_the_embedded_model(tmp_path, capsys):
    from d2moe.commands.demo import embedded_model_dir
    from d2moe.errors import InputError

    try:
        embedded_model_dir()
    except InputError as exc:
        pytest.skip(f"embedded model not built yet: {exc}")
    code, out, _ = _cli(capsys, "demo", "--out", tmp_path / "demo", "--max-new-tokens", 8, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["stats"]["generated_tokens"] >= 1 and doc["text"].strip()
    assert doc["stats"]["memory"]["peak_bytes"] <= doc["stats"]["memory"]["budget_bytes"]
    assert doc["stats"]["bytes_read"] > 0


def test_demo_packs_a_model_whose_widths_the_default_group_does_not_divide(tmp_path):
    """demo has no --group-size: for expert widths 64 and 80 (gcd 16) it packs at group 16 where pack would ask."""
    from tiny_models import make_tiny_checkpoint

    from d2moe.commands.demo import demo_group_size

    src = make_tiny_checkpoint("mixtral", tmp_path / "w80", intermediate_size=80)
    assert demo_group_size(src, 32) == 16
    assert demo_group_size(make_tiny_checkpoint("mixtral", tmp_path / "w128"), 32) == 32


def test_demo_runs_a_hold_policy_with_every_expert_held_and_names_its_own_bits_option(pair, tmp_path, capsys):
    src, _ = pair
    out_dir = tmp_path / "demo"
    code, out, err = _cli(capsys, "demo", "--model", src, "--out", out_dir, "--max-new-tokens", 4, "--policy", "hold-int4",
                          "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["stats"]["bytes_read"] == 0 and doc["stats"]["memory"]["peak_bytes"] <= doc["stats"]["memory"]["budget_bytes"]
    code, out, err = _cli(capsys, "demo", "--model", src, "--out", out_dir, "--max-new-tokens", 4, "--policy", "hold-int8",
                          "--prompt", "never shown")
    assert code == EXIT_USAGE and "--bits 2,3,4,8" in err and "never shown" not in out


def test_eval_notes_a_reference_that_is_not_the_packed_source(pair, text_file, tmp_path, capsys):
    from tiny_models import make_tiny_checkpoint

    _, packed = pair
    other = make_tiny_checkpoint("qwen3_moe", tmp_path / "other")
    code, _, err = _cli(capsys, "eval", packed, "--text", text_file, "--max-tokens", 20, "--level", "2",
                        "--reference", other, "--json")
    assert code == 0 and f"--reference {other} is not the checkpoint" in err


def test_eval_marks_a_policy_that_does_not_fit_the_budget_na_and_scores_the_rest(pair, text_file, capsys):
    from d2moe.apps.evaluate import UNLIMITED_BUDGET
    from d2moe.runtime.session import RunOptions, plan_run

    _, packed = pair
    args = ["eval", packed, "--text", text_file, "--max-tokens", 40, "--seq-len", 32]
    *_, plan = plan_run(packed, RunOptions(memory_budget=UNLIMITED_BUDGET, policy="d2moe", max_tokens=32))
    code, out, err = _cli(capsys, *args, "--policy", "d2moe,hold-int4", "-m", f"{plan.minimum + 4096}B", "--json")
    assert code == 0, err
    rows = {r["target"]: r for r in json.loads(out)["results"]}
    assert rows["d2moe"]["status"] == "ok" and rows["d2moe"]["perplexity"]["ppl"] > 1
    assert rows["hold-int4"]["status"] == "n/a" and "hold-int4" in rows["hold-int4"]["reason"]
    assert rows["hold-int4"].keys() == rows["d2moe"].keys()  # one shape per row for a JSON reader


def test_eval_refuses_a_percentage_budget_in_one_line(pair, text_file, capsys):
    code, _, err = _cli(capsys, "eval", pair[1], "--text", text_file, "-m", "50%")
    assert code == EXIT_USAGE and "eval takes a size" in err and len(err.strip().splitlines()) == 1


def test_eval_notes_windows_past_the_models_context(pair, text_file, capsys):
    import json as _json

    _, packed = pair
    context = _json.loads((Path(packed) / "config.json").read_text())["max_position_embeddings"]
    long_text = Path(text_file).parent / "long.txt"
    long_text.write_text(Path(text_file).read_text() * (4 * context // 40 + 1))
    code, _, err = _cli(capsys, "eval", packed, "--text", long_text, "--level", "2", "--seq-len", 2 * context,
                        "--max-tokens", 2 * context + 1, "--json")
    assert code == 0 and f"past the model's context of {context} tokens" in err
