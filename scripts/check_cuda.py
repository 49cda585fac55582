"""`make check-cuda`: compile every CUDA kernel to PTX for sm_80/sm_87/sm_90 through NVRTC (no GPU
needed) and print a markdown table; exit 1 with the compiler log when one fails."""

from __future__ import annotations

import sys

from d2moe.kernels.cuda_build import CudaBuildError, check_ptx


def main() -> int:
    try:
        results = check_ptx()
    except CudaBuildError as exc:
        print(f"PTX check failed: {exc}", file=sys.stderr)
        return 1
    print("| arch | kernels | PTX bytes | NVRTC seconds |\n|---|---|---:|---:|")
    for r in results:
        print(f"| {r.arch} | {', '.join(r.entries)} | {r.ptx_bytes} | {r.seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
