"""kernels.cpu_build: our C kernels are built once per source and flags into the cache directory, and a compiler
that fails or is missing is an OSError (callers fall back to PyTorch), with nothing half-built left behind."""
import pytest

from kernels import cpu_build, cpu_matmul


@pytest.mark.skipif(not cpu_build.supported(), reason="needs an x86-64 CPU with AVX2 and FMA")
def test_the_build_is_cached_by_the_source_hash_and_a_missing_compiler_is_an_oserror(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTIPLEX_CACHE_DIR", str(tmp_path / "cache"))
    built = cpu_build.build(cpu_matmul.SOURCE, "avx2")
    assert built.parent == tmp_path / "cache" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert cpu_build.build(cpu_matmul.SOURCE, "avx2") == built and built.stat().st_mtime_ns == stamp  # not built again
    monkeypatch.setenv("MULTIPLEX_CACHE_DIR", str(tmp_path / "other"))
    for cc in ("/bin/false", "/no/such/compiler", "env /bin/false"):  # fails; names nothing; a command with arguments
        monkeypatch.setenv("CC", cc)
        with pytest.raises(OSError, match="failed"):
            cpu_build.build(cpu_matmul.SOURCE, "avx2")
    assert not any((tmp_path / "other").iterdir())  # nothing half-built left behind


def test_a_kernels_switch(monkeypatch):
    """auto|ours|<off>: a wrong value is refused by name; an earlier name maps; ours where it cannot run is an error."""
    monkeypatch.setenv("MULTIPLEX_TEST_KERNEL", "fast")
    with pytest.raises(ValueError, match="MULTIPLEX_TEST_KERNEL='fast': expected one of auto, ours, torch"):
        cpu_build.choice("MULTIPLEX_TEST_KERNEL", "torch")
    monkeypatch.setenv("MULTIPLEX_TEST_KERNEL", "avx2")
    assert cpu_build.choice("MULTIPLEX_TEST_KERNEL", "torch", earlier={"avx2": "ours"}) == "ours"
    monkeypatch.delenv("MULTIPLEX_TEST_KERNEL")
    assert cpu_build.choice("MULTIPLEX_TEST_KERNEL", "torch") == "auto"
    for available in (True, False):
        assert cpu_build.decide("X", "auto", "torch", lambda: available) is available
        assert cpu_build.decide("X", "torch", "torch", lambda: available) is False
    assert cpu_build.decide("X", "ours", "torch", lambda: True) is True
    with pytest.raises(RuntimeError, match="X=ours, but that kernel cannot run here"):
        cpu_build.decide("X", "ours", "torch", lambda: False)
