"""llama.cpp's convert_hf_to_gguf.py for a model whose BPE pre-tokenizer hash it does not know (our
trained models' byte-level BPE): declare the "gpt-2" pre-tokenizer, which is what a ByteLevel
tokenizer.json does. Benchmarks only: tokenization may differ slightly from ours, so quality is
compared as each tool's ratio to its own 16-bit run.

    python scripts/llama_convert.py LLAMA_CPP_DIR MODEL --outtype f16 --outfile OUT.gguf
"""
import runpy
import sys
from pathlib import Path

LL = Path(sys.argv.pop(1))
sys.path.insert(0, str(LL))
sys.path.insert(1, str(LL / "gguf-py"))
import conversion.base as base  # noqa: E402

base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = str(LL / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
