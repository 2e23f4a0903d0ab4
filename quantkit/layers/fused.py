"""Which implementation the small per-token layers (RMSNorm, rotary, SiLU-and-mul) run: the Triton kernels of
kernels/fused_ops.py on CUDA, their own torch code elsewhere (the CPU path, and the oracle the kernels are tested
against). Chosen per call from the activation's device, so a model moved between devices follows it;
`use_fused_ops` forces one for the calls made inside it (tests run the kernels on CPU under TRITON_INTERPRET=1).
Triton is imported only when the Triton path is taken, so a CPU install never needs it."""
from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import torch

logger = logging.getLogger(__name__)
FUSED_OPS = ("torch", "triton")
_override: str | None = None
_checked: set[tuple[str, str]] = set()
_kernels: ModuleType | None = None


@contextmanager
def use_fused_ops(name: str | None) -> Iterator[None]:
    """Force `name` ('torch' | 'triton'; None: by device) for the calls inside the block."""
    global _override
    if name is not None and name not in FUSED_OPS:
        raise ValueError(f"fused ops {name!r} is not an implementation (known: {', '.join(FUSED_OPS)})")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def triton_ops(x: torch.Tensor) -> ModuleType | None:
    """kernels.fused_ops when the op on `x` runs the Triton kernels, None when it runs the torch code."""
    global _kernels
    name = _override or ("triton" if x.is_cuda else "torch")
    key = (name, x.device.type)
    if key not in _checked:
        if name == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"the Triton fused ops need a CUDA device (got {x.device}) or TRITON_INTERPRET=1")
        _checked.add(key)
        logger.info("RMSNorm / rotary / SiLU-and-mul: %s on %s%s", name, x.device.type,
                    " (forced)" if _override else "")
    if name == "torch":
        return None
    if _kernels is None:
        _kernels = importlib.import_module("quantkit.kernels.fused_ops")
    return _kernels
