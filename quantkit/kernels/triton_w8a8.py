"""W8A8 kernels for quant/w8a8.py's kernel format (weight [N, K] FP8 E4M3 or INT8, weight_scale [N, 1] fp32,
optional static input_scale), FP8 and INT8 alike:

- `quantize_per_token`: one program per row; the row's amax (or the static scale), then codes, in one launch
  (dynamic scales on Hopper: csrc/row_quant.cu, a row over a thread-block cluster, kernels/cuda_row_quant.py).
- `scaled_gemm8`: 8-bit tensor-core GEMM, int32 (INT8) or fp32 (FP8) accumulation, with per-token x
  per-channel scales and the bias applied in the epilogue; serial split-K at small M (the slices meet in the
  shared zero-filled workspace, the last one writes the output: one launch, no memset or cast kernel). At M = 1
  it takes the 16-bit row itself: each program computes the row's scale and quantizes the K slice it multiplies,
  so the activation quant costs no launch of its own (a separate one was 2-5 us of a 12-30 us call on an H100).
- FP8 at large M: the same quant kernel, then torch._scaled_mm (cuBLASLt) with row-wise scales and the bias.
- A QuantizedActivation input (RMSNorm or SiLU-and-mul already quantized it, kernels/fused_ops.py, with the
  `dynamic_scale`/`quantize_codes` steps below) skips the quant kernel.

The arithmetic follows the torch reference (W8A8LinearMethod.reference_apply): scale = max(amax / qmax, 1e-12),
codes = x / scale rounded (INT8: half to even, clamped to [-128, 127]; FP8: saturated to +-448, cast RNE)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import nn
from triton.language.extra import libdevice

from quantkit.kernels import cuda_row_quant
from quantkit.kernels.base import LinearKernel
from quantkit.kernels.pdl import launch_args, wait_for_inputs
from quantkit.kernels.triton_common import (TileConfig, check_2d, grouped_tile, interpreting, split_for,
                                            splitk_workspace, store_split_tile)
from quantkit.quant.w8a8 import FP8, INT8, QuantizedActivation

_MIN_SCALE = 1e-12
FUSED_QUANT_MAX_K = 16384  # M = 1 rows up to this long are quantized inside the GEMM (one load per program)
# The interpreter's fp8 cast mis-rounds and it has no libdevice.rint: it rounds in software, a GPU in hardware.
_SOFT_ROUNDING = tl.constexpr(interpreting())


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    return tl.where((r - v == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)


@triton.jit
def _round_e4m3(y):
    """fp32 in [-448, 448] -> the nearest E4M3 value (ties to even), still fp32, so the final cast is exact
    whatever rounding the conversion uses (the interpreter's fp8 cast mis-rounds)."""
    exponent = tl.maximum(((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127, -6)  # subnormals share 2^-6's step
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    return _round_half_even(y / step) * step


@triton.jit
def dynamic_scale(amax, QMAX: tl.constexpr):
    """The per-token scale from the row's fp32 amax, as quantize_dynamic computes it."""
    return tl.maximum(tl.div_rn(amax, QMAX), 1e-12)


@triton.jit
def quantize_codes(x, scale, QMAX: tl.constexpr, QMIN: tl.constexpr, IS_INT: tl.constexpr):
    """fp32 x / scale -> the code values as W8Type.quantize makes them, in fp32: INT8 codes exact; FP8 codes exact
    under the interpreter and on a GPU left to the store's cast, which rounds to nearest even in hardware
    (cvt.rn.satfinite, sm_89+). The software rounding cost the SiLU-and-mul+FP8 kernel a quarter of its bandwidth on
    an H100 (0.61-0.65 of copy against 0.85-0.89). INT8 codes likewise round by rint on a GPU."""
    y = tl.div_rn(x, scale)
    if IS_INT:
        if _SOFT_ROUNDING:
            y = _round_half_even(y)
        else:
            y = libdevice.rint(y)  # one cvt.rni (half to even)
        return tl.minimum(tl.maximum(y, QMIN), QMAX)
    y = tl.minimum(tl.maximum(y, QMIN), QMAX)
    if _SOFT_ROUNDING:
        y = _round_e4m3(y)
    return y


@triton.jit
def _quant_per_token(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, QMAX: tl.constexpr, QMIN: tl.constexpr,
                     IS_INT: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The row's first BLOCK values are read once and kept for both passes (a whole row up to 16K: at M = 1 the
    passes' load latencies are the kernel's time)."""
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_xm
    rk = tl.arange(0, BLOCK)
    head = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.abs(head)
        for k0 in range(BLOCK, K, BLOCK):
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)))
        scale = dynamic_scale(tl.max(amax, axis=0), QMAX)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * K + rk, quantize_codes(head, scale, QMAX, QMIN, IS_INT).to(q_ptr.dtype.element_ty),
             mask=rk < K)
    for k0 in range(BLOCK, K, BLOCK):
        y = quantize_codes(tl.load(x_row + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32), scale, QMAX, QMIN,
                           IS_INT)
        tl.store(q_ptr + row * K + k0 + rk, y.to(q_ptr.dtype.element_ty), mask=k0 + rk < K)


@triton.jit
def _scaled_gemm8(a_ptr, b_ptr, as_ptr, bs_ptr, bias_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, stride_om,
                  k_per_split, n_split, IS_INT: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                  QUANT_ROW: tl.constexpr, QMAX: tl.constexpr, QMIN: tl.constexpr, PDL: tl.constexpr):
    """QUANT_ROW > 0 (M = 1): a_ptr is the 16-bit row, QUANT_ROW its length rounded up to a power of two."""
    wait_for_inputs(PDL)
    pid_k = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.int32 if IS_INT else tl.float32)
    if QUANT_ROW:
        rq = tl.arange(0, QUANT_ROW)
        row_scale = dynamic_scale(tl.max(tl.abs(tl.load(a_ptr + rq, mask=rq < K, other=0.0).to(tl.float32)), 0),
                                  QMAX)
    k_start = pid_k * k_per_split
    k_stop = min(K, k_start + k_per_split)
    for k0 in range(k_start, k_stop, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        if QUANT_ROW:  # the row's codes as tile row 0 of the dot's 16
            codes = quantize_codes(tl.load(a_ptr + rk, mask=k_ok, other=0.0).to(tl.float32), row_scale, QMAX, QMIN,
                                   IS_INT)
            a = tl.where((rm == 0)[:, None], codes[None, :], 0.0).to(b_ptr.dtype.element_ty)
        else:
            a = tl.load(a_ptr + rm[:, None] * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + rk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32 if IS_INT else tl.float32)
    if QUANT_ROW:
        a_s = tl.zeros([BM], tl.float32) + row_scale
    else:
        a_s = tl.load(as_ptr + rm, mask=m_ok, other=0.0)
    b_s = tl.load(bs_ptr + rn, mask=n_ok, other=0.0)
    y = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    store_split_tile(y, out_ptr + rm[:, None] * stride_om + rn[None, :], ws_ptr + rm[:, None] * N + rn[None, :],
                     cnt_ptr + tl.program_id(0), m_ok[:, None] & n_ok[None, :], n_split, SPLIT)


def quantize_per_token(x: torch.Tensor, qdtype: torch.dtype, static_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (unit stride along K) -> (codes [M, K] of qdtype, fp32 scales [M, 1])."""
    m, k = x.shape
    is_int = not qdtype.is_floating_point
    qmax, qmin = _code_range(qdtype)
    q = torch.empty((m, k), dtype=qdtype, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if static_scale is None and cuda_row_quant.serves(x, k):
        cuda_row_quant.quantize_rows(x, q, s, silu_mul=False)
        return q, s
    block = min(16384, triton.next_power_of_2(k))
    _quant_per_token[(m,)](x, q, s, static_scale if static_scale is not None else s, k, x.stride(0), QMAX=qmax,
                           QMIN=qmin, IS_INT=is_int, STATIC=static_scale is not None, BLOCK=block,
                           num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16, **launch_args(x.device, m))
    return q, s


def quantizable_rows(m: int, k: int, dtype: torch.dtype) -> bool:
    """Whether [m, k] activations are a row the GEMM can quantize itself: one 16-bit row of K <= FUSED_QUANT_MAX_K."""
    return m == 1 and k <= FUSED_QUANT_MAX_K and dtype in (torch.bfloat16, torch.float16)


def _code_range(qdtype: torch.dtype) -> tuple[float, float]:
    qtype = FP8 if qdtype.is_floating_point else INT8
    return qtype.qmax, qtype.qmin


def default_config(m: int, n: int, k: int, device: torch.device, split: bool) -> TileConfig:
    if m <= 16:  # `benchmarks/linear_kernels.py --tune --formats fp8` on an H100 (linear_kernels_tune_w8a8_h100.json)
        cfg = TileConfig(16, 64, 256, warps=4, stages=3)
    elif m <= 64:
        cfg = TileConfig(64, 64, 128, warps=8, stages=3)
    elif m <= 256:
        cfg = TileConfig(64, 128, 64, warps=4, stages=3)
    else:
        cfg = TileConfig(128, 128, 128, warps=8, stages=3)
    if not split:
        return cfg
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    return TileConfig(cfg.bm, cfg.bn, cfg.bk, split_for(tiles, triton.cdiv(k, cfg.bk), device), cfg.warps,
                      cfg.stages)


def scaled_gemm8(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype, split: bool = False,
                 config: TileConfig | None = None) -> torch.Tensor:
    """a [M, K] and b [N, K] 8-bit codes (both contiguous), a_scale [M, 1], b_scale [N, 1] fp32 ->
    (a @ b^T) * a_scale * b_scale^T (+ bias), [M, N] in out_dtype. With a_scale None, a is one 16-bit row
    (K <= FUSED_QUANT_MAX_K) that the kernel quantizes per token to b's dtype, as quantize_per_token would."""
    m, k = a.shape
    n = b.shape[0]
    quant_row = 0
    if a_scale is None:
        if not quantizable_rows(m, k, a.dtype):
            raise ValueError(f"quantizing inside the GEMM takes one 16-bit row of K <= {FUSED_QUANT_MAX_K}, got "
                             f"{tuple(a.shape)} {a.dtype}")
        quant_row = triton.next_power_of_2(k)
    elif a.dtype != b.dtype:
        raise ValueError(f"codes {a.dtype} and weight {b.dtype} must share the dtype")
    if b.shape[1] != k:
        raise ValueError(f"operands [M, K] {tuple(a.shape)} and [N, K] {tuple(b.shape)} must share K")
    qmax, qmin = _code_range(b.dtype)
    cfg = config or default_config(m, n, k, a.device, split)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.bk), cfg.split_k) * cfg.bk
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn), split_k)
    ws, cnt = splitk_workspace(a.device, m * n, grid[0]) if split_k > 1 else (out, out)
    _scaled_gemm8[grid](a, b, b_scale if a_scale is None else a_scale, b_scale,
                        b_scale if bias is None else bias, out, ws, cnt, m, n, k, out.stride(0), k_per_split, split_k,
                        IS_INT=not b.dtype.is_floating_point, HAS_BIAS=bias is not None, SPLIT=split_k > 1,
                        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=8, QUANT_ROW=quant_row, QMAX=qmax, QMIN=qmin,
                        num_warps=cfg.warps, num_stages=cfg.stages, **launch_args(a.device, m))
    return out


