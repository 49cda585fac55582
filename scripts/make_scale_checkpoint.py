"""Write a Hugging Face MoE checkpoint with real shapes and random weights, for speed/memory benchmarks.

The layers are the real models' shapes (only fewer of them), the weights are N(0, std) noise
(norms are ones) so generation runs without overflow in bf16 but means nothing. The files are
what the real models ship, so every tool a user would run on them accepts these too:

- bf16 safetensors sharded at ~2 GB (`--shard-size`) with `model.safetensors.index.json`;
  experts stored per expert under the original checkpoints' names
  (`block_sparse_moe.experts.E.w1.weight` for Mixtral, `mlp.experts.E.gate_proj.weight` for
  OLMoE/Qwen3), which `AutoModelForCausalLM.from_pretrained` (transformers 5 fuses them on load),
  `d2moe pack` and llama.cpp's `convert_hf_to_gguf.py` all read. Every other key and every shape
  comes from the transformers model class itself, built on the `meta` device;
- config.json (transformers' own config class for the model type) with vocab_size >= the tokenizer;
- a real tokenizer of the model's family, rebuilt from llama.cpp's vocab-only test files
  (`models/ggml-vocab-*.gguf`: tokens, scores, merges): llama-spm (32000, Mixtral's), gpt-neox
  (OLMoE's family) and qwen2 (Qwen3's). `convert_hf_to_gguf.py` recognises them (SentencePiece-style
  BPE with byte fallback for Llama; the gpt-neox and qwen2 pre-tokenizer hashes match its table) and
  they reproduce llama.cpp's reference tokenizations. Or `--tokenizer DIR` copies an HF tokenizer.

Memory stays at one tensor: the header of each shard is written from the planned shapes, then each
tensor is generated and streamed to disk. Deterministic: a tensor's values depend only on --seed
and its name.

Usage:
    python scripts/make_scale_checkpoint.py --preset olmoe --layers 1 /tmp/olmoe-1l \\
        --llama-src ~/llama.cpp
    python scripts/make_scale_checkpoint.py --preset mixtral /work/scale/mixtral --llama-src ~/llama.cpp
    python scripts/make_scale_checkpoint.py --preset qwen3 /work/scale/qwen3 \\
        --tokenizer ~/llama.cpp/models/ggml-vocab-qwen2.gguf --force

--llama-src may also come from the LLAMA_CPP_SRC environment variable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preset:
    """One model family: its transformers config and where its experts and tokenizer come from."""

    model_type: str
    layers: int  # decoder layers written by default (the real model has more)
    vocab_gguf: str  # llama.cpp models/ggml-vocab-<name>.gguf holding the family's tokenizer
    config: dict = field(default_factory=dict)  # real model's config.json values (layers aside)
    legacy_block: str = "mlp"  # module holding `experts.E.*` in the original checkpoints
    legacy_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down


PRESETS = {
    "mixtral": Preset(  # mistralai/Mixtral-8x7B-v0.1
        "mixtral", 2, "llama-spm",
        dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
             max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
             router_aux_loss_coef=0.02, tie_word_embeddings=False),
        legacy_block="block_sparse_moe", legacy_names=("w1", "w3", "w2"),
    ),
    "olmoe": Preset(  # allenai/OLMoE-1B-7B-0924
        "olmoe", 4, "gpt-neox",
        dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, max_position_embeddings=4096,
             rms_norm_eps=1e-5, rope_theta=10000.0, norm_topk_prob=False, clip_qkv=None,
             router_aux_loss_coef=0.01, tie_word_embeddings=False),
    ),
    "qwen3": Preset(  # Qwen/Qwen3-30B-A3B
        "qwen3_moe", 2, "qwen2",
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
             vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
             norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    ),
}

ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")

# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE vocabularies are written in it)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


def _import_gguf(llama_src: Path | None):
    try:
        import gguf
    except ImportError:
        if llama_src is None or not (llama_src / "gguf-py").is_dir():
            sys.exit("reading a ggml-vocab .gguf needs the gguf package: `pip install gguf` or pass --llama-src")
        sys.path.insert(0, str(llama_src / "gguf-py"))
        import gguf
    return gguf


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a piece into two
    pieces, ranked by the merged piece's score (what transformers' SentencePieceExtractor does)."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != NORMAL or len(piece) < 2:
            continue
        splits = sorted((vocab[piece[:k]], vocab[piece[k:]]) for k in range(1, len(piece))
                        if piece[:k] in vocab and piece[k:] in vocab)
        ranked += [(-scores[i], i, tokens[a], tokens[b]) for a, b in splits]
    ranked.sort(key=lambda m: (m[0], m[1]))
    return [(a, b) for *_, a, b in ranked]


def tokenizer_from_vocab_gguf(path: Path, llama_src: Path | None):
    """A transformers fast tokenizer equal to the one a llama.cpp vocab-only GGUF was made from."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    gguf = _import_gguf(llama_src)
    fields = gguf.GGUFReader(str(path)).fields

    def get(key, default=None):
        return fields[key].contents() if key in fields else default

    tokens, types = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type")
    if not tokens or not types:
        sys.exit(f"{path} holds no tokenizer.ggml.tokens/token_type: give a models/ggml-vocab-*.gguf file")
    n = len(tokens)  # the converter padded the vocab to the model's embedding rows with [PADi]: drop them
    while n and types[n - 1] in (USER_DEFINED, UNUSED) and re.fullmatch(r"\[PAD\d+\]", tokens[n - 1]):
        n -= 1
    tokens, types = tokens[:n], types[:n]
    kind = get("tokenizer.ggml.model")
    if kind == "llama":  # SentencePiece BPE, as HF's LlamaTokenizerFast writes it
        merges = spm_merges(tokens, get("tokenizer.ggml.scores"), types)
        unk = tokens[get("tokenizer.ggml.unknown_token_id", 0)]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    elif kind == "gpt2":  # byte-level BPE
        b2u = _bytes_to_unicode()
        vocab = {(t if types[i] == NORMAL else "".join(b2u[b] for b in t.encode())): i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.normalizer = normalizers.NFC()
        pre = get("tokenizer.ggml.pre", "gpt-2")
        if pre == "qwen2":
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        else:  # gpt-2 / gpt-neox regex
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True)
            tok.post_processor = processors.ByteLevel(trim_offsets=True)
        tok.decoder = decoders.ByteLevel()
    else:
        sys.exit(f"{path}: tokenizer model {kind!r} is not supported (llama or gpt2 only)")
    tok.add_tokens([AddedToken(t, special=types[i] in (UNKNOWN, CONTROL), normalized=types[i] == USER_DEFINED)
                    for i, t in enumerate(tokens) if types[i] in (UNKNOWN, CONTROL, USER_DEFINED)])

    def special(key):
        i = get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < n else None

    bos = special("bos")
    if get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=special("eos"),
                                   unk_token=special("unknown"), pad_token=special("padding"))


