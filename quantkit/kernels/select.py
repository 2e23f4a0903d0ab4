"""Kernel choice: each kernel format has a priority list; per batch-size bucket the first kernel whose
`can_implement` accepts the layer wins, and the torch reference closes every list. One log line per layer kind
says what runs and why the kernels ahead of it were refused (a slow kernel is never picked silently).

`linear_kernel` (an argument, or EngineConfig.linear_kernel through `use_linear_kernel`) forces one kernel for
every bucket of every quantized layer, for benchmarking; a forced kernel that cannot run a layer is an error."""
from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from quantkit.kernels.base import BUCKETS, KernelPlan, LinearKernel, TorchReferenceKernel

logger = logging.getLogger(__name__)

# name -> "module:Class" (imported only on a CUDA device, so a CPU install never needs Triton or nvcc)
KERNELS: dict[str, str] = {
    "cuda_wna16_gemv": "quantkit.kernels.cuda_gemv:CudaWNA16Gemv",
    "cuda_wna16_gemm": "quantkit.kernels.cuda_gemm:CudaWNA16Gemm",
    "cuda_wna16_wgmma": "quantkit.kernels.cuda_gemm:CudaWNA16Wgmma",
    "cuda_nf4_gemv": "quantkit.kernels.cuda_gemv:CudaNF4Gemv",
    "cuda_nf4_wgmma": "quantkit.kernels.cuda_gemm:CudaNF4Wgmma",
    "cuda_nf4_gemm": "quantkit.kernels.cuda_gemm:CudaNF4Gemm",
    "triton_wna16_splitk": "quantkit.kernels.triton_wna16:TritonWNA16SplitK",
    "triton_wna16": "quantkit.kernels.triton_wna16:TritonWNA16",
    "wna16_dequant_cublas": "quantkit.kernels.triton_wna16:WNA16DequantCublas",
    "triton_w8a8_splitk": "quantkit.kernels.triton_w8a8:TritonW8A8SplitK",
    "scaled_mm_fp8": "quantkit.kernels.triton_w8a8:ScaledMMFP8",
    "triton_w8a8": "quantkit.kernels.triton_w8a8:TritonW8A8",
    "triton_nf4": "quantkit.kernels.triton_nf4:TritonNF4",
    "nf4_dequant_cublas": "quantkit.kernels.triton_nf4:NF4DequantCublas",
    "torch": "quantkit.kernels.base:TorchReferenceKernel",
}
PRIORITY: dict[str, list[str]] = {
    "wna16": ["cuda_wna16_gemv", "cuda_wna16_wgmma", "cuda_wna16_gemm", "triton_wna16_splitk", "wna16_dequant_cublas", "triton_wna16", "torch"],
    "w8a8": ["triton_w8a8_splitk", "scaled_mm_fp8", "triton_w8a8", "torch"],
    "nf4": ["cuda_nf4_gemv", "cuda_nf4_wgmma", "cuda_nf4_gemm", "triton_nf4", "nf4_dequant_cublas", "torch"],
}

_override: str | None = None
_logged: set[tuple] = set()


def check_kernel_name(name: str | None) -> None:
    if name is not None and name not in KERNELS:
        raise ValueError(f"linear_kernel={name!r} is not a known kernel (known: {', '.join(KERNELS)})")


@contextmanager
def use_linear_kernel(name: str | None) -> Iterator[None]:
    """Force `name` (None: automatic choice) for the layers whose weights are processed inside the block."""
    global _override
    check_kernel_name(name)
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def kernel_class(name: str) -> type[LinearKernel]:
    module, _, cls = KERNELS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _refusal(name: str, layer: nn.Module, method: object, device: torch.device, bucket) -> tuple[type | None, str]:
    """(class, "") when `name` can serve, else (class or None, reason)."""
    if name != "torch":
        if device.type != "cuda":
            return None, "needs a CUDA device"
        try:
            cls = kernel_class(name)
        except ImportError as e:  # triton missing on a GPU machine
            return None, f"cannot be imported ({e}; pip install triton)"
    else:
        cls = TorchReferenceKernel
    reason = cls.bucket_refusal(bucket) if bucket is not None else ""
    if not reason:
        ok, why = cls.can_implement(layer, method, device)
        reason = "" if ok else why
    return cls, reason


def select_kernels(layer: nn.Module, method: object, fmt: str, override: str | None = None) -> KernelPlan:
    """The kernel plan for `layer` (already in `fmt`'s kernel format, on its device)."""
    override = override or _override
    check_kernel_name(override)
    device = next(t.device for t in layer.parameters())
    if override is not None:
        if override != "torch" and override not in PRIORITY[fmt]:
            raise ValueError(f"linear_kernel={override!r} cannot run layer {layer.prefix}: it is not a {fmt} "
                             f"kernel (those are {PRIORITY[fmt]})")
        cls, reason = _refusal(override, layer, method, device, None)
        if reason:
            raise ValueError(f"linear_kernel={override!r} cannot run layer {layer.prefix}: {reason}")
        kernel = cls(layer, method)
        _log(layer, fmt, [kernel] * len(BUCKETS), {}, forced=True)
        return KernelPlan([kernel] * len(BUCKETS), [b.max_m for b in BUCKETS[:-1]])
    chosen: list[LinearKernel] = []
    built: dict[str, LinearKernel] = {}
    refused: dict[str, set[str]] = {}
    for bucket in BUCKETS:
        for name in PRIORITY[fmt]:
            cls, reason = _refusal(name, layer, method, device, bucket)
            if reason:
                refused.setdefault(f"{name}: {reason}", set()).add(bucket.name)
                continue
            if name not in built:
                built[name] = cls(layer, method)
            chosen.append(built[name])
            break
    _log(layer, fmt, chosen, refused, forced=False)
    return KernelPlan(chosen, [b.max_m for b in BUCKETS[:-1]])


def _log(layer: nn.Module, fmt: str, chosen: list[LinearKernel], refused: dict[str, set[str]], forced: bool) -> None:
    kind = re.sub(r"layers\.\d+\.", "layers.*.", layer.prefix)
    runs = ", ".join(f"{b.name} -> {k.name}" for b, k in zip(BUCKETS, chosen))
    key = (kind, fmt, runs)
    if key in _logged:
        return
    _logged.add(key)
    why = "; ".join(f"{r} [{', '.join(sorted(b))}]" for r, b in refused.items())
    logger.info("%s (%s): %s%s%s", kind, fmt, runs, " (forced by linear_kernel)" if forced else "",
                f"; refused: {why}" if why else "")
