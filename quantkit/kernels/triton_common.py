"""What the Triton kernels share: the dot operand dtype, the device's multiprocessor count, and launch configs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch
import triton
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


_WORKSPACES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []  # grown-out buffers stay alive for graphs captured on them


def splitk_workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero-filled fp32 partial-sum buffer and int32 tile counters that the split-K kernels share on `device`.
    A split-K launch adds its partials into the buffer, and the last program of each output tile reads the sum
    and zeroes what it used, so the buffer is zero again between launches: no memset and no cast kernel per
    call (calls on one device must not overlap, i.e. one stream). Kernels size it at load (`__init__`), never
    inside a CUDA-graph capture; a grown buffer replaces the old one for later launches."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < floats or cnt.numel() < counters:
        if ws is not None:
            _RETIRED.append((ws, cnt))
        floats, counters = max(floats, 2 ** 20, 2 * _numel(ws)), max(counters, 2 ** 14, 2 * _numel(cnt))
        ws = torch.zeros(floats, dtype=torch.float32, device=device)
        cnt = torch.zeros(counters, dtype=torch.int32, device=device)
        _WORKSPACES[device] = ws, cnt
    return ws, cnt


def _numel(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel()


@triton.jit
def round_to(v, dtype: tl.constexpr):
    """fp32 -> `dtype`, rounded to nearest even as an eager cast rounds. 16-bit dtypes round in integer arithmetic
    first, so the cast back to fp32 that callers do next cannot undo it: on an H100 (triton 3.6) the compiler folded
    float16 casts down and back up away, so 14% of the fused rotary's float16 outputs lost the reference's
    intermediate rounding; and the interpreter's fp32 -> bf16 cast truncates."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:  # 11 significant bits; below 2^-14 (subnormal) a multiple of 2^-24
        bits = v.to(tl.uint32, bitcast=True)
        normal = (((bits + 0xFFF + ((bits >> 13) & 1)) >> 13) << 13).to(tl.float32, bitcast=True)
        v = tl.where(tl.abs(v) < 6.103515625e-05, (v + 0.75) - 0.75, normal)
    return v.to(dtype)


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped launch order: GROUP_M row tiles share each weight column tile
    while it is in L2."""
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * tl.cdiv(N, BN)
    first_m = (pid // per_group) * GROUP_M
    rows = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def store_split_tile(acc, out_ptrs, ws_ptrs, cnt_ptr, mask, n_split, SPLIT: tl.constexpr):
    """Writes an fp32 output tile. With SPLIT, `acc` is one K slice's partial: it is added into the workspace,
    and the program that arrives last at the tile's counter takes the sum (zeroing the workspace and the counter
    for the next launch) and writes it in the output dtype. The barrier plus the acq_rel counter make every
    thread's partial visible before the count (the CUTLASS serial split-K semaphore pattern)."""
    if not SPLIT:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        if arrived == n_split - 1:
            bits = tl.atomic_xchg(ws_ptrs.to(tl.pointer_type(tl.int32)), tl.zeros_like(acc).to(tl.int32),
                                  mask=mask, sem="relaxed")  # as int32: the interpreter exchanges no floats
            total = bits.to(tl.float32, bitcast=True)
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
