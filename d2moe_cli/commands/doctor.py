"""`d2moe doctor --device cuda`: compile the CUDA kernels (PTX, no GPU needed) and self-check every
kernel and level against the torch reference on the GPU, as a table (the run's first-use check)."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor_cmd(
        device: Annotated[str, typer.Option(help="cuda: PTX build + kernel self-check on the GPU.")] = "cuda",
        as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    ) -> None:
        """Check the kernels of a device: PTX for sm_80/87/90, then every kernel x level vs the reference."""
        from d2moe.errors import UsageError
        from d2moe.kernels.cuda_build import check_ptx

        if device != "cuda":
            raise UsageError(f"doctor --device {device!r}: only cuda has kernels to check (CPU kernels self-test "
                             "in make test)")
        report = {"ptx": [r.__dict__ for r in check_ptx()]}
        if not as_json:  # shown before the GPU part, which fails in one line where there is no GPU
            for p in report["ptx"]:
                typer.echo(f"PTX {p['arch']}: {', '.join(p['entries'])} ({p['ptx_bytes']} bytes, {p['seconds']:.2f} s)")
        from d2moe.kernels import selfcheck
        from d2moe.kernels.cuda import CudaExperts, CupyLauncher
        from d2moe.kernels.cuda_build import require_cuda

        require_cuda(otherwise="where doctor checks each kernel against the reference (the PTX above needs no GPU)")

        rows = selfcheck.run_selfcheck(CudaExperts(CupyLauncher()))  # one clear error without CuPy/GPU
        report["selfcheck"] = selfcheck.summary(rows)
        report["ok"] = all(r.ok for r in rows)
        if as_json:
            typer.echo(json.dumps(report))
        else:
            typer.echo("| kernel | cases | failed | worst error / tolerance | worst case |")
            typer.echo("|---|---:|---:|---:|---|")
            for s in report["selfcheck"]:
                typer.echo(f"| {s['kernel']} | {s['cases']} | {s['failed']} | {s['worst_ratio']:.3g} | {s['worst_case']} |")
        if not report["ok"]:
            raise typer.Exit(1)
