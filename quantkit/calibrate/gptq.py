"""GPTQ (Frantar et al.) for one Linear at a time, AutoGPTQ-compatible conventions (FORMATS.md §1).

Shapes: W [N, K] (out x in features), calibration inputs X [..., K], Hessian H [K, K], G = group size
(K when -1), NG = ceil(K / G). The quantizer is primitives.minmax_qparams / quantize (the GPTQ quantizer).

Blocks: with groups found on the fly, the lazy-update block (default 128) is rounded to a multiple of G so that no
group straddles a block; a group's qparams are then taken from its fully error-updated columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.quant.primitives import SUPPORTED_BITS, minmax_qparams, quantize


@dataclass(frozen=True)
class GPTQConfig:
    """damp_auto_increment: added to damp_percent after each failed Cholesky (GPTQModel's rule), while < 1."""
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.0025
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 (per-channel) or positive, got {self.group_size!r}")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp_percent must lie in (0, 1), got {self.damp_percent!r}")
        if self.damp_auto_increment < 0:
            raise ValueError(f"damp_auto_increment must be >= 0, got {self.damp_auto_increment!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size!r}")


@dataclass
class GPTQResult:
    """What a GPTQ writer needs; W_hat[n, k] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n]).
    codes [N, K] int32 in original K order, scales [NG, N] float32, zeros [NG, N] int32 (true zero codes, no v1
    "-1"), g_idx [K] int32, weight [N, K] float32 = W_hat (what the error feedback assumed), damp_percent used."""
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    weight: torch.Tensor
    damp_percent: float


class HessianAccumulator:
    """H = 2/n * sum_t x_t x_t^T over all n calibration tokens seen, kept as a running mean in fp32 (AutoGPTQ's
    add_batch, counting tokens) so batches stream without storing activations."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., K], the Linear's input for one calibration batch."""
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float32)
        n = x.shape[0]
        self.hessian *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = x * (2 / self.nsamples) ** 0.5
        self.hessian += x.T @ x


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """codes [N, K], scales/zeros [NG, N], g_idx [K] -> float32 W [N, K] (FORMATS §1 dequantization)."""
    g = g_idx.long()
    return scales.float()[g].T * (codes.float() - zeros.float()[g].T)


def inverse_hessian_cholesky(hessian: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 [K, K] and the damp_percent that worked,
    retrying with more damping while Cholesky fails."""
    if not torch.isfinite(hessian).all():
        raise ValueError("the Hessian holds NaN or inf (non-finite calibration activations)")
    mean_diag = torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    damp, tried = config.damp_percent, []
    while damp < 1 and damp not in tried:
        tried.append(damp)
        try:
            lower = torch.linalg.cholesky(hessian + damp * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True), damp
        except torch.linalg.LinAlgError:
            damp = round(config.damp_percent + len(tried) * config.damp_auto_increment, 10)
    raise ValueError(f"GPTQ: the Hessian is not positive definite even with damping; tried damp_percent "
                     f"{tried[0]:g} to {tried[-1]:g} ({len(tried)} tries)")


def _group_params(w: torch.Tensor, config: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams of the columns w [N, g] as one group: (scale [N], zero [N])."""
    scales, zeros = minmax_qparams(w, config.bits, -1, config.sym)
    return scales[:, 0], zeros[:, 0]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig) -> GPTQResult:
    """GPTQ of weight [N, K] given the Hessian [K, K] of its inputs (neither is modified)."""
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {k}")
    g = k if config.group_size == -1 else config.group_size
    ng = -(-k // g)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    # fixed qparams: per-channel, or static groups on the original column order (before any permutation)
    fixed = [_group_params(w[:, j * g:(j + 1) * g], config) for j in range(ng)] \
        if config.static_groups or config.group_size == -1 else None
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if config.desc_act \
        else torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv, damp = inverse_hessian_cholesky(h, config)

    codes = torch.zeros(n, k, dtype=torch.int32, device=w.device)
    q = torch.zeros_like(w)
    params: list[tuple[torch.Tensor, torch.Tensor] | None] = list(fixed) if fixed else [None] * ng
    block = config.block_size if fixed else max(config.block_size // g, 1) * g
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = i1 + i
            if fixed is None and col % g == 0:
                params[col // g] = _group_params(w1[:, i:i + g], config)
            scale, zero = params[int(perm[col]) // g if fixed else col // g]
            code = quantize(w1[:, i:i + 1], scale[:, None], zero[:, None], config.bits, -1)[:, 0]
            codes[:, col] = code
            q[:, col] = scale * (code.float() - zero.float())
            err1[:, i] = (w1[:, i] - q[:, col]) / hinv1[i, i]
            w1[:, i:] -= err1[:, i:i + 1] @ hinv1[i:i + 1, i:]
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    if fixed:
        g_idx = torch.arange(k, device=w.device) // g
    else:
        g_idx = inv // g  # column k was quantized at position inv[k] of the (act-order) sequence
    scales = torch.stack([p[0] for p in params])
    zeros = torch.stack([p[1] for p in params])
    return GPTQResult(codes[:, inv], scales, zeros, g_idx.to(torch.int32), q[:, inv], damp)
