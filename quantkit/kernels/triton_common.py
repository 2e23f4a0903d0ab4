"""What the Triton kernels share: the dot operand dtype, the device's multiprocessor count, and launch configs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import triton.language as tl

_DOT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_dtype(dtype: torch.dtype):
    """The dtype tl.dot multiplies in for activations of `dtype`. Under TRITON_INTERPRET the interpreter multiplies
    bf16 operands as their uint16 bit patterns (triton 3.9's create_dot), so interpreted runs use fp32 operands."""
    if dtype not in _DOT:
        raise ValueError(f"activations must be float16, bfloat16 or float32, got {dtype}")
    return tl.float32 if interpreting() else _DOT[dtype]


@cache
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough to exercise every code path
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class TileConfig:
    """One launch: tile sizes, K split (1 = none), warps and pipeline stages."""
    bm: int
    bn: int
    bk: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3


def split_for(tiles: int, k_tiles: int, device: torch.device, min_k_tiles: int = 2) -> int:
    """A K split that brings `tiles` output tiles to about two waves, keeping >= min_k_tiles K tiles per split."""
    want = max(1, (2 * num_sms(device)) // max(tiles, 1))
    return max(1, min(want, k_tiles // min_k_tiles))


def check_2d(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] -> a [M, K] view with unit stride along K."""
    if x.shape[-1] != k:
        raise ValueError(f"activation has {x.shape[-1]} input features, the layer expects {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()
