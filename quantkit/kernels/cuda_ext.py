"""The CUDA kernels of csrc/ (torch.ops.quantkit.*), built just in time with torch.utils.cpp_extension on first use
and cached under $QUANTKIT_CACHE/torch_extensions (a rebuild only when a source, torch or CUDA changes).

Only a machine with a CUDA device ever builds, so a CPU install needs no nvcc. A missing toolchain or a failed
build is not an error here: `load` returns the reason, which the CUDA kernels give as their `can_implement`
refusal, so kernel selection logs it on its one line and the Triton kernels serve instead."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[1] / "csrc"  # a link to the top-level csrc/ in a checkout, files in a wheel
SOURCES = ("bindings.cpp", "gemv.cu", "wna16_gemm.cu", "wna16_wgmma.cu", "row_quant.cu")
# SASS for Ampere, Ada and Hopper, plus Ampere PTX that newer GPUs compile at load (the kernels need sm_80's
# mma.sync; only wna16_wgmma.cu needs sm_90a, and its kernel is empty in the other builds).
ARCH_FLAGS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_89,code=sm_89",
              "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=compute_80")

_lock = threading.Lock()
_result: tuple[object | None, str] | None = None


def load() -> tuple[object | None, str]:
    """(torch.ops.quantkit, "") once the extension is loaded in this process, else (None, why not). The first call
    builds (or finds the cached build); every later call, from any thread, returns the same answer."""
    global _result
    with _lock:
        if _result is None:
            _result = _build()
            if _result[0] is None:
                logger.warning("CUDA kernels unavailable: %s", _result[1])
        return _result


def _build() -> tuple[object | None, str]:
    if not torch.cuda.is_available():
        return None, "no CUDA device (csrc/ is built on first use on a GPU machine)"
    from torch.utils import cpp_extension
    nvcc = Path(cpp_extension.CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.exists():
        return None, "nvcc not found to build csrc/ (install the CUDA toolkit or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja not found to build csrc/ (pip install ninja)"
    missing = [s for s in SOURCES if not (CSRC / s).exists()]
    if missing:
        return None, f"CUDA sources {missing} not found in {CSRC} (run from a source checkout)"
    from quantkit.checkpoint.resolve import cache_dir
    tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
    build_dir = cache_dir() / "torch_extensions" / f"quantkit_ops-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(name="quantkit_ops", sources=[str(CSRC / s) for s in SOURCES],
                           extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *ARCH_FLAGS],
                           extra_include_paths=[str(CSRC)], build_directory=str(build_dir),
                           is_python_module=False)
    except Exception as e:  # a compiler error, a linker error, a stale lock: all mean "not available"
        logger.warning("building csrc/ failed:\n%s", e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None, f"building csrc/ failed ({first[:200]}; the log has the compiler output)"
    from quantkit.kernels import pdl
    pdl.sync_cuda_kernels()
    return torch.ops.quantkit, ""


def loaded() -> bool:
    """Whether the extension is loaded in this process (load() succeeded)."""
    return _result is not None and _result[0] is not None
