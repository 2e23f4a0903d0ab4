"""bitsandbytes 4-bit blob format in plain torch (no bitsandbytes at run time): code tables, the blockwise
4-bit quantizer with double quantization of the absmax, dequantization, and the packed quant_state JSON.

A blob is one weight [N, K] flattened row-major (n = N*K elements) and cut into blocks of `blocksize`
(the last block may be partial):
    packed   uint8 [ceil(n/2)]          element 2i in the HIGH nibble, 2i+1 in the low nibble (odd n: low pad 0)
    absmax   float32 [ceil(n/blocksize)]                 (plain)
             uint8   [ceil(n/blocksize)] codes into `nested_code` (double quant), with
    nested_absmax float32 [ceil(nblocks/nested_blocksize)], nested_code float32 [256], offset (a float32 scalar):
             absmax[j] = nested_code[codes[j]] * nested_absmax[j // nested_blocksize] + offset
    w[e] = code4[q[e]] * absmax[e // blocksize]          (fp32 arithmetic, as bitsandbytes computes it)
Dequantization and the 4-bit codes, absmax, nested absmax, offset and maps match bitsandbytes' CPU path bit for
bit (tested against bitsandbytes.functional). The 8-bit absmax codes of double quant are the exact nearest map
entries; bitsandbytes' CPU kernel picks the other neighbour for ~0.2% of them (values within ~1e-5 of a
midpoint), so those codes may differ by one step there."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import torch

NF4_TABLE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0)
# Bit-pattern order (sign, 2 exponent bits, 1 mantissa bit), normalised by the largest magnitude (12).
FP4_TABLE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256


@cache
def code4(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry float32 table for 'nf4' or 'fp4', indexed by the 4-bit code."""
    table = torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE, dtype=torch.float32)
    return (table / table.abs().max()).to(device)


@cache
def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (float32 [256], sorted; entry 0 is -0.99297), the
    nested_quant_map it serialises and dequantizes with."""
    data: list[float] = []
    for i in range(7):  # 7 exponent bits at most: 10^-6 ... 10^0, each with 2^i fraction steps
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist() + ((-(10 ** (i - 6))) * means).tolist()  # float32 products
    data += [0.0, 1.0]
    return torch.tensor(sorted(data + [0.0] * (256 - len(data))), dtype=torch.float32)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 [n] -> (codes uint8 [n], absmax float32 [ceil(n/blocksize)]). Nearest entry of the sorted
    `code` to x / absmax; a tie goes to the lower entry (bitsandbytes' binary search + distance check, which
    searches with entry 0 set to -1.0 so that x / absmax = -1 is in range)."""
    code = torch.cat((code.new_full((1,), -1.0), code[1:]))
    n = x.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax[:, None]).reshape(-1)[:n]
    normed = torch.nan_to_num(normed, nan=-1.0)  # an all-zero block (0/0): bitsandbytes stores code 0
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, code.numel() - 2)
    go_right = (normed - code[left + 1]).abs() < (normed - code[left]).abs()
    return (left + go_right.long()).to(torch.uint8), absmax


@dataclass
class Blob4:
    """One quantized weight in bitsandbytes' layout (see the module docstring for shapes and dtypes)."""
    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, int]
    quant_type: str
    blocksize: int
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_fp32(self) -> torch.Tensor:
        """float32 [nblocks], the two-level absmax resolved exactly as bitsandbytes does."""
        if not self.double_quant:
            return self.absmax
        scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        return resolve_absmax(self.absmax, self.nested_code, scale, torch.tensor(self.offset, dtype=torch.float32))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> [N, K] in `dtype`."""
        n = self.shape[0] * self.shape[1]
        w = dequantize_flat(self.packed, self.absmax_fp32(), self.quant_type, self.blocksize, n, dtype)
        return w.view(self.shape)


def resolve_absmax(codes: torch.Tensor, nested_code: torch.Tensor, nested_scale: torch.Tensor,
                   offset: torch.Tensor) -> torch.Tensor:
    """Double quant: codes uint8 [nb], nested_code float32 [256], nested_scale / offset float32 [nb] (or
    broadcastable) -> absmax float32 [nb] = nested_code[codes] * nested_scale + offset (two fp32 roundings,
    multiply then add: no FMA, as bitsandbytes)."""
    return nested_code[codes.long()] * nested_scale + offset


def dequantize_flat(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, n: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 (any shape, ceil(n/2) bytes), absmax float32 [ceil(n/blocksize)] -> [n] in `dtype`,
    computed as code4[q] * absmax in float32 and then cast."""
    values = torch.nn.functional.embedding(packed.reshape(-1).int(), code_pairs(quant_type, packed.device))
    values = values.view(-1)[:n]
    if n % blocksize == 0:
        return (values.view(-1, blocksize) * absmax.reshape(-1, 1)).view(-1).to(dtype)
    return (values * absmax.reshape(-1).repeat_interleave(blocksize)[:n]).to(dtype)


@cache
def code_pairs(quant_type: str, device: torch.device) -> torch.Tensor:
    """float32 [256, 2]: the two values a packed byte holds, (code4[byte >> 4], code4[byte & 15])."""
    byte = torch.arange(256, device=device)
    return torch.stack((code4(quant_type, device)[byte >> 4], code4(quant_type, device)[byte & 15]), dim=1)


def quantize_4bit(w: torch.Tensor, quant_type: str, blocksize: int = 64, double_quant: bool = True) -> Blob4:
    """w [N, K] (any float dtype) -> Blob4, as bitsandbytes.functional.quantize_4bit(w, blocksize,
    compress_statistics=double_quant, quant_type) on CPU (see the module docstring for the one difference)."""
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    scaled = (head * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < n:  # bitsandbytes divides the partial last block (and stores its clamped absmax)
        tail_max = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat((absmax, tail_max[None]))
        scaled = torch.cat((scaled, flat[full:] / tail_max))
    scaled = torch.nn.functional.pad(scaled.clamp_(-1, 1), (0, n % 2))  # odd n: the pad nibble codes 0.0
    table = code4(quant_type, w.device)
    order = torch.argsort(table)  # NF4 is sorted; FP4 codes are in bit-pattern order
    midpoints = (table[order[:-1]] + table[order[1:]]) / 2
    q = torch.bucketize(scaled, midpoints, out_int32=True)
    q = (q if quant_type == "nf4" else order.int()[q]).to(torch.uint8)
    blob = Blob4((q[0::2] << 4) | q[1::2], absmax, (w.shape[0], w.shape[1]), quant_type, blocksize)
    if double_quant:
        offset = absmax.mean()
        blob.nested_code = dynamic_code().to(w.device)
        blob.absmax, blob.nested_absmax = quantize_blockwise_8bit(absmax - offset, blob.nested_code,
                                                                  NESTED_BLOCKSIZE)
        blob.offset = offset.item()
    return blob


def parse_quant_state(raw: torch.Tensor, where: str) -> dict:
    """The uint8 [L] UTF-8 JSON tensor `*.weight.quant_state.bitsandbytes__<type>` -> dict. ValueError naming
    `where` when it is not valid JSON or lacks a key."""
    try:
        state = json.loads(bytes(raw.to(torch.uint8).cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: quant_state is not valid JSON ({e})") from e
    missing = [k for k in ("quant_type", "blocksize", "shape") if k not in state]
    if missing:
        raise ValueError(f"{where}: quant_state lacks {missing}")
    return state