def load_tokenizer(args, preset: Preset):
    """The tokenizer to ship: --tokenizer (a vocab .gguf or an HF dir) or the preset's llama.cpp vocab."""
    from transformers import AutoTokenizer

    src = args.tokenizer
    if src is None:
        if args.llama_src is None:
            sys.exit("give --llama-src LLAMA_CPP_DIR (or LLAMA_CPP_SRC) to use its models/ggml-vocab-"
                     f"{preset.vocab_gguf}.gguf, or --tokenizer PATH (a ggml-vocab .gguf or an HF tokenizer dir)")
        src = args.llama_src / "models" / f"ggml-vocab-{preset.vocab_gguf}.gguf"
    if not src.exists():
        sys.exit(f"tokenizer source {src} does not exist")
    if src.is_dir():
        return AutoTokenizer.from_pretrained(str(src))
    return tokenizer_from_vocab_gguf(src, args.llama_src)


# ----------------------------------------------------------------------------- weights


def make_config(preset: Preset, layers: int, tokenizer):
    from transformers import AutoConfig

    values = dict(preset.config)
    values["vocab_size"] = max(values["vocab_size"], len(tokenizer))
    for name in ("bos", "eos", "pad"):
        tid = getattr(tokenizer, f"{name}_token_id", None)
        if tid is not None:
            values[f"{name}_token_id"] = tid
    cfg = AutoConfig.for_model(preset.model_type, num_hidden_layers=layers, **values)
    cfg.dtype = torch.bfloat16
    cfg.architectures = [cfg.__class__.__name__.replace("Config", "ForCausalLM")]
    return cfg


