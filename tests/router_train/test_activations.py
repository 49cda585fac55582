"""Calibration statistics for `pack --calib`: gathered layer by layer, equal to a full forward's."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_ARCHS, make_tiny_checkpoint

from d2moe.kernels import cpu
from d2moe.quantize import MWQConfig
from d2moe.quantize import format as fmt
from d2moe.quantize.adapters import adapter_for
from d2moe.quantize.convert.pack import pack_checkpoint
from d2moe.quantize.convert.source import ExpertSource, SourceCheckpoint
from d2moe.router_train import activations
from d2moe.router_train.activations import CalibrationPass, expert_column_stats

TEXT = "d2moe_cli/assets/text/tinyshakespeare.train.txt"


def _source_parts(src):
    source = SourceCheckpoint(src)
    adapter = adapter_for(source.config)
    source.index_weights()
    config = source.config
    return (source, adapter, adapter.moe_layers(config), adapter.num_experts(config), adapter.matrix_shapes(config))


def _full_forward_stats(src, blocks, layer: int) -> tuple[dict, dict]:
    """Mean squared routed input per expert of `layer`, from transformers' own full forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    experts = model.get_submodule(f"model.layers.{layer}.mlp.experts")
    sums, counts = {}, {}

    def hook(_mod, args):
        x, idx = args[0].float(), args[1]
        for e in torch.unique(idx).tolist():
            tok = (idx == e).nonzero(as_tuple=True)[0]
            sums[e] = x[tok].double().square().sum(0)
            counts[e] = len(tok)

    experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(input_ids=blocks)
    return sums, counts


def test_layer_by_layer_statistics_equal_the_full_forward(tmp_path, monkeypatch):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    seen = {}
    from d2moe.router_train import data

    orig = data.token_blocks

    def spy(*a, **k):
        seen["blocks"] = orig(*a, **k)
        return seen["blocks"]

    monkeypatch.setattr(data, "token_blocks", spy)
    weights, calib_id, report = expert_column_stats(src, [TEXT], 2048, progress=False)
    assert report["tokens"] == seen["blocks"].numel() and len(calib_id) == 64
    sums, counts = _full_forward_stats(src, seen["blocks"], layer=1)
    checked = 0
    for e, n in counts.items():
        if n < activations.MIN_TOKENS:
            assert (1, e, "gate") not in weights
            continue
        want = (sums[e] / n).float()
        want = (want / want.mean()).clamp_min(activations.FLOOR)
        torch.testing.assert_close(weights[(1, e, "gate")].weight, want, rtol=2e-3, atol=1e-4)
        assert weights[(1, e, "up")] is weights[(1, e, "gate")]
        down = weights[(1, e, "down")].weight
        assert torch.isfinite(down).all() and (down > 0).all()
        sample = weights[(1, e, "gate")].sample  # routed inputs: their mean square is bounded by all n tokens'
        assert sample.shape == (min(n, activations.SAMPLE_TOKENS), want.numel()) and sample.dtype == torch.bfloat16
        assert float(sample.float().square().sum()) <= float(sums[e].sum()) * 1.01
        checked += 1
    assert checked >= 2
    starved = {(layer, e) for layer, e, _ in report["experts_without_enough_tokens"]}
    assert all((layer, e, "gate") not in weights for layer, e in starved)


