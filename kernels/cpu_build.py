"""Our C kernels for the CPU (kernels/cpu_matmul.c, cpu_attention.c, cpu_elementwise.c): compiled on first use with
the system's C compiler and loaded with ctypes.

A source is built with the flags of a variant (`VARIANTS`: its AVX2 form everywhere; its AVX-512 form, where it has
one, on a CPU where PyTorch finds AVX-512) into a cache directory (`cache_dir()`), named by the hash of the source,
the headers and sources beside it (which it may include: kernels/cpu_vector.h; kernels/cpu_layer.c includes the
other sources) and the flags, built aside and renamed (processes may race); `CC` may name another compiler, with
arguments. A failed build is an OSError, which callers turn into a warning and their
PyTorch path. The libraries link PyTorch's own libgomp (shared by soname), so their OpenMP teams are the calling
thread's.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
VARIANTS = {"avx2": FLAGS, "avx512": FLAGS + ("-mavx512f",)}
NATIVE = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"  # the widest this CPU runs

_LOCK = threading.Lock()
_LIBS: dict[tuple[Path, str], ctypes.CDLL] = {}


def supported() -> bool:
    """Whether this CPU runs the AVX2 form: PyTorch's own check finds AVX2 and FMA (its "AVX2" and "AVX512"
    capabilities require both; an x86-64 CPU)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def choice(env: str, off: str, earlier: dict[str, str] | None = None) -> str:
    """The setting of a kernel's switch `env`: auto (the default), ours, or `off` (its PyTorch path); `earlier`
    maps values it once had to these."""
    value = os.environ.get(env, "auto")
    value = (earlier or {}).get(value, value)
    if value not in ("auto", "ours", off):
        raise ValueError(f"{env}={value!r}: expected one of auto, ours, {off}")
    return value


def decide(env: str, value: str, off: str, available) -> bool:
    """Whether a kernel runs: `off` -> no; ours -> yes, or RuntimeError where `available()` is False; auto ->
    `available()`."""
    if value == off:
        return False
    if value == "ours" and not available():
        raise RuntimeError(f"{env}=ours, but that kernel cannot run here (see the log)")
    return available()


def loads(library, what: str) -> bool:
    """Whether this CPU runs a kernel (`supported()`) and `library()` builds and loads it; a failed build is a
    warning naming `what` falls back to PyTorch, and False."""
    if not supported():
        return False
    try:
        library()
    except OSError as exc:
        log.warning("%s is unavailable (%s); PyTorch's ops serve instead", what, exc)
        return False
    return True


def load(source: Path, variant: str, declare) -> ctypes.CDLL:
    """The library of `source` in `variant`, built on first use; `declare(lib)` sets its functions' argtypes once.
    OSError if it cannot be built."""
    with _LOCK:
        key = (source, variant)
        if key not in _LIBS:
            lib = ctypes.CDLL(str(build(source, variant)))
            declare(lib)
            _LIBS[key] = lib
        return _LIBS[key]


def cache_dir() -> Path:
    """`$MULTIPLEX_CACHE_DIR`, else `$XDG_CACHE_HOME/multiplex`, else `~/.cache/multiplex`."""
    if os.environ.get("MULTIPLEX_CACHE_DIR"):
        return Path(os.environ["MULTIPLEX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "multiplex"


def build(source: Path, variant: str) -> Path:
    """Compile `source` with the flags of `variant` into the cache directory, unless already there -> the library."""
    # what the source may include: the headers beside it, and the sources kernels/cpu_layer.c includes
    beside = sorted(p for p in source.parent.iterdir() if p.suffix in (".c", ".h") and p != source)
    text, flags = source.read_bytes() + b"".join(p.read_bytes() for p in beside), VARIANTS[variant]
    digest = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{variant}-{digest}.so"
    if target.exists():
        return target
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: processes may race
        built = Path(tmp) / target.name
        try:
            run = subprocess.run([*compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True)
        except OSError as exc:  # CC names no program
            raise OSError(f"{' '.join(compiler)} failed: {exc}") from exc
        if run.returncode != 0:
            raise OSError(f"{' '.join(compiler)} failed: {run.stderr.strip()[-500:]}")
        os.replace(built, target)
    log.info("built %s (%s) into %s", source.name, variant, target)
    return target
