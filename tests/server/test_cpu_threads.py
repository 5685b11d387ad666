"""On a CPU a small step leaves one core to the rest of the process (server/engine/cpu_threads.py)."""
import torch

from server.engine.cpu_threads import SMALL_STEP_TOKENS, CpuThreads
from tests.helpers import make_hf_model, run_capture, small_engine


def test_small_steps_use_one_core_fewer():
    threads = CpuThreads(total=4)
    assert threads.threads_for(1) == threads.threads_for(SMALL_STEP_TOKENS) == 3
    assert threads.threads_for(SMALL_STEP_TOKENS + 1) == 4
    assert CpuThreads(total=1).threads_for(1) == 1  # never zero


def test_the_engine_sets_the_threads_per_step(tmp_path):
    before = torch.get_num_threads()
    try:
        engine = small_engine(make_hf_model(tmp_path / "m", "llama"))
        engine.runner.cpu_threads = CpuThreads(total=2)
        seen = []
        execute = engine.runner.execute

        def spy(batch):
            logits = execute(batch)
            seen.append((batch.num_tokens, torch.get_num_threads()))
            return logits

        engine.runner.execute = spy
        run_capture(engine, {"a": list(range(3, 15))}, {"a": None}, max_tokens=3)
        assert seen[0] == (12, 2) and all(t == 1 for n, t in seen[1:] if n <= SMALL_STEP_TOKENS) and len(seen) == 3
    finally:
        torch.set_num_threads(before)
