"""Fixtures shared by the trainer's tests."""
import pytest
import torch

from adapters.data import build_char_tokenizer
from tests.helpers import char_llama_dir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run ~100x faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    """The character tokenizer of the synthetic tasks."""
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama for it, saved as a local checkpoint."""
    return char_llama_dir(tmp_path_factory.mktemp("tiny-llama"), tokenizer)
