"""A CPU engine leaves one core to the rest of the process (server/engine/cpu_threads.py)."""
import torch

from server.engine.cpu_threads import PROCESS_THREADS, cpu_threads
from tests.helpers import make_hf_model, small_engine


def test_default_is_every_core_but_one_and_a_setting_overrides_it():
    assert cpu_threads() == max(1, PROCESS_THREADS - 1)
    assert cpu_threads(3) == 3


def test_a_cpu_engine_sets_its_threads(tmp_path):
    path = make_hf_model(tmp_path / "m", "llama")
    small_engine(path)
    assert torch.get_num_threads() == cpu_threads()
    small_engine(path, cpu_threads=2)
    assert torch.get_num_threads() == 2
