"""`d2moe run` end to end on a packed tiny checkpoint, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from cli_runner import invoke
from packed import packed_tiny

from d2moe.errors import EXIT_INPUT, EXIT_USAGE, UsageError  # noqa: E402


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8))[1]


def _run(capsys, *args) -> tuple[int, str, str]:
    return invoke(capsys, "run", *args)


def test_run_json_reports_texts_and_stats(packed, capsys):
    code, out, _ = _run(capsys, packed, "--prompt", "hello world", "--memory-budget", "64MiB",
                        "--max-new-tokens", "5", "--router-levels", "8,2", "--json")
    assert code == 0
    doc = json.loads(out)
    assert len(doc["outputs"]) == 1 and doc["outputs"][0]["tokens"] >= 1
    stats = doc["stats"]
    assert stats["memory"]["budget_bytes"] == 64 * 2**20
    assert stats["memory"]["peak_bytes"] <= stats["memory"]["budget_bytes"]
    assert set(stats["tokens_per_level"]) == {"2", "8"}


def test_a_percentage_budget_is_what_the_run_holds_besides_experts_plus_that_share_of_the_expert_set(packed, capsys):
    """`run -m P%` reads P as bench's --budgets does: 100% holds every expert at level 4 beside the run's own dense
    weights, KV and workspace, so none is evicted; 50% is half the expert set less."""
    from d2moe.quantize.format import open_checkpoint

    ckpt = open_checkpoint(packed)
    expert_set = len(ckpt.moe_layers) * ckpt.num_experts * ckpt.level_nbytes(4)
    docs = {}
    for pct in ("50%", "100%"):
        code, out, _ = _run(capsys, packed, "-p", "hello world", "-m", pct, "--max-new-tokens", "4",
                            "--policy", "moqe-dynaio", "--level", "4", "--json")
        assert code == 0
        docs[pct] = json.loads(out)["stats"]
    budgets = {k: d["memory"]["budget_bytes"] for k, d in docs.items()}
    assert abs(budgets["100%"] - budgets["50%"] - expert_set // 2) <= 1
    assert docs["100%"]["cache"]["capacity_bytes"] >= expert_set and docs["100%"]["cache"]["evictions"] == 0
    assert docs["50%"]["memory"]["peak_bytes"] <= budgets["50%"]


def test_a_budget_too_small_is_told_the_fix_in_the_form_it_was_given(packed, capsys, monkeypatch):
    """A percentage is told the smallest percentage that runs, an environment variable its own setting, and each
    fix runs (both used to be told `--memory-budget N MiB`)."""
    import re

    args = ("-p", "hello", "--policy", "hold-int4", "--max-new-tokens", "2", "--json")
    code, _, err = _run(capsys, packed, *args, "-m", "1%")
    assert code == EXIT_USAGE and err.count("\n") == 1, err
    assert re.search(r"--memory-budget 1% is [0-9.]+ \w+ here: ", err), err
    fix = re.search(r"use --memory-budget (\d+)% or more \((\d+)MiB\)", err)
    assert fix and int(fix.group(1)) > 1, err
    code, out, err = _run(capsys, packed, *args, "-m", f"{fix.group(1)}%")
    assert code == 0, err
    code, _, err = _run(capsys, packed, *args, "-m", f"{int(fix.group(1)) - 1}%")
    assert code == EXIT_USAGE, "the smallest percentage told is the smallest that runs"

    monkeypatch.setenv("D2MOE_MEMORY_BUDGET", "1MiB")
    code, _, err = _run(capsys, packed, *args)
    fix = re.search(r"use D2MOE_MEMORY_BUDGET=(\d+)MiB or more", err)
    assert code == EXIT_USAGE and fix and "--memory-budget" not in err, err
    monkeypatch.setenv("D2MOE_MEMORY_BUDGET", f"{fix.group(1)}MiB")
    code, _, err = _run(capsys, packed, *args)
    assert code == 0, err


def test_new_tokens_past_the_context_do_not_raise_the_budget(packed, capsys):
    """Generation stops at the model's context, so the KV cache is sized for what fits in it: --max-new-tokens 10**9
    asked for a budget of petabytes (audit) though it generates as many tokens as the context leaves."""
    import re

    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.generate import context_length

    context = context_length(open_checkpoint(packed).config)
    assert context is not None

    def minimum_told(new_tokens: int) -> int:
        code, _, err = _run(capsys, packed, "-p", "hello", "-m", "1MiB", "--max-new-tokens", str(new_tokens))
        assert code == EXIT_USAGE, err
        return int(re.search(r"--memory-budget (\d+)MiB or more", err).group(1))

    assert minimum_told(10**9) == minimum_told(context)  # was 4.6e15 MiB: KV for a billion tokens
    code, out, err = _run(capsys, packed, "-p", "hello", "-m", f"{minimum_told(10**9)}MiB", "--max-new-tokens",
                          str(10**9), "--json")
    assert code == 0 and "the model's context is" in err, err


def test_a_checkpoint_in_a_folder_whose_name_is_not_utf8_runs(packed, tmp_path, capsys):
    """pack and inspect took such a folder; run failed in the tokenizers library, which takes UTF-8 paths only."""
    import os
    import shutil

    odd = shutil.copytree(packed, tmp_path / os.fsdecode(b"packed-\xff"))
    # (no chat-template note: it names the folder, and pytest's stderr, unlike Python's own, is strict UTF-8)
    code, out, err = _run(capsys, odd, "-p", "hello", "-m", "64MiB", "--max-new-tokens", "2", "--json",
                          "--no-chat-template")
    assert code == 0 and json.loads(out)["outputs"][0]["tokens"] >= 1, err


def test_native_kernels_give_the_reference_tokens(packed, capsys):
    runs = {}
    for backend in ("native", "reference"):
        code, out, _ = _run(capsys, packed, "--prompt", "hello world", "--memory-budget", "64MiB",
                            "--max-new-tokens", "6", "--router-levels", "8,2", "--json", "--kernels", backend)
        assert code == 0
        runs[backend] = json.loads(out)
    native, ref = runs["native"], runs["reference"]
    assert native["outputs"][0]["text"] == ref["outputs"][0]["text"]
    assert ref["stats"]["kernels"] == "torch reference" and native["stats"]["kernels"] != "torch reference"


def test_prompts_file_runs_as_a_batch(packed, tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"prompt": "hello world"}\n\n{"prompt": "the quick brown fox"}\n')
    code, out, _ = _run(capsys, packed, "--prompts-file", f, "-m", "6GB", "--max-new-tokens", "3",
                        "--policy", "moqe-dynaio", "--level", "4", "--io-bandwidth", "3.5GB/s", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [o["prompt"] for o in doc["outputs"]] == ["hello world", "the quick brown fox"]
    assert doc["stats"]["requests"] == 2


def test_plain_output_prints_text_and_summary(packed, capsys):
    code, out, err = _run(capsys, packed, "-p", "hello", "-m", "64MiB", "--max-new-tokens", "3",
                          "--no-chat-template", "--cache-policy", "lru")
    assert code == 0
    assert out.strip()
    assert "decode" in err and "tok/s" in err


@pytest.mark.parametrize("args,message", [
    (["--memory-budget", "300KiB"], "minimum"),
    (["--memory-budget", "lots"], "not a size"),
    (["--memory-budget", "0%"], "percentage in (0, 1000]"),
    (["--memory-budget", "half%"], "not a percentage"),
    (["--level", "4", "--router-levels", "8,2"], "two level rules"),
    (["--memory-budget", "9" * 400], "larger than any machine"),
    (["--policy", "fastest"], "unknown"),
    (["--level", "3"], "--bits"),
    (["--seed", "9" * 20], "--seed"),  # was a traceback: torch's seed is 64 bits
])
def test_bad_options_are_one_clear_line(packed, capsys, args, message):
    code, _, err = _run(capsys, packed, "-p", "hello", *args)
    assert code == EXIT_USAGE
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    code, _, err = _run(capsys, tmp_path / "nope", "-p", "hello")
    assert code == EXIT_INPUT and "does not exist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content,message", [
    ("not json\n", "line 1 is not JSON"),
    ('{"text": "x"}\n', 'no "prompt"'),
    ("\n", "holds no prompts"),
    ('{"prompt": "a"}\n{"prompt": ""}\n', "line 2 has an empty prompt"),
    (b'{"prompt": "caf\xe9"}\n', "is not UTF-8 text (invalid continuation byte at byte 15)"),
])
def test_bad_prompts_file_is_one_clear_line(packed, tmp_path, capsys, content, message):
    f = tmp_path / "p.jsonl"
    f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    code, _, err = _run(capsys, packed, "--prompts-file", f)
    assert code == EXIT_INPUT and message in err and len(err.strip().splitlines()) == 1


def test_a_prompts_file_saved_with_a_byte_order_mark_is_read(packed, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"prompt": "hello"}\n')  # "UTF-8 with BOM": was "Unexpected UTF-8 BOM (decode using utf-8-sig)"
    code, out, err = _run(capsys, packed, "--prompts-file", f, "-m", "64MiB", "--max-new-tokens", "2", "--json")
    assert code == 0 and json.loads(out)["outputs"][0]["prompt"] == "hello", err


def test_missing_prompts_file_and_no_prompt(packed, tmp_path, capsys):
    code, _, err = _run(capsys, packed, "--prompts-file", tmp_path / "missing.jsonl")
    assert code == EXIT_INPUT and "--prompts-file" in err and "does not exist" in err
    code, _, err = _run(capsys, packed)
    assert code == EXIT_USAGE and "--prompt" in err


def test_a_prompt_longer_than_one_prefill_chunk_prefills_in_chunks_within_the_plan(packed, capsys):
    from d2moe.quantize.format import open_checkpoint
    from d2moe.runtime.budget import workspace_bytes
    from d2moe.runtime.generate import PREFILL_CHUNK, context_length, kv_tokens

    code, out, _ = _run(capsys, packed, "--prompt", "hello world " * 400, "--memory-budget", "128MiB",
                        "--max-new-tokens", "3", "--level", "4", "--json", "--no-chat-template")
    assert code == 0
    stats = json.loads(out)["stats"]
    prompt = stats["prompt_tokens"]
    assert prompt > PREFILL_CHUNK
    ckpt = open_checkpoint(packed)
    # the workspace holds one chunk attending over the whole context, not the whole prompt at once
    shapes, threads = ckpt.matrix_shapes, stats["kernel_threads"]
    context = kv_tokens([prompt], 3, context_length(ckpt.config))  # past the model's context: 1 new token
    chunk = workspace_bytes(ckpt.config, shapes, PREFILL_CHUNK, threads, context=context)
    assert stats["memory"]["plan"]["workspace"] == chunk < workspace_bytes(ckpt.config, shapes, context, threads)
    assert stats["memory"]["peak_bytes"] <= stats["memory"]["budget_bytes"]


def test_a_prompt_of_dash_is_read_from_standard_input(monkeypatch):
    import io

    from d2moe.commands.run import read_prompts

    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a question through a pipe\n")))
    assert read_prompts("-", None) == ["a question through a pipe"]  # without the line ending echo adds
    with pytest.raises(UsageError, match="both read standard input"):
        read_prompts("-", "-")


def test_an_option_set_by_environment_variable_is_named_by_it(packed, capsys, monkeypatch):
    monkeypatch.setenv("D2MOE_MEMORY_BUDGET", "lots")
    code, _, err = _run(capsys, packed, "-p", "hi")
    assert code == EXIT_USAGE and "D2MOE_MEMORY_BUDGET 'lots' is not a size" in err
    code, _, err = _run(capsys, packed, "-p", "hi", "-m", "lots")  # the flag, where the command line gave it
    assert code == EXIT_USAGE and "--memory-budget 'lots' is not a size" in err
    monkeypatch.delenv("D2MOE_MEMORY_BUDGET")
    monkeypatch.setenv("D2MOE_THREADS", "0")
    code, _, err = _run(capsys, packed, "-p", "hi")
    assert code == EXIT_USAGE and "D2MOE_THREADS 0 must be at least 1" in err


def test_a_hold_policy_names_its_own_minimum_at_once_and_that_minimum_runs(packed, capsys):
    """hold-int4 needs everything else plus the whole 4-bit set: a budget short of it, by a little or a lot, is told
    that minimum (a small one used to get the generic minimum first, then a second, larger one), and it runs."""
    import re

    def minimum_told(budget: str) -> int:
        code, _, err = _run(capsys, packed, "-p", "hello", "--policy", "hold-int4", "-m", budget)
        assert code != 0 and "holds every expert at 4 bits" in err, err
        return int(re.search(r"--memory-budget (\d+)MiB or more", err).group(1))

    minimum = minimum_told("1MiB")
    assert minimum_told(f"{minimum - 1}MiB") == minimum
    code, out, err = _run(capsys, packed, "-p", "hello", "--policy", "hold-int4", "-m", f"{minimum}MiB",
                          "--max-new-tokens", "2", "--json")
    assert code == 0, err


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_float32_routers_beside_bfloat16_weights_run_with_their_gate(capsys, tiny_checkpoint_factory, tmp_path, arch):
    """A common layout (audit): routers kept in float32, everything else bfloat16. Pack and inspect passed, then
    every forward failed on a bfloat16 x float32 product. The model now loads them as transformers does (in the
    model's dtype), and a gate trained on the source is still recognised (its probe, not only exact bytes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_checkpoint_factory(arch, initializer_range=0.15), src)
    (weights,) = src.glob("*.safetensors")
    state = load_file(weights)
    routers = [k for k in state if k.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight"))]
    assert routers
    save_file({k: v.float() if k in routers else v.to(torch.bfloat16) for k, v in state.items()}, weights,
              metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog ."] * 60))
    gate = tmp_path / "gate.safetensors"
    assert invoke(capsys, "train-router", src, "--data", text, "--seq-len", "16", "--max-steps", "2",
                  "--batch-size", "2", "--eval-blocks", "2", "-o", gate)[0] == 0
    out = tmp_path / "packed"
    assert invoke(capsys, "pack", src, out, "--bits", "2,3,4", "--router", gate)[0] == 0
    for extra in ((), ("--dense-weights", "int8"), ("--level", "3")):
        code, stdout, err = _run(capsys, out, "-p", "the quick", "--max-new-tokens", "3", "--json", *extra)
        assert code == 0, err
        assert json.loads(stdout)["stats"]["generated_tokens"] == 3
    code, stdout, err = _run(capsys, out, "-p", "the quick", "--max-new-tokens", "3", "--json")
    assert "trained gate" in json.loads(stdout)["stats"]["levels"]  # in use: not refused as another model's
    code, stdout, err = invoke(capsys, "eval", out, "--text", text, "--max-tokens", "200", "--json")
    assert code == 0, err


def test_gate_of_a_float32_model_runs_in_its_bfloat16_pack(capsys, tmp_path):
    """`pack --dtype bfloat16 --router` of a float32 model: the gate was refused at run time as another model's."""
    from pathlib import Path

    asset = Path(__file__).parents[2] / "d2moe_cli" / "assets"
    out = tmp_path / "bf16"
    assert invoke(capsys, "pack", asset / "tiny-mixtral", out, "--dtype", "bfloat16",
                  "--router", asset / "tiny-mixtral-gate.safetensors")[0] == 0
    code, stdout, err = _run(capsys, out, "-p", "Once upon a time", "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert "trained gate" in json.loads(stdout)["stats"]["levels"]


@pytest.mark.parametrize("args", [("--level", "0"), ("--level", "-2"), ("--level", "9"),
                                  ("--policy", "hold", "--level", "0"), ("--router-levels", "9,2")])
def test_a_level_no_pack_can_hold_names_the_packed_levels(capsys, packed, args):
    """Audit: `--level 0` advised `d2moe pack SRC OUT --bits 0,2,4,8`, which pack refuses."""
    code, _, err = _run(capsys, packed, "-p", "hi", *args)
    assert code == EXIT_USAGE and "is not a bit-width: use one of the packed levels 2, 4, 8" in err, err
    assert "re-pack" not in err


def test_demo_hold_names_the_hold_policies_demo_has(capsys, tmp_path):
    code, _, err = invoke(capsys, "demo", "--policy", "hold", "--out", tmp_path / "demo")
    assert code == EXIT_USAGE and "--policy hold-int4 or hold-int8" in err and "give --level" not in err
