"""A bfloat16 copy of a Hugging Face checkpoint (to_bf16.py SRC DST): its safetensors' float tensors cast, the other
files copied, config.json's dtype set. The trained models are float16, which pack --calib multiplies in float32 on
every CPU; a bfloat16 copy takes the bfloat16 products where the CPU has them."""
import json, shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.suffix == ".safetensors":
        save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(f).items()}, dst / f.name,
                  metadata={"format": "pt"})
    elif f.is_file():
        shutil.copy(f, dst / f.name)
cfg = json.loads((dst / "config.json").read_text())
for key in ("torch_dtype", "dtype"):
    if key in cfg:
        cfg[key] = "bfloat16"
(dst / "config.json").write_text(json.dumps(cfg, indent=2))
print(dst)
