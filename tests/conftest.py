"""Suite-wide setup. Triton enters interpreter mode only if TRITON_INTERPRET is set before triton is first imported,
so on a machine without CUDA it is set here, before any test module imports kernel code."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
