"""CPU steps' intra-op threads (server/engine/cpu_threads.py): one core fewer for decode steps, all for prefills."""
import torch

from server.engine.cpu_threads import LARGE_STEP_TOKENS, PROCESS_THREADS, StepThreads
from tests.helpers import make_hf_model, run_capture, small_engine


def test_policy_and_setting():
    policy = StepThreads()
    assert policy.threads_for(1) == max(1, PROCESS_THREADS - 1)
    assert policy.threads_for(LARGE_STEP_TOKENS) == PROCESS_THREADS
    fixed = StepThreads(3)
    assert fixed.threads_for(1) == fixed.threads_for(LARGE_STEP_TOKENS) == 3


def test_the_engine_sets_the_threads_of_each_step(tmp_path):
    engine = small_engine(make_hf_model(tmp_path / "m", "llama"), max_prefill_chunk=128, max_num_batched_tokens=128)
    engine.runner.step_threads.small, engine.runner.step_threads.large = 1, 2
    seen = []
    execute = engine.runner.execute

    def spy(batch):
        logits = execute(batch)
        seen.append((batch.num_tokens, torch.get_num_threads()))
        return logits

    engine.runner.execute = spy
    run_capture(engine, {"a": list(range(3, 3 + LARGE_STEP_TOKENS))}, {"a": None}, max_tokens=3)
    assert seen == [(LARGE_STEP_TOKENS, 2), (1, 1), (1, 1)]