def test_calibrated_pack_is_valid_and_nearer_on_the_calibration_outputs(tmp_path):
    from d2moe.kernels.dispatch import dequantize_packed

    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    weights, _, _ = expert_column_stats(src, [TEXT], 2048, progress=False)
    cfg = MWQConfig()
    pack_checkpoint(src, tmp_path / "plain", cfg, progress=False)
    pack_checkpoint(src, tmp_path / "calib", cfg, progress=False, calib=CalibrationPass(src, [TEXT], 2048, progress=False))
    plain, calib = (fmt.open_checkpoint(tmp_path / name, verify=True) for name in ("plain", "calib"))
    experts = ExpertSource(*_source_parts(src))
    nearer = total = 0
    for (layer, e, m), stats in weights.items():
        assert stats.hessian is not None and torch.isfinite(stats.hessian).all()  # whole matrices fit here
        w = experts.matrix(layer, e, m).float()
        x = stats.sample.float()
        level = cfg.bits[0]
        err = [float((x @ (w - dequantize_packed(c.decode_expert(layer, e, level, c.read_prefix(layer, e, level))[m],
                                                 level)).T).square().sum()) for c in (plain, calib)]
        nearer += err[1] < err[0]
        total += 1
    assert total >= 6 and nearer >= 0.8 * total  # the lowest level's outputs, on inputs the calibration saw


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_layer_calls_in_chunks_give_the_one_call_statistics(arch, tmp_path, monkeypatch):
    """CHUNK_TOKENS bounds what a layer call holds; the statistics and the kept sample (the same evenly spaced
    tokens of all the calls) are the one-call ones, up to float summation order, for every architecture's
    positions and masks."""
    src = make_tiny_checkpoint(arch, tmp_path / "src")
    monkeypatch.setattr(activations, "CHUNK_TOKENS", 1 << 30)
    whole, whole_id, _ = expert_column_stats(src, [TEXT], 2048, progress=False)
    monkeypatch.setattr(activations, "CHUNK_TOKENS", activations.SEQ_LEN)  # one sequence per call
    chunked, chunked_id, report = expert_column_stats(src, [TEXT], 2048, progress=False)
    assert report["sequences"] >= 4 and chunked_id == whole_id and whole.keys() == chunked.keys() and whole
    for key, a in whole.items():
        b = chunked[key]
        torch.testing.assert_close(b.weight, a.weight, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.sample.float(), a.sample.float(), rtol=1e-2, atol=1e-3)  # bfloat16 samples
        torch.testing.assert_close(b.hessian, a.hessian, rtol=1e-4, atol=1e-4 * float(a.hessian.abs().max()))


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("native_bf16", [False, True], ids=["float32-products", "bfloat16-products"])
def test_a_bfloat16_source_calibrates_like_its_float32_copy(arch, native_bf16, tmp_path, monkeypatch):
    """A bfloat16 source's layers multiply in float32, or in bfloat16 where the CPU has it natively (both paths run
    here, whatever this CPU has), with every architecture's positions and masks cast alike: its statistics are its
    float32 copy's up to bfloat16's rounding."""
    monkeypatch.setattr(cpu, "has_bf16_gemm", lambda: native_bf16)
    src32 = make_tiny_checkpoint(arch, tmp_path / "f32")
    src16 = make_tiny_checkpoint(arch, tmp_path / "bf16", dtype="bfloat16")
    a, _, _ = expert_column_stats(src32, [TEXT], 2048, progress=False)
    b, _, _ = expert_column_stats(src16, [TEXT], 2048, progress=False)
    assert a and a.keys() == b.keys()
    errors = []  # per matrix, the relative error of its columns' mean squares
    for key, x in a.items():
        y = b[key]
        assert y.weight.dtype == torch.float32 and torch.isfinite(y.weight).all()
        errors.append(float((y.weight - x.weight).abs().sum() / x.weight.abs().sum()))
    # typically 2^-8: bfloat16's rounding; the tail is tokens routed to other experts by a rounded router
    assert sorted(errors)[len(errors) // 2] < 0.01 and max(errors) < 0.2, errors


def test_memory_budgets_hold_per_layer_so_a_deeper_model_keeps_its_blocks_and_samples(tmp_path, monkeypatch):
    """Only one layer's statistics are resident (pack fits each layer before the pass goes on), so HESSIAN_BYTES and
    SAMPLE_BYTES are one layer's: a model with three times the layers gets the same second-moment blocks and samples."""
    monkeypatch.setattr(activations, "HESSIAN_BYTES", 1 << 17)  # whole moments would not fit: blocks
    monkeypatch.setattr(activations, "SAMPLE_BYTES", 1 << 16)
    passes = [activations.CalibrationPass(make_tiny_checkpoint("mixtral", tmp_path / f"l{n}", num_hidden_layers=n),
                                          [TEXT], 1024, progress=False) for n in (1, 3)]
    shallow, deep = passes
    assert len(deep.moe_layers) == 3 * len(shallow.moe_layers)
    assert deep.blocks == shallow.blocks and 0 < deep.blocks["gate"] < deep.source.config["hidden_size"]
    assert deep.keep == shallow.keep < activations.SAMPLE_TOKENS
    stats = deep.layer_stats(deep.moe_layers[2])  # the last layer's, layers 0 and 1 run without statistics
    assert stats and all(k[0] == deep.moe_layers[2] for k in stats)
    assert all(s.hessian.shape[-1] == deep.blocks["gate" if m != "down" else "down"] for (_, _, m), s in stats.items())
    assert all(s.sample.shape[0] <= deep.keep for s in stats.values())
    with pytest.raises(RuntimeError, match="closed"):  # the last MoE layer given, the pass let go of the model
        deep.layer_stats(deep.moe_layers[2])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scratch_rows_give_back_what_was_written_bit_for_bit(dtype, tmp_path):
    """The pass's hidden states and kept inputs wait in an unlinked scratch file: chunks written in any order come
    back exactly, and a gather of sorted rows (runs and single rows) is plain indexing."""
    rows = torch.randn(37, 3, 5).to(dtype)
    scratch = activations._ScratchRows(tmp_path, dtype, rows.shape[1:])
    for r0, r1 in ((20, 37), (0, 7), (7, 20)):
        scratch.write(r0, rows[r0:r1].float())  # written in the file's dtype, as the layers' outputs are
    assert scratch.rows == 37 and list(tmp_path.iterdir()) == []  # unlinked from the start
    assert torch.equal(scratch.read(0, 37).view(torch.uint8), rows.view(torch.uint8))
    index = torch.tensor([0, 1, 2, 5, 9, 10, 36])
    assert torch.equal(scratch.gather(index).view(torch.uint8), rows[index].view(torch.uint8))
    tail = activations._ScratchRows(tmp_path, dtype, rows.shape[1:])
    for r0 in range(0, 37, 10):
        tail.append(rows[r0:r0 + 10])
    assert torch.equal(tail.read(3, 30).view(torch.uint8), rows[3:30].view(torch.uint8))
    scratch.close()
    tail.close()


def test_spilled_statistics_come_back_bit_for_bit_one_read_for_gate_and_up(tmp_path, monkeypatch):
    """A layer's statistics wait in a scratch file: each comes back exactly (sample, moments or none, weights), gate
    and up are one ColumnStats read once (pack fits them one after the other), and the mapping reads like a dict."""
    from d2moe.quantize.calib import ColumnStats

    gen = torch.Generator().manual_seed(0)
    made = {}
    stats = activations.SpilledStats(tmp_path)
    for e in range(3):
        for m, cols in (("gate", 8), ("down", 24)):
            made[(0, e, m)] = ColumnStats(torch.rand(cols, generator=gen), torch.randn(5, cols, generator=gen).bfloat16(),
                                          None if e == 1 else torch.randn(cols // 4, 4, 4, generator=gen))
            stats.put((0, e, m), made[(0, e, m)])
            if m == "gate":
                stats.alias((0, e, "up"), (0, e, "gate"))
    assert list(tmp_path.iterdir()) == [] and len(stats) == 9 and set(stats) == {*made, *((0, e, "up") for e in range(3))}
    reads = []
    read_at = stats.scratch.read_at
    monkeypatch.setattr(stats.scratch, "read_at", lambda *a: reads.append(a) or read_at(*a))
    for e in range(3):
        gate, up, down = stats[(0, e, "gate")], stats[(0, e, "up")], stats[(0, e, "down")]
        assert up is gate
        for key, got in (((0, e, "gate"), gate), ((0, e, "down"), down)):
            want = made[key]
            assert torch.equal(got.weight, want.weight)
            assert torch.equal(got.sample.view(torch.int16), want.sample.view(torch.int16))
            assert (got.hessian is None) == (want.hessian is None)
            assert want.hessian is None or torch.equal(got.hessian.view(torch.int32), want.hessian.view(torch.int32))
    assert len(reads) == 4 + 2 + 4  # per expert, a sample and moments for each of its two inputs; expert 1 has no moments
    assert stats.get((0, 9, "gate")) is None
    stats.close()


def test_the_pass_spills_into_the_folder_pack_gives_it(tmp_path, monkeypatch):
    """pack hands its staging folder to layer_stats: the hidden states, the layer's expert inputs, its moments
    between calls and its statistics go there (not the system's temporary folder, which may be memory), and nothing
    is left behind."""
    import tempfile

    folders = []
    real = tempfile.TemporaryFile

    def spy(*a, **k):
        folders.append(k.get("dir"))
        return real(*a, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    src = make_tiny_checkpoint("mixtral", tmp_path / "src", num_hidden_layers=2)
    calib = CalibrationPass(src, [TEXT], 1024, progress=False)
    scratch = tmp_path / "staging"
    scratch.mkdir()
    for layer in calib.moe_layers:
        assert calib.layer_stats(layer, scratch)
    # the hidden states; each layer's inputs, moments and statistics
    assert len(folders) == 1 + 3 * len(calib.moe_layers) and set(folders) == {scratch}
    assert list(scratch.iterdir()) == []
