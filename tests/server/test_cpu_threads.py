"""A CPU engine's forward takes every core on a small machine (all but one on a larger one), and only its forward's thread computes on more than one
(server/engine/cpu_threads.py): a second OpenMP team anywhere in the process slows every op of the forward."""
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from server.engine.cpu_threads import PROCESS_THREADS, _loaded_library, cpu_threads
from tests.helpers import make_hf_model, small_engine


def test_default_is_every_core_on_a_small_machine_else_all_but_one_and_a_setting_overrides_it():
    assert cpu_threads() == (PROCESS_THREADS if PROCESS_THREADS <= 4 else PROCESS_THREADS - 1)
    assert cpu_threads(3) == 3


def _in_new_thread(fn):
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def _mkl_threads() -> int | None:
    torch_cpu = _loaded_library(("libtorch_cpu",))
    return torch_cpu.MKL_Get_Max_Threads() if torch_cpu is not None and hasattr(torch_cpu, "MKL_Get_Max_Threads") \
        else None


def test_only_the_forward_thread_computes_on_more_than_one_thread(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    engine = small_engine(path, cpu_threads=3)
    forward = engine.on_forward_thread(lambda: (torch.get_num_threads(), _mkl_threads()))
    assert forward[0] == 3
    assert forward[1] in (None, 3)
    assert torch.get_num_threads() == 1  # this thread, which built the engine
    assert _in_new_thread(torch.get_num_threads) == 1  # any other: an executor parsing an adapter, the event loop
    assert ThreadPoolExecutor(1).submit(torch.get_num_threads).result() == 1
    assert _in_new_thread(lambda: (torch.get_num_threads(), _mkl_threads())[1]) in (None, 1)  # after torch's own init

    default = small_engine(path)
    assert default.on_forward_thread(torch.get_num_threads) == cpu_threads()
    assert engine.on_forward_thread(torch.get_num_threads) == 3  # per engine: the first keeps its own


def test_without_an_openmp_runtime_the_count_is_set_process_wide(monkeypatch):
    import server.engine.cpu_threads as ct

    monkeypatch.setattr(ct, "_loaded_library", lambda prefixes: None)
    before = torch.get_num_threads()
    try:
        assert ThreadPoolExecutor(1, initializer=ct.enter_forward_thread, initargs=(2,)).submit(
            torch.get_num_threads).result() == 2
    finally:
        torch.set_num_threads(before)


def test_the_stepping_thread_runs_the_forward_itself_when_nothing_overlaps_it(tmp_path):
    """run_forwards_here: the thread that steps takes the forward thread's OpenMP team and runs each forward itself
    (no hand-off); with the text work or the lookahead overlapping the forward, the forward thread runs it again."""
    from server.engine.request import Request, SamplingParams

    engine = small_engine(make_hf_model(tmp_path / "m", "llama"), cpu_threads=3)
    engine.overlap_text = engine.lookahead = False
    execute, ran_on = engine.runner.execute, []

    def recording_execute(batch):
        ran_on.append((threading.get_ident(), torch.get_num_threads()))
        return execute(batch)

    engine.runner.execute = recording_execute

    def steps(n: int) -> None:
        for _ in range(n):
            engine.step()

    def run_here():
        engine.run_forwards_here()
        engine.add_request(Request("a", [3, 4, 5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
        steps(3)
        engine.overlap_text = True
        steps(3)
        return threading.get_ident()

    stepper = _in_new_thread(run_here)
    forward_thread = engine.on_forward_thread(threading.get_ident)
    assert ran_on[:3] == [(stepper, 3)] * 3
    assert [t for t, _ in ran_on[3:]] == [forward_thread] * 3
    assert torch.get_num_threads() == 1  # this thread is untouched


def test_with_the_forward_overlapped_the_stepping_thread_keeps_one_thread(tmp_path):
    """run_forwards_here with the text overlap on: the forward thread keeps the process's only team."""
    engine = small_engine(make_hf_model(tmp_path / "m", "llama"), cpu_threads=3)
    engine.overlap_text = True

    def run_here():
        engine.run_forwards_here()
        return torch.get_num_threads()

    assert _in_new_thread(run_here) == 1
    assert engine._inline_thread is None