class _W8A8Kernel(LinearKernel):
    format = "w8a8"
    min_capability = (8, 0)
    split = False
    accepts_quantized_input = True  # activations come through `quantize`, which passes a QuantizedActivation on

    @classmethod
    def can_implement(cls, layer: nn.Module, method, device: torch.device):
        s = method.scheme
        if method.weight_only:
            return False, "weight-only (activations stay 16-bit on this device)"
        if s.weight_strategy == "block":
            return False, "block-scaled FP8 weights (per-token-group activations) are not handled"
        capability = (8, 9) if s.qtype.dtype.is_floating_point else cls.min_capability
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < capability:
            return False, f"needs compute capability >= {capability[0]}.{capability[1]}"
        return True, ""

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        self.qdtype = method.scheme.qtype.dtype
        self.input_size = layer.input_size
        self.w_scale = layer.weight_scale.reshape(-1, 1).float().contiguous()

    def quantize(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [M, K], fp32 scales [M, 1]): the fused op's when it already quantized x, else this kernel's."""
        if isinstance(x, QuantizedActivation):
            q, scale = self.method.quantized_input(layer, x)
            return q.contiguous(), scale.contiguous()
        x2 = check_2d(x, layer.input_size)
        return quantize_per_token(x2, self.qdtype, layer.input_scale if self.method.scheme.static_input else None)

    def quantizes_inside(self, rows: int, dtype: torch.dtype) -> bool:
        """Whether float activations of `rows` rows cost no quant pass of their own: one dynamic-scale 16-bit row,
        which the GEMM quantizes itself."""
        return not self.method.scheme.static_input and quantizable_rows(rows, self.input_size, dtype)

    def matmul(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None,
               config: TileConfig | None = None) -> torch.Tensor:
        """The Triton 8-bit GEMM with this kernel's split choice, [M, N]; `config` overrides the launch (tuning)."""
        floats = not isinstance(x, QuantizedActivation)
        if floats and self.quantizes_inside(x.numel() // x.shape[-1], x.dtype):
            return scaled_gemm8(check_2d(x, layer.input_size), layer.weight, None, self.w_scale, bias, x.dtype,
                                split=self.split, config=config)
        x_q, x_s = self.quantize(layer, x)
        return scaled_gemm8(x_q, layer.weight, x_s, self.w_scale, bias, x.dtype, split=self.split, config=config)

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        return self.matmul(layer, x, bias).view(*x.shape[:-1], -1)


class TritonW8A8(_W8A8Kernel):
    """Fused per-token activation quant, then the Triton 8-bit GEMM with the scales and bias in its epilogue."""
    name = "triton_w8a8"


class TritonW8A8SplitK(TritonW8A8):
    name = "triton_w8a8_splitk"
    split = True

    M_RANGE, M_RANGE_WHY = (0, 64), "split-K only pays at small M"

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        n = layer.weight.shape[0]  # sized here, never inside a graph capture: 64 rows, tiles of >= 16 x 64
        splitk_workspace(layer.weight.device, 64 * n, 4 * triton.cdiv(n, 64))


class ScaledMMFP8(_W8A8Kernel):
    """FP8 at large M: fused quant, then cuBLASLt through torch._scaled_mm with row-wise scales."""
    name = "scaled_mm_fp8"

    M_RANGE, M_RANGE_WHY = (64, None), "cuBLASLt leaves half the weight-byte saving unused at small M"

    @classmethod
    def can_implement(cls, layer, method, device):
        if not method.scheme.qtype.dtype.is_floating_point:
            return False, "FP8 only"
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
            return False, "row-wise scaled _scaled_mm needs compute capability >= 9.0"
        if layer.input_size % 16 or layer.output_size % 16:
            return False, "cuBLASLt FP8 needs K and N multiples of 16"
        return super().can_implement(layer, method, device)

    def __init__(self, layer: nn.Module, method) -> None:
        super().__init__(layer, method)
        self.w_scale_row = self.w_scale.reshape(1, -1).contiguous()

    def quantizes_inside(self, rows: int, dtype: torch.dtype) -> bool:
        return dtype != torch.bfloat16 and super().quantizes_inside(rows, dtype)  # bf16 runs its own pass

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.bfloat16:  # row-wise scaling writes bf16 only
            return super().apply(layer, x, bias)
        x_q, x_s = self.quantize(layer, x)
        out = torch._scaled_mm(x_q, layer.weight.t(), scale_a=x_s, scale_b=self.w_scale_row,
                               bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16)
        return out.view(*x.shape[:-1], -1)
