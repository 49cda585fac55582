#!/usr/bin/env bash
# Every GPU test and benchmark in one command (< 8 minutes on one H200), tables into a folder:
#   bash scripts/gpu_check.sh [OUT_DIR=gpu_results]
# Needs an NVIDIA GPU, a CUDA build of torch and pip install -e '.[cuda]' (make setup installs the dev extra).
# PY picks the interpreter (default: .venv/bin/python when there is one, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
if [ -z "${PY:-}" ]; then [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; fi
D2MOE="$PY -m d2moe"
status=0
step() { echo "== $1" >&2; shift; "$@" || { echo "FAILED: $*" | tee -a "$OUT/failures.txt"; status=1; return 1; }; }

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
$PY -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)" \
  > "$OUT/versions.txt" 2>&1 || true
step "PTX (sm_80/87/90)" bash -c "$PY scripts/check_cuda.py > '$OUT/ptx.md'"
step "doctor (self-check table)" bash -c "$D2MOE doctor --device cuda > '$OUT/selfcheck.md'"
step "tests (cuda + gpu marked)" timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/cuda tests/kernels -o addopts="" \
  --junitxml="$OUT/pytest.xml"
step "kernel tolerance + GEMV tables" timeout 240 "$PY" scripts/gpu_bench.py "$OUT"

# end to end: the embedded model packed once with its trained bit-width gate, decode per policy under a budget that holds 40% of the experts
CKPT="$OUT/tiny-mixtral-packed"
step "pack embedded model (with its trained gate)" bash -c "$D2MOE pack \$($PY -c 'from d2moe.commands.demo import embedded_model_dir as e; print(e())') '$CKPT' --bits 2,3,4 --router \$($PY -c 'from d2moe.commands.demo import embedded_gate as g; print(g())') --force > /dev/null"
BUDGET=$($PY -c "from d2moe.commands.demo import demo_budget; print(demo_budget(__import__('pathlib').Path('$CKPT'), 160, 0.4)[0])")
echo "| policy | device | decode tok/s | prefill tok/s | load s | compute s | wait s | hidden load % | peak / budget | cuda peak MiB |" > "$OUT/e2e.md"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" >> "$OUT/e2e.md"
for policy in d2moe matryoshka-free moqe-dynaio edgemoe; do  # hold-int4 cannot fit 40% of the experts by design
  for dev in cuda cpu; do
    step "run $policy $dev" timeout 60 $D2MOE run "$CKPT" --device "$dev" --policy "$policy" --memory-budget "$BUDGET" \
      --prompt "Tell me about mixtures of experts." --max-new-tokens 96 --json > "$OUT/run-$policy-$dev.json" || continue
    $PY - "$OUT/run-$policy-$dev.json" "$policy" "$dev" >> "$OUT/e2e.md" <<'PYEOF'
import json, sys
s = json.load(open(sys.argv[1]))["stats"]
load, wait = s["expert_load_s"], s["expert_step_s"] - s["expert_compute_s"]
hidden = 100 * (1 - min(load, max(wait, 0)) / load) if load > 0 else 100
m = s["memory"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {s['decode_tokens_per_s']:.1f} | {s['prefill_tokens_per_s']:.1f} | {load:.3f} | "
      f"{s['expert_compute_s']:.3f} | {wait:.3f} | {hidden:.0f} | {m['peak_bytes'] / m['budget_bytes']:.0%} | "
      f"{s.get('cuda_peak_allocated_bytes', 0) / 2**20:.1f} |")
PYEOF
  done
done
# transformers alone on the same GPU and model (bf16, KV cache, greedy): how much of a GPU token is ours
step "transformers on the GPU" $PY - >> "$OUT/e2e.md" <<'PYEOF'
import json, sys, time
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from d2moe.commands.demo import embedded_model_dir
src = embedded_model_dir()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).to("cuda").eval()
ids = AutoTokenizer.from_pretrained(src)("Tell me about mixtures of experts.", return_tensors="pt").input_ids.cuda()
with torch.inference_mode():
    for rep in range(2):  # the first pass warms up
        torch.cuda.synchronize(); t0 = time.perf_counter()
        out = model(ids, use_cache=True); past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize(); prefill = time.perf_counter() - t0; t0 = time.perf_counter()
        for _ in range(95):
            out = model(tok, past_key_values=past, use_cache=True); past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize(); decode = time.perf_counter() - t0
print(f"| transformers bf16 (all on the GPU) | cuda | {95 / decode:.1f} | {ids.shape[1] / prefill:.1f} | | | | | | |")
PYEOF
cat "$OUT/e2e.md"
# one archive of every table and run (a lent machine may return only a few files)
tar czf "$OUT.tgz" --exclude=tiny-mixtral-packed -C "$(dirname "$OUT")" "$(basename "$OUT")" || true
echo "tables in $OUT and $OUT.tgz (status $status)"
exit $status
