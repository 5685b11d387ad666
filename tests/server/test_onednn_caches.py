"""A CPU engine bounds oneDNN's caches of compiled matmuls (server/engine/onednn_caches.py): with the defaults, a
projection called at many token counts keeps a buffer the size of its output for each, and the process grows by
gigabytes over a serving day. The probe forces oneDNN (MULTIPLEX_CPU_MATMUL=onednn): by default the
projections run our own kernel, which caches nothing per shape (checked too)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kernels import cpu_matmul
from kernels.linear import can_prepack
from server.engine.onednn_caches import VARIABLES

# In a fresh process (the caches' sizes are read at its first oneDNN call): build a CPU engine (or not), then call
# a 512 -> 2048 projection at 256 token counts, twice over, and print how much the process grew (MiB).
PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from kernels.linear import linear, prepack
    if sys.argv[1] == "engine":
        from tests.helpers import make_hf_model, small_engine
        small_engine(make_hf_model(Path(sys.argv[2]), "llama"))
    torch.set_num_threads(1)

    def rss_mib():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024

    weight = prepack(torch.randn(2048, 512))
    x = torch.randn(256, 512)
    linear(x[:1], weight)
    start = rss_mib()
    for _ in range(2):
        for m in range(1, 257):
            linear(x[:m], weight)
    print(rss_mib() - start)
""")


def _growth_mib(tmp_path, mode: str, matmul: str = "onednn") -> float:
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES} | {"MULTIPLEX_CPU_MATMUL": matmul}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(tmp_path / mode)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr[-3000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not can_prepack(torch.randn(2, 2)), reason="no oneDNN matmuls on this CPU build")
def test_a_cpu_engine_bounds_the_memory_onednn_keeps_per_shape(tmp_path):
    unbounded = _growth_mib(tmp_path, "plain")  # 256 outputs of 8 KiB per token: ~256 MiB if every one is kept
    bounded = _growth_mib(tmp_path, "engine")  # 16 of them at most: 32 MiB
    assert unbounded > 180, f"the probe no longer shows oneDNN's per-shape memory ({unbounded:.0f} MiB)"
    assert bounded < 100, f"grew {bounded:.0f} MiB with the engine's bounds (without: {unbounded:.0f} MiB)"


@pytest.mark.skipif(not cpu_matmul.available(), reason="needs our kernel (x86-64, AVX2 and FMA, a C compiler)")
def test_our_kernel_keeps_nothing_per_shape(tmp_path):
    """Where projections run our kernel (kernels/cpu_matmul.py), the same probe does not grow at all."""
    assert _growth_mib(tmp_path, "plain", matmul="ours") < 20


def test_a_users_own_setting_wins(monkeypatch):
    from server.engine.onednn_caches import bound_onednn_caches

    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert bound_onednn_caches() == {"LRU_CACHE_CAPACITY": "512", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16"}
