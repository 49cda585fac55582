"""Session lifecycle: a closed session lets go of its memory without waiting for the garbage collector."""

from __future__ import annotations

import gc
import weakref

import torch
from packed import packed_tiny

from d2moe.runtime.generate import SamplingOptions
from d2moe.runtime.session import RunOptions, Session


def test_closing_a_session_frees_its_model_and_cache_at_once(tmp_path_factory):
    """Its parts refer to one another; closing must not leave that cycle for a later gc pass (a bench sweep
    opens a session per run: each one's dense weights and cache stayed until the collector ran, and a
    real-shape sweep ran out of memory)."""
    torch.set_num_threads(1)
    packed = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4))[1]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with Session(packed, RunOptions(memory_budget=64 * 2**20, max_tokens=32)) as session:
            session.generate(["the quick brown fox"], SamplingOptions(max_new_tokens=3), chat_template=False)
            model, cache = weakref.ref(session.model), session.cache
            assert len(cache) > 0
        assert model() is None and len(cache) == 0 and cache.held_bytes == 0
    finally:
        if was_enabled:
            gc.enable()


def test_a_small_models_prompt_runs_torch_on_one_thread(tmp_path_factory):
    """Torch's threads pay in the prompt's forward at real widths; a small model's short ops would each wait at
    torch's barrier for a core another process holds (4-11x slower prefill with one core busy)."""
    from d2moe.runtime import session as session_module

    packed = packed_tiny(tmp_path_factory, "mixtral", bits=(2, 4))[1]
    with Session(packed, RunOptions(memory_budget=64 * 2**20, max_tokens=32, threads=2)) as session:
        assert session.kernels.splitter.threads == 2
        assert session._prefill_threads() == 1  # hidden size 64
        session.ckpt.config["hidden_size"] = session_module.PREFILL_THREADS_MIN_HIDDEN
        assert session._prefill_threads() == 2
