"""Optional manifest sections (format version 1): present only when pack made them.

- `similarity` (`d2moe pack`, on by default): each expert's nearest neighbours for `--on-miss
  substitute` (d2moe.quantize.similarity):
      {method, probe_rows, seed, activation, neighbors: {"<layer>": [[[expert, cosine], ...] per expert]}}
- `lossless` (`d2moe pack --lossless`): each expert's exact source weights, losslessly coded
  (d2moe.quantize.lossless), in `lossless-LLLL.safetensors` (one U8 tensor per expert, padded to 4096):
      {codec, dtype, chunk_weights, experts: [{layer, expert, file, offset, nbytes, raw_nbytes, crc32}]}
      offset = absolute file offset of the blob, nbytes = coded bytes (<= the tensor's padded size),
      raw_nbytes = the three matrices' source bytes (gate, up, down in adapter shape [O, I], row major).
- `calibration` (`d2moe pack --calib`): how the codes were chosen, for `inspect` (llama.cpp's GGUF keeps its
  imatrix's dataset and chunk count the same way):
      {texts: [file or dataset names], tokens, sha256 (of the method, dtype and token ids: --resume's id),
       experts_without_enough_tokens}  (experts fitted unweighted: they saw too few calibration tokens)

A reader older than these sections rejects a manifest holding them ("unknown [...]" naming the key);
a manifest without them is byte-identical to what earlier versions wrote.
"""

from __future__ import annotations

from d2moe.errors import FormatError
from d2moe.quantize.format.constants import ALIGN, DENSE_DTYPES, MAX_DIM

OPTIONAL_KEYS = ("similarity", "lossless", "calibration")
LOSSLESS_CODECS = ("zstd", "brotli", "none")
_SIM_KEYS = {"method", "probe_rows", "seed", "activation", "neighbors"}
_LOSSLESS_KEYS = {"codec", "dtype", "chunk_weights", "experts"}
_CALIB_KEYS = {"texts", "tokens", "sha256", "experts_without_enough_tokens"}
MAX_CALIB_TEXTS, MAX_CALIB_NAME = 256, 512
_LOSSLESS_EXPERT_KEYS = {"layer", "expert", "file", "offset", "nbytes", "raw_nbytes", "crc32"}


def lossless_file_name(layer: int) -> str:
    return f"lossless-{layer:04d}.safetensors"


def lossless_file_metadata(layer: int) -> dict[str, str]:
    """The safetensors `__metadata__` of a lossless file (check_lossless_files checks it equals this)."""
    return {"format": "d2moe-lossless", "layer": str(layer)}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_keys(obj, want: set[str], what: str) -> dict:
    if not isinstance(obj, dict) or set(obj) != want:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"{what} must be an object with keys {sorted(want)}, found {got}")
    return obj


def validate_similarity(sim, moe_layers: list[int], num_experts: int, where: str) -> dict:
    what = f"{where}: similarity"
    _check_keys(sim, _SIM_KEYS, what)
    if not isinstance(sim["method"], str) or not isinstance(sim["activation"], str):
        raise FormatError(f"{what}: method and activation must be strings")
    if not _is_int(sim["probe_rows"]) or not 1 <= sim["probe_rows"] <= 4096 or not _is_int(sim["seed"]):
        raise FormatError(f"{what}: probe_rows must be an integer in 1..4096 and seed an integer")
    layers = sim["neighbors"]
    if not isinstance(layers, dict) or set(layers) != {str(layer) for layer in moe_layers}:
        raise FormatError(f"{what}.neighbors must name every MoE layer {moe_layers[:8]}")
    for layer, rows in layers.items():
        if not isinstance(rows, list) or len(rows) != num_experts:
            raise FormatError(f"{what}.neighbors[{layer}] must list {num_experts} experts")
        for e, row in enumerate(rows):
            if not isinstance(row, list) or len(row) > num_experts - 1:
                raise FormatError(f"{what}: layer {layer} expert {e}: at most {num_experts - 1} neighbours")
            seen = set()
            for item in row:
                ok = (isinstance(item, list) and len(item) == 2 and _is_int(item[0]) and 0 <= item[0] < num_experts
                      and item[0] != e and item[0] not in seen and isinstance(item[1], (int, float))
                      and not isinstance(item[1], bool) and -1.0 <= item[1] <= 1.0)
                if not ok:
                    raise FormatError(f"{what}: layer {layer} expert {e}: neighbour {str(item)[:40]} must be "
                                      f"[another expert id < {num_experts}, cosine in [-1, 1]], no repeats")
                seen.add(item[0])
    return sim


def validate_calibration(c, moe_layers: list[int], num_experts: int, where: str) -> dict:
    what = f"{where}: calibration"
    _check_keys(c, _CALIB_KEYS, what)
    texts = c["texts"]
    if (not isinstance(texts, list) or not 1 <= len(texts) <= MAX_CALIB_TEXTS
            or not all(isinstance(t, str) and 0 < len(t) <= MAX_CALIB_NAME for t in texts)):
        raise FormatError(f"{what}.texts must list 1..{MAX_CALIB_TEXTS} names of at most {MAX_CALIB_NAME} characters")
    if not _is_int(c["tokens"]) or not 1 <= c["tokens"] <= 1 << 40:
        raise FormatError(f"{what}.tokens must be a positive integer")
    digest = c["sha256"]
    if not isinstance(digest, str) or len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise FormatError(f"{what}.sha256 must be 64 lowercase hex digits")
    starved = c["experts_without_enough_tokens"]
    if not _is_int(starved) or not 0 <= starved <= len(moe_layers) * num_experts:
        raise FormatError(f"{what}.experts_without_enough_tokens must be an integer in 0..{len(moe_layers) * num_experts}")
    return c


DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


def validate_lossless(ll, moe_layers: list[int], num_experts: int, weights: int, where: str) -> dict:
    """`weights`: one expert's weight count (its three matrices); entries keyed (layer, expert)."""
    what = f"{where}: lossless"
    _check_keys(ll, _LOSSLESS_KEYS, what)
    if ll["codec"] not in LOSSLESS_CODECS:
        raise FormatError(f"{what}: codec {ll['codec']!r} is not one of {LOSSLESS_CODECS}")
    if ll["dtype"] not in DENSE_DTYPES:
        raise FormatError(f"{what}: dtype {ll['dtype']!r} is not one of {DENSE_DTYPES}")
    raw_nbytes = weights * DTYPE_BYTES[ll["dtype"]]
    if not _is_int(ll["chunk_weights"]) or not 1 <= ll["chunk_weights"] <= MAX_DIM * 64:
        raise FormatError(f"{what}: chunk_weights must be a positive integer")
    entries = ll["experts"]
    if not isinstance(entries, list) or len(entries) != len(moe_layers) * num_experts:
        raise FormatError(f"{what}: experts must list {len(moe_layers)} layers x {num_experts} experts")
    order = [(layer, e) for layer in moe_layers for e in range(num_experts)]
    out = {}
    for (layer, e), item in zip(order, entries, strict=True):
        w = f"{what}: layer {layer} expert {e}"
        _check_keys(item, _LOSSLESS_EXPERT_KEYS, w)
        if item["layer"] != layer or item["expert"] != e or item["file"] != lossless_file_name(layer):
            raise FormatError(f"{w}: entry says layer {item['layer']!r} expert {item['expert']!r} file "
                              f"{item['file']!r} (sorted entries, file {lossless_file_name(layer)!r})")
        for k in ("offset", "nbytes", "raw_nbytes", "crc32"):
            if not _is_int(item[k]) or item[k] < 0:
                raise FormatError(f"{w}: {k} must be a non-negative integer")
        if item["offset"] % ALIGN or item["crc32"] > 0xFFFFFFFF or item["nbytes"] < 24:
            raise FormatError(f"{w}: offset must be {ALIGN}-aligned, crc32 a 32-bit value, nbytes >= 24")
        if item["raw_nbytes"] != raw_nbytes:
            raise FormatError(f"{w}: raw_nbytes {item['raw_nbytes']} differs from the shapes' {raw_nbytes} bytes")
        out[(layer, e)] = item
    return out


def verify_lossless_blobs(path, ll: dict) -> None:
    """Read every lossless blob once and check its crc32 (`inspect --verify`; a run checks each blob it reads)."""
    from d2moe.quantize.format.crc import crc32

    by_file: dict[str, list[dict]] = {}
    for item in ll["experts"]:
        by_file.setdefault(item["file"], []).append(item)
    for name, items in sorted(by_file.items()):
        with open(path / name, "rb") as f:
            for item in sorted(items, key=lambda i: i["offset"]):
                f.seek(item["offset"])
                blob = f.read(item["nbytes"])
                if len(blob) != item["nbytes"] or crc32(blob) != item["crc32"]:
                    raise FormatError(f"{name}: layer {item['layer']} expert {item['expert']}: lossless blob fails its "
                                      "crc32 check (corrupted file: re-pack or re-download)")


def lossless_summary(ll: dict | None) -> dict | None:
    """What `inspect` shows of the lossless tier: codec, source dtype, coded and raw bytes of all experts."""
    if ll is None:
        return None
    return {"codec": ll["codec"], "dtype": ll["dtype"], "bytes": sum(i["nbytes"] for i in ll["experts"]),
            "raw_bytes": sum(i["raw_nbytes"] for i in ll["experts"])}


def check_lossless_files(path, entries: dict) -> None:
    """Every lossless file against the manifest as an experts file is (reader.check_blob_file: blobs inside it, its
    tensors, their offsets and sizes, its metadata); crc32s are checked when a blob is read."""
    from d2moe.quantize.format.reader import check_blob_file

    by_file: dict[str, list[dict]] = {}
    for _, item in sorted(entries.items()):
        by_file.setdefault(item["file"], []).append(item)
    for name, items in by_file.items():
        if not (path / name).exists():  # its own remedy: the tier is optional
            raise FormatError(f"{name}: file is missing (re-pack with --lossless)")
        blobs = [(i["layer"], i["expert"], i["offset"], i["nbytes"], -(-i["nbytes"] // ALIGN) * ALIGN) for i in items]
        check_blob_file(path, name, blobs, lossless_file_metadata(items[0]["layer"]), "the manifest's lossless tier",
                        "re-pack with --lossless")
