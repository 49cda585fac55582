"""`pack_checkpoint` on real tiny transformers checkpoints: complete, exact, deterministic, atomic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import TINY_ARCHS, make_tiny_checkpoint

from d2moe.errors import GateMismatchError, InputError, UnsupportedModelError, UsageError
from d2moe.quantize import MWQConfig, dequantize, native, quantize_mwq
from d2moe.quantize import format as fmt
from d2moe.quantize.convert.pack import DEFAULT_REFITS, pack_checkpoint


def _pack_fit(w: torch.Tensor, cfg: MWQConfig):
    """What pack's quantizer makes of one matrix: the native fit with pack's defaults, else the torch fit."""
    lib = native.load()
    if lib is None or cfg.scheme not in native.NATIVE_SCHEMES:
        return quantize_mwq(w, cfg)
    return native.fit_sliced(lib, w, cfg, refits=DEFAULT_REFITS, weighting=native.DEFAULT_WEIGHTING).tensor


def _hf_model(src: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)


def _meta_model(ckpt):
    with torch.device("meta"):
        return ckpt.adapter.model_class()(ckpt.adapter.hf_config(ckpt.config))


@pytest.mark.parametrize("arch, scheme", [(a, "sliced") for a in TINY_ARCHS] + [("mixtral", "subblock")])
def test_pack_is_complete_and_exact(arch, scheme, packed_checkpoint_factory):
    group = 32 if scheme == "subblock" else 64
    src, out = packed_checkpoint_factory(arch, scheme=scheme, group_size=group)
    ckpt = fmt.open_checkpoint(out, verify=True)
    assert ckpt.arch == arch and ckpt.num_experts == 4 and ckpt.cfg == MWQConfig(scheme=scheme, group_size=group)
    reference = _hf_model(src).state_dict()
    adapter = ckpt.adapter

    # dense weights load into the transformers-5 model with only the experts missing, values unchanged
    dense = ckpt.load_dense()
    result = _meta_model(ckpt).load_state_dict(dense, strict=False, assign=True)
    expert_params = {f"{adapter.experts_path(layer)}.{p}" for layer in ckpt.moe_layers for p in ("gate_up_proj", "down_proj")}
    assert set(result.missing_keys) == expert_params and result.unexpected_keys == []
    for key, value in dense.items():
        assert torch.equal(value, reference[key]), key

    # every expert at the top level is exactly what quantize_mwq makes of the source weights
    inter = ckpt.matrix_shapes["gate"][0]
    for (layer, expert), entry in ckpt.experts.items():
        fused = reference[f"{adapter.experts_path(layer)}.gate_up_proj"][expert]  # [2I, H]
        source = {"gate": fused[:inter], "up": fused[inter:], "down": reference[f"{adapter.experts_path(layer)}.down_proj"][expert]}
        got = ckpt.decode_expert(layer, expert, ckpt.cfg.bk, ckpt.read_prefix(layer, expert, ckpt.cfg.bk))
        got = {m: t.to_mwq() for m, t in got.items()}  # packed views -> MWQ tensors
        for m, w in source.items():
            want = _pack_fit(w, ckpt.cfg)
            assert torch.equal(got[m].planes, want.planes) and torch.equal(got[m].scale, want.scale)
            assert torch.equal(got[m].offset, want.offset)
            assert (got[m].alpha is None and want.alpha is None) or torch.equal(got[m].alpha, want.alpha)
        if expert == 0:  # the recorded quality is the real one, and rises with every level
            for i, b in enumerate(ckpt.cfg.bits):
                err = sum((source[m] - dequantize(got[m], b)).double().square().sum() for m in source)
                sig = sum(source[m].double().square().sum() for m in source)
                assert entry.sqnr_db[i] == pytest.approx(10 * torch.log10(sig / err).item(), abs=1e-3)
            assert list(entry.sqnr_db) == sorted(entry.sqnr_db)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("arch, variant", [("mixtral", dict(sharded=True)), ("qwen2_moe", dict(sharded=True)),
                                           ("mixtral", dict(layout="fused")), ("qwen3_moe", dict(layout="fused", sharded=True)),
                                           ("phimoe", dict(layout="fused"))])
def test_sharded_and_fused_sources_pack_to_the_same_bytes(arch, variant, packed_checkpoint_factory):
    _, plain = packed_checkpoint_factory(arch)
    src, other = packed_checkpoint_factory(arch, **variant)
    assert len(list(src.glob("*.safetensors"))) > 1 or variant.get("layout") == "fused"
    names = sorted(p.name for p in plain.glob("*.safetensors"))
    assert names == sorted(p.name for p in other.glob("*.safetensors"))
    for name in names:
        assert (plain / name).read_bytes() == (other / name).read_bytes(), name
    a, b = (json.loads((p / fmt.MANIFEST_NAME).read_text()) for p in (plain, other))
    assert a["source"]["sha256"] != b["source"]["sha256"]
    a.pop("source"), b.pop("source")
    assert a == b


def test_pack_is_deterministic(tiny_checkpoint_factory, tmp_path):
    src = tiny_checkpoint_factory("qwen2_moe", sharded=True)
    cfg = MWQConfig(bits=(2, 4, 8), scheme="sliced")
    pack_checkpoint(src, tmp_path / "a", cfg, progress=False)
    pack_checkpoint(src, tmp_path / "b", cfg, progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_dtype_option_casts_dense_weights(tiny_checkpoint_factory, tmp_path):
    src = tiny_checkpoint_factory("olmoe")
    report = pack_checkpoint(src, tmp_path / "o", MWQConfig(bits=(3,)), dtype="bfloat16", progress=False)
    ckpt = fmt.open_checkpoint(tmp_path / "o")
    assert ckpt.dtype == report["dtype"] == "bfloat16"
    assert {t.dtype for t in ckpt.load_dense().values()} == {torch.bfloat16}
    assert report["bytes_per_level"] == {"3": ckpt.level_nbytes(3) * len(ckpt.experts)}
    assert report["dense_bytes"] < report["source_bytes"]


def test_a_bfloat16_model_with_its_router_kept_in_float32_packs_and_opens(tmp_path):
    """transformers keeps DeepSeek-V3's router (weight, e_score_correction_bias) in float32 in a bfloat16 model and
    saves it so: pack keeps those tensors float32, and the reader took them for mixed-up files."""
    src = make_tiny_checkpoint("deepseek_v3", tmp_path / "src", dtype="bfloat16")
    pack_checkpoint(src, tmp_path / "p", MWQConfig(bits=(2, 4)), progress=False)
    ckpt = fmt.open_checkpoint(tmp_path / "p")
    dense = ckpt.load_dense()
    assert ckpt.dtype == "bfloat16" and dense["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert dense["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_out_is_never_overwritten_without_force(tiny_checkpoint_factory, tmp_path):
    src = tiny_checkpoint_factory("mixtral")
    out = tmp_path / "o"
    pack_checkpoint(src, out, MWQConfig(bits=(2,)), progress=False)
    with pytest.raises(UsageError, match="already exists: pass --force"):
        pack_checkpoint(src, out, MWQConfig(bits=(2, 3)), progress=False)
    assert fmt.open_checkpoint(out).cfg.bits == (2,)
    pack_checkpoint(src, out, MWQConfig(bits=(2, 3)), progress=False, force=True)
    assert fmt.open_checkpoint(out).cfg.bits == (2, 3)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a packed checkpoint"):
        pack_checkpoint(src, other, MWQConfig(), progress=False, force=True)
    assert (other / "cat.jpg").exists()
    with pytest.raises(UsageError, match="inside"):
        pack_checkpoint(src, src / "packed", MWQConfig(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "photos"]  # no temp dirs left behind


def test_force_never_replaces_an_out_that_holds_the_source(tiny_checkpoint_factory, tmp_path):
    """A packed checkpoint with the source copied inside it: `--force` into it would replace OUT and delete SRC (audit:
    it did, after writing the new pack)."""
    out = tmp_path / "mix"
    pack_checkpoint(tiny_checkpoint_factory("mixtral"), out, MWQConfig(bits=(2,)), progress=False)
    shutil.copytree(tiny_checkpoint_factory("mixtral"), out / "src")
    with pytest.raises(UsageError, match="holds SRC .*would delete the source"):
        pack_checkpoint(out / "src", out, MWQConfig(bits=(2, 4)), progress=False, force=True)
    assert (out / "src" / "config.json").is_file() and fmt.open_checkpoint(out).cfg.bits == (2,)


def test_an_out_made_while_pack_runs_is_kept_and_the_parts_wait_for_resume(tiny_checkpoint_factory, tmp_path,
                                                                           monkeypatch):
    """OUT looked free when pack started, then someone (a user, a second pack) made it: pack refuses to replace it
    at the end without --force, keeps its finished parts, and --resume finishes once OUT is moved away."""
    from d2moe.quantize.convert import pack as pack_module

    src, out = tiny_checkpoint_factory("mixtral"), tmp_path / "o"
    check = pack_module._check_out
    calls = []

    def made_meanwhile(s, o, force):
        calls.append(o)
        if len(calls) == 2:  # the look before the parts are put together
            o.mkdir()
            (o / "notes.txt").write_text("mine")
        return check(s, o, force)

    monkeypatch.setattr(pack_module, "_check_out", made_meanwhile)
    with pytest.raises(UsageError, match="made while this pack ran; the finished parts are kept in .*--resume"):
        pack_checkpoint(src, out, MWQConfig(bits=(2, 3)), progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    kept = [p for p in tmp_path.iterdir() if ".d2moe-tmp-" in p.name]
    assert len(kept) == 1
    monkeypatch.setattr(pack_module, "_check_out", check)
    out.rename(tmp_path / "notes")
    fresh = tmp_path / "fresh"
    pack_checkpoint(src, fresh, MWQConfig(bits=(2, 3)), progress=False)
    kept[0].rename(tmp_path / f".o.d2moe-tmp-{2**22 + 7}")  # as a dead process's folder
    pack_checkpoint(src, out, MWQConfig(bits=(2, 3)), progress=False, resume=True)
    for f in fresh.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_outs_a_user_names_by_mistake_or_on_purpose(tiny_checkpoint_factory, tmp_path, monkeypatch):
    src = tiny_checkpoint_factory("mixtral")
    monkeypatch.chdir(tmp_path)
    for out in (Path(""), Path("."), Path("..")):  # `pack SRC ""` was `.`: packed whole, then could not be renamed
        with pytest.raises(UsageError, match="is the current directory or holds it"):
            pack_checkpoint(src, out, MWQConfig(bits=(2,)), progress=False, force=True)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        pack_checkpoint(src, tmp_path / "a.txt", MWQConfig(bits=(2,)), progress=False, force=True)
    (tmp_path / "empty").mkdir()  # made for it: packed into without --force
    pack_checkpoint(src, tmp_path / "empty", MWQConfig(bits=(2,)), progress=False)
    assert fmt.open_checkpoint(tmp_path / "empty").cfg.bits == (2,)
    (tmp_path / "link").symlink_to(tmp_path / "empty")  # --force replaces the link, not what it points to
    pack_checkpoint(src, tmp_path / "link", MWQConfig(bits=(2, 4)), progress=False, force=True)
    assert not (tmp_path / "link").is_symlink() and fmt.open_checkpoint(tmp_path / "link").cfg.bits == (2, 4)
    assert fmt.open_checkpoint(tmp_path / "empty").cfg.bits == (2,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "empty", "link"]  # no stray renamed link


def test_a_failed_pack_leaves_nothing(tmp_path):
    src = make_tiny_checkpoint("mixtral", tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="layer 1 expert 2 matrix up is missing"):
        pack_checkpoint(src, tmp_path / "out", MWQConfig(), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_sources_are_explained(tmp_path, tiny_checkpoint_factory):
    with pytest.raises(InputError, match="does not exist"):
        pack_checkpoint(tmp_path / "nope", tmp_path / "o", MWQConfig(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no config.json"):
        pack_checkpoint(tmp_path / "empty", tmp_path / "o", MWQConfig(), progress=False)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_checkpoint_factory("mixtral") / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InputError, match="never unpickles"):
        pack_checkpoint(pickled, tmp_path / "o", MWQConfig(), progress=False)
    llama = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint_factory("mixtral"), llama)
    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="'llama' is not supported"):
        pack_checkpoint(llama, tmp_path / "o", MWQConfig(), progress=False)
    with pytest.raises(UsageError, match="group-size"):
        pack_checkpoint(tiny_checkpoint_factory("mixtral"), tmp_path / "o", MWQConfig(group_size=48), progress=False)
    with pytest.raises(UsageError, match="--dtype"):
        pack_checkpoint(tiny_checkpoint_factory("mixtral"), tmp_path / "o", MWQConfig(), dtype="int8", progress=False)
    assert not (tmp_path / "o").exists()


def _gate_for(src: Path, path: Path, levels=(2, 3, 4), config_override: dict | None = None,
              extra: dict | None = None) -> Path:
    from d2moe.quantize.adapters import adapter_for
    from d2moe.runtime.gate import BitWidthGate, model_fingerprint, save_gate

    config = {**json.loads((src / "config.json").read_text()), **(config_override or {})}
    adapter = adapter_for(config)
    state = _hf_model(src).state_dict()
    moe = adapter.moe_layers(config)
    fingerprint = model_fingerprint(config, [state[adapter.router_key(layer)] for layer in moe])
    torch.manual_seed(0)
    capacity = tuple([1.0 / len(levels)] * (len(levels) - 1) + [1.0 - (len(levels) - 1) / len(levels)])
    gate = BitWidthGate(config["hidden_size"], adapter.num_experts(config), moe, levels, capacity, proj_dim=8)
    return save_gate(gate, path, fingerprint, extra)


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])
def test_router_gate_is_validated_and_included(arch, tiny_checkpoint_factory, tmp_path):
    src = tiny_checkpoint_factory(arch)
    gate = _gate_for(src, tmp_path / "gate.safetensors")
    report = pack_checkpoint(src, tmp_path / "o", MWQConfig(), router=gate, progress=False)
    ckpt = fmt.open_checkpoint(tmp_path / "o", verify=True)
    assert report["gate"] and ckpt.gate_path == tmp_path / "o" / fmt.GATE_NAME
    assert ckpt.gate_path.read_bytes() == gate.read_bytes()
    assert ckpt.gate_capacity == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    with pytest.raises(GateMismatchError, match="levels"):
        pack_checkpoint(src, tmp_path / "o2", MWQConfig(bits=(2, 4)), router=gate, progress=False)
    foreign = _gate_for(src, tmp_path / "foreign.safetensors", config_override={"vocab_size": 512})
    with pytest.raises(GateMismatchError, match="another model"):
        pack_checkpoint(src, tmp_path / "o3", MWQConfig(), router=foreign, progress=False)
    with pytest.raises(InputError, match="does not exist"):
        pack_checkpoint(src, tmp_path / "o4", MWQConfig(), router=tmp_path / "missing.safetensors", progress=False)
    assert not any((tmp_path / n).exists() for n in ("o2", "o3", "o4"))


def test_a_gate_trained_on_another_scheme_is_noted(tiny_checkpoint_factory, tmp_path, capsys):
    src = tiny_checkpoint_factory("mixtral")
    gate = _gate_for(src, tmp_path / "gate.safetensors", extra={"scheme": "sliced", "group_size": 64})
    pack_checkpoint(src, tmp_path / "o", MWQConfig(), router=gate, progress=False)
    assert "was trained on --scheme sliced --group-size 64, this pack is subblock 32" in capsys.readouterr().err
    same = _gate_for(src, tmp_path / "same.safetensors", extra={"scheme": "subblock", "group_size": 32})
    pack_checkpoint(src, tmp_path / "o2", MWQConfig(), router=same, progress=False)
    assert "was trained on" not in capsys.readouterr().err
