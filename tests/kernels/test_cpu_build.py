"""kernels.cpu_build: our C kernels are built once per source and flags into the cache directory, and a compiler
that fails or is missing is an OSError (callers fall back to PyTorch), with nothing half-built left behind."""
import pytest

from kernels import cpu_build, cpu_matmul

pytestmark = pytest.mark.skipif(not cpu_build.supported(), reason="needs an x86-64 CPU with AVX2 and FMA")


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
