"""The linear-kernel contract. A quant method's kernel format (quant/wna16.py, quant/w8a8.py, quant/nf4.py) can be
multiplied by several kernels; each says whether it can serve a layer on a device and for which batch-size
buckets selection offers it, takes what it needs from the layer once at load, and then only multiplies. The torch
reference (the method's own `reference_apply`) can serve everything and is always last.

Buckets: the best kernel depends on M (tokens in the call). A layer holds one kernel per bucket; `KernelPlan`
dispatches on M with one comparison per bucket."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

# (name, largest M in the bucket); the last bucket is open-ended.
M_BUCKETS: tuple[tuple[str, int | None], ...] = (("m<=8", 8), ("m<=16", 16), ("m<=32", 32), ("m<=64", 64),
                                                  ("m<=256", 256), ("m<=1024", 1024), ("m>1024", None))


@dataclass(frozen=True)
class Bucket:
    name: str
    max_m: int | None  # None: unbounded


BUCKETS = tuple(Bucket(n, m) for n, m in M_BUCKETS)


class LinearKernel:
    """One way to multiply by a kernel-format weight. Subclasses set `name` and `format` and implement the three
    steps; `__init__` is the load-time step (derive tensors, never modify the layer's kernel format)."""
    name: ClassVar[str]
    format: ClassVar[str]  # "wna16" | "w8a8" | "nf4"
    # Takes a quant.w8a8.QuantizedActivation (codes a fused op made) in place of float activations.
    accepts_quantized_input: ClassVar[bool] = False
    # Selection offers the kernel the buckets whose largest M lies in (M_RANGE[0], M_RANGE[1]] (None: unbounded),
    # where it measured fastest (benchmarks/results/linear_kernels.json); M_RANGE_WHY says why not elsewhere.
    # Forced (linear_kernel=...), a kernel serves any M.
    M_RANGE: ClassVar[tuple[int, int | None]] = (0, None)
    M_RANGE_WHY: ClassVar[str] = ""

    @classmethod
    def bucket_refusal(cls, bucket: Bucket) -> str:
        """Why selection does not offer the kernel `bucket` ("" when it does)."""
        low, high = cls.M_RANGE
        top = bucket.max_m
        if (top is None or top > low) and (high is None or (top is not None and top <= high)):
            return ""
        span = f"M > {low}" if high is None else f"M <= {high}" if low == 0 else f"{low} < M <= {high}"
        return f"chosen for {span}" + (f" ({cls.M_RANGE_WHY})" if cls.M_RANGE_WHY else "")

    @classmethod
    def can_implement(cls, layer: nn.Module, method: object, device: torch.device) -> tuple[bool, str]:
        """(ok, reason refused): whether the kernel can run the layer on the device at all (any M)."""
        raise NotImplementedError

    def __init__(self, layer: nn.Module, method: object) -> None:
        self.method = method

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def quantizes_inside(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether float activations of `rows` rows cost this kernel no quantization pass of its own (so the op
        before the layer should not quantize them for it: quant/w8a8.py, input_quant_for)."""
        return False

    def resident_tensors(self) -> list[torch.Tensor]:
        """The tensors the kernel keeps (its attributes and those of its plain-object attributes), so that a
        layer's memory counts what its kernels derived at load (e.g. the GEMM's reordered weight)."""
        found = []
        for value in vars(self).values():
            found += [value] if isinstance(value, torch.Tensor) else \
                [v for v in getattr(value, "__dict__", {}).values() if isinstance(v, torch.Tensor)]
        return found


class TorchReferenceKernel(LinearKernel):
    """The method's plain-torch path: any device, any shape, the oracle of every other kernel."""
    name = "torch"
    format = "any"
    accepts_quantized_input = True  # every method's reference_apply takes what its apply takes

    @classmethod
    def can_implement(cls, layer, method, device):
        return True, ""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.method.reference_apply(layer, x, bias)


class KernelPlan:
    """The kernels one layer runs: `kernels[i]` serves M <= `bounds[i]` (the last serves the rest)."""

    def __init__(self, kernels: list[LinearKernel], bounds: list[int]) -> None:
        self.kernels, self.bounds = kernels, bounds
        self.single = kernels[0] if all(k is kernels[0] for k in kernels) else None

    def kernel_for(self, m: int) -> LinearKernel:
        """The kernel that serves M = m."""
        for bound, kernel in zip(self.bounds, self.kernels):
            if m <= bound:
                return kernel
        return self.kernels[-1]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kernel = self.single or self.kernel_for(x.numel() // x.shape[-1])
        return kernel.apply(layer, x, bias)

    def names(self) -> list[str]:
        return [k.name for k in self.kernels]

    def resident_tensors(self) -> list[torch.Tensor]:
        return [t for k in {id(k): k for k in self.kernels}.values() for t in k.resident_tensors()]
