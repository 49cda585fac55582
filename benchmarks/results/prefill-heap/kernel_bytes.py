"""RSS oneDNN keeps per bf16 GEMM shape: one M x K matrix times K x N inputs at every N of a list, one GEMM each,
RSS growth over the shapes after the first divided by their count (GEMM_KERNEL_BYTES in kernels/dispatch.py).

    python kernel_bytes.py M K N1,N2,...
"""
import torch, sys, ctypes, os
torch.set_num_threads(1)
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
M, K = int(sys.argv[1]), int(sys.argv[2])
w = torch.randn(M, K).bfloat16()
widths = [int(v) for v in sys.argv[3].split(',')]
xs = {n: torch.randn(K, n).bfloat16() for n in widths}
outs = {n: torch.empty(M, n, dtype=torch.bfloat16) for n in widths}
torch.mm(w, xs[widths[0]], out=outs[widths[0]])
r0 = rss()
for n in widths[1:]:
    torch.mm(w, xs[n], out=outs[n])
print(M, K, len(widths) - 1, 'shapes', round((rss() - r0) / (len(widths) - 1), 3), 'MiB per shape')
