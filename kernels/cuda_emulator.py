"""A CPU stand-in for the GPU: runs what kernels/cuda/mwq.cu computes, in torch, from the same
argument records and pointers, so every line of host code a GPU run takes is tested here.

It is not the oracle (kernels/reference.py is): it reads planes as the kernel does (little-endian
uint32 words, bit j = column 32 k + j; bytes assembled when unaligned), builds each term's code,
and writes only what the launch geometry covers, so a wrong record field, pointer, term, plane
count, grid or token chunk shows up as a mismatch against the reference. `corrupt` names kernels
(cuda.KERNEL_NAMES; gemv = one-problem launches, gemv_grouped = several) whose result it perturbs,
to prove the self-check catches a wrong kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from d2moe.kernels import cuda_abi as abi

_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}


class EmulatedLauncher:
    def __init__(self, corrupt: set[str] | frozenset[str] = frozenset()) -> None:
        self.device = torch.device("cpu")
        self.corrupt = set(corrupt)
        self._storages: dict[int, torch.UntypedStorage] = {}  # base address -> storage ("device memory")
        self.launches: list[tuple[str, tuple, tuple]] = []

    # ---- memory ---------------------------------------------------------------------------
    def ptr(self, t: torch.Tensor) -> int:
        st = t.untyped_storage()
        self._storages[st.data_ptr()] = st
        return t.data_ptr()

    def upload(self, rec: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.frombuffer(rec.tobytes(), np.uint8).copy())
        self.ptr(t)
        return t

    def memory(self, addr: int, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] view of registered memory at `addr` (IndexError: a pointer to nothing)."""
        for base, st in self._storages.items():
            if base <= addr and addr + nbytes <= base + st.nbytes():
                return torch.empty(0, dtype=torch.uint8).set_(st, addr - base, (nbytes,))
        raise IndexError(f"emulated kernel read {nbytes} bytes at {addr:#x}: no tensor there")

    def _array(self, addr: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        return self.memory(addr, n).view(dtype).view(shape)

    # ---- kernels ----------------------------------------------------------------------------
    def launch(self, name: str, grid, block, args: tuple) -> None:
        self.launches.append((name, tuple(grid), tuple(block)))
        getattr(self, "_" + name)(grid, block, *args)

    def weight(self, rec) -> torch.Tensor:
        """float32 [rows, cols] the kernel's terms give (planes read as 32-bit words)."""
        rows, cols, gs, nterms = (int(rec[k]) for k in ("rows", "cols", "group_size", "nterms"))
        groups = cols // gs
        used = int(rec["first"][nterms - 1] + rec["nplanes"][nterms - 1])
        words = -(-cols // 32)
        shift = torch.arange(32, dtype=torch.int64)
        bits = []
        for p in range(used):
            raw = self._array(int(rec["planes"][p]), torch.uint8, (rows, cols // 8))
            padded = torch.zeros(rows, words * 4, dtype=torch.uint8)
            padded[:, : cols // 8] = raw
            w = padded.view(rows, words, 4).to(torch.int64)
            w = w[..., 0] | (w[..., 1] << 8) | (w[..., 2] << 16) | (w[..., 3] << 24)  # little-endian words
            bits.append(((w.unsqueeze(-1) >> shift) & 1).reshape(rows, words * 32)[:, :cols])
        offset = self._array(int(rec["offset"]), torch.float16, (rows, groups)).float()
        base = offset.clone()
        w = torch.zeros(rows, cols)
        for t in range(nterms):
            first, n = int(rec["first"][t]), int(rec["nplanes"][t])
            a = float(rec["mul"][t]) * self._array(int(rec["coef"][t]), torch.float16, (rows, groups)).float()
            base += a * float(rec["bias"][t])
            code = sum(bits[p] << (first + n - 1 - p) for p in range(first, first + n))
            w += a.repeat_interleave(gs, dim=1) * code.float()
        return w + base.repeat_interleave(gs, dim=1)

    def _d2_dequant(self, grid, block, struct_ptr: int, out_ptr: int, out_kind) -> None:
        rec = np.frombuffer(self.memory(struct_ptr, abi.MAT_DTYPE.itemsize).numpy().tobytes(), abi.MAT_DTYPE)[0]
        rows, cols = int(rec["rows"]), int(rec["cols"])
        w = self.weight(rec)
        if {1: "dequant_f16", 2: "dequant_bf16"}.get(int(out_kind)) in self.corrupt:
            w[rows // 2, cols // 3] += 0.5 * float(w.abs().max()) + 1.0
        out = self._array(out_ptr, _DTYPES[int(out_kind)], (rows, cols))
        r1 = min(rows, grid[0])
        c1 = min(cols, 32 * grid[1] * block[0])  # threads beyond the grid never ran
        out[:r1, :c1] = w[:r1, :c1].to(out.dtype)

    def _d2_gemv(self, grid, block, problems_ptr: int) -> None:
        n = int(grid[1])
        raw = self.memory(problems_ptr, n * abi.PROBLEM_DTYPE.itemsize).numpy().tobytes()
        for i, pr in enumerate(np.frombuffer(raw, abi.PROBLEM_DTYPE)):
            rec, ntok = pr["m"], int(pr["ntok"])
            rows, cols = int(rec["rows"]), int(rec["cols"])
            if not 1 <= ntok <= abi.MAX_TOKENS or block[0] != abi.GEMV_THREADS:
                raise ValueError(f"d2_gemv problem {i}: {ntok} tokens, block {block}")
            x = self._array(int(pr["x"]), torch.float32, (ntok, cols))
            y = self._array(int(pr["y"]), torch.float32, (ntok, rows))
            out = x @ self.weight(rec).t()
            if ("gemv" if n == 1 else "gemv_grouped") in self.corrupt and i == n - 1:
                out[-1, rows // 2] += 1e-2 * float(out.abs().max()) + 1e-3
            r1 = min(rows, grid[0] * abi.GEMV_ROWS_PER_BLOCK)
            y[:, :r1] = out[:, :r1]