def checkpoint_tensors(cfg, preset: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint key, shape) of every tensor, in file order: the model class's state dict built on
    `meta`, with fused experts written per expert under the original checkpoints' names."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    gate_name, up_name, down_name = preset.legacy_names
    block = f".{preset.legacy_block}."
    out, experts = [], {}
    for key, t in model.state_dict().items():
        m = _FUSED.match(key)
        if m:
            experts[(int(m.group(1)), m.group(2))] = tuple(t.shape)
            continue
        if block != ".mlp." and re.search(r"\.mlp\.gate\.weight$", key):
            key = key.replace(".mlp.", block)
        out.append((key, tuple(t.shape)))
    layers = sorted({layer for layer, _ in experts})
    for layer in layers:  # experts after the layer's other tensors, one expert's matrices together
        n, two_i, h = experts[(layer, "gate_up_proj")]
        i = two_i // 2
        prefix = f"model.layers.{layer}{block}experts"
        at = max(k for k, (key, _) in enumerate(out) if key.startswith(f"model.layers.{layer}.")) + 1
        rows = [(f"{prefix}.{e}.{name}.weight", shape) for e in range(n)
                for name, shape in ((gate_name, (i, h)), (up_name, (i, h)), (down_name, (h, i)))]
        out[at:at] = rows
    return out


def tensor_values(key: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """N(0, std) in bf16 (ones for norm weights), seeded by --seed and the tensor's name only."""
    if len(shape) == 1 and "norm" in key:
        return torch.ones(shape, dtype=torch.bfloat16)
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)


def plan_shards(tensors, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, current, size = [], [], 0
    for key, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_shard(path: Path, tensors, seed: int, std: float) -> int:
    """A safetensors file streamed tensor by tensor (header first, from the planned shapes)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": ST_DTYPES[torch.bfloat16], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape in tensors:
            f.write(tensor_values(key, shape, seed, std).view(torch.uint8).numpy().data)
    return offset


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", type=Path, help="checkpoint directory to create")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--std", type=float, default=0.02, help="weight standard deviation")
    p.add_argument("--shard-size", type=float, default=2.0, help="GB (1e9 bytes) per safetensors shard")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a llama.cpp ggml-vocab-*.gguf or an HF tokenizer directory (default: the preset's "
                        "vocab from --llama-src)")
    p.add_argument("--llama-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                   help="llama.cpp source tree (models/ggml-vocab-*.gguf, gguf-py); env LLAMA_CPP_SRC")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.llama_src is not None:
        args.llama_src = Path(args.llama_src).expanduser()
    preset = PRESETS[args.preset]
    layers = preset.layers if args.layers is None else args.layers
    if layers < 1:
        sys.exit(f"--layers {layers} must be at least 1")
    out: Path = args.out
    if out.exists():
        if not args.force:
            sys.exit(f"{out} exists: pass --force to replace it")
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()

    tokenizer = load_tokenizer(args, preset)
    tokenizer.model_max_length = preset.config["max_position_embeddings"]
    tokenizer.save_pretrained(str(tmp))
    cfg = make_config(preset, layers, tokenizer)
    cfg.save_pretrained(str(tmp))

    tensors = checkpoint_tensors(cfg, preset)
    shards = plan_shards(tensors, int(args.shard_size * 1e9))
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        total += write_shard(tmp / name, shard, args.seed, args.std)
        weight_map.update({key: name for key, _ in shard})
        print(f"  {name}: {len(shard)} tensors, {(tmp / name).stat().st_size / 1e9:.2f} GB", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(out)
    params = sum(math.prod(s) for _, s in tensors)
    print(f"{out}: {args.preset} ({preset.model_type}), {layers} layers, {params / 1e9:.2f} B params, "
          f"{total / 1e9:.2f} GB bf16 in {len(shards)} shards, vocab {cfg.vocab_size} "
          f"(tokenizer {len(tokenizer)}), {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
