"""`d2moe run --device cuda`: its one-line errors here, and its whole host path on the emulated GPU."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from cli_runner import invoke
from packed import packed_tiny

from d2moe.errors import EXIT_ENVIRONMENT, EXIT_USAGE


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    torch.set_num_threads(1)
    return packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4, 8))[1]


def _run(capsys, *args) -> tuple[int, str, str]:
    return invoke(capsys, "run", *args)


def _generate(capsys, packed, *extra) -> dict:
    code, out, err = _run(capsys, packed, "--prompt", "hello world", "--memory-budget", "64MiB",
                          "--max-new-tokens", "6", "--router-levels", "8,2", "--json", *extra)
    assert code == 0, err
    return json.loads(out)


def test_emulated_cuda_path_gives_the_reference_tokens(packed, capsys, monkeypatch):
    """Device buffers in the cache, rebased views, records, grouped launches: same tokens as the oracle."""
    from d2moe.kernels import cuda

    monkeypatch.setattr(cuda, "_checked", {})
    ref = _generate(capsys, packed, "--kernels", "reference")
    monkeypatch.setenv("D2MOE_CUDA_EMULATE", "1")
    # --no-reuse-aware: at this budget d2moe would read every expert up front; the reads are what is tested
    gpu = _generate(capsys, packed, "--device", "cuda", "--memory-budget", "64MiB", "--no-reuse-aware")
    assert gpu["outputs"][0]["text"] == ref["outputs"][0]["text"]
    stats = gpu["stats"]
    assert stats["device"] == "cuda" and stats["kernels"] == "cuda"
    assert stats["device_bytes_copied"] >= stats["bytes_read"] > 0
    assert stats["memory"]["peak_bytes"] <= stats["memory"]["budget_bytes"]


def test_emulated_cuda_with_a_corrupted_kernel_disables_it_and_still_matches(packed, capsys, monkeypatch):
    from d2moe.kernels import cuda

    monkeypatch.setattr(cuda, "_checked", {})
    ref = _generate(capsys, packed, "--kernels", "reference")
    monkeypatch.setenv("D2MOE_CUDA_EMULATE", "1")
    monkeypatch.setenv("D2MOE_CUDA_CORRUPT", "gemv_grouped")
    with pytest.warns(UserWarning, match="CUDA kernel gemv_grouped failed its self-check"):
        gpu = _generate(capsys, packed, "--device", "cuda")
    assert gpu["stats"]["kernels"] == "cuda (reference for gemv_grouped)"
    assert gpu["outputs"][0]["text"] == ref["outputs"][0]["text"]


def test_device_cuda_without_cupy_is_one_line(packed, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    code, out, err = _run(capsys, packed, "--prompt", "hi", "--device", "cuda")
    assert code == EXIT_ENVIRONMENT and out == ""
    assert "CuPy" in err and "pip install -e '.[cuda]'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_device_cuda_without_a_gpu_is_one_line(packed, capsys, monkeypatch):
    class _Runtime:
        @staticmethod
        def getDeviceCount():
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    class _Cuda:
        runtime = _Runtime

    class _Cupy:
        cuda = _Cuda

    monkeypatch.setitem(sys.modules, "cupy", _Cupy)
    code, out, err = _run(capsys, packed, "--prompt", "hi", "--device", "cuda")
    assert code == EXIT_ENVIRONMENT and out == ""
    assert "no usable CUDA GPU" in err and "--device cpu" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_device_is_a_usage_error(packed, capsys):
    code, _, err = _run(capsys, packed, "--prompt", "hi", "--device", "tpu")
    assert code == EXIT_USAGE and "--device 'tpu' is unknown" in err
