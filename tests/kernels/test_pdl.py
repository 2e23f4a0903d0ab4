"""Programmatic dependent launch (kernels/pdl.py): a chain of kernels that each read the one before, captured in a
CUDA graph with PDL on, gives what the same chain gives launched plainly (up to the order split-K partials meet
in); off the GPU (and under the interpreter) nothing is launched with it."""
from __future__ import annotations

import pytest
import torch

from quantkit.kernels import cuda_ext, pdl
from quantkit.kernels.fused_ops import rms_norm, silu_and_mul
from quantkit.kernels.select import kernel_class
from quantkit.quant.w8a8 import FP8
from tests.kernels.conftest import DEVICE, assert_workspace_clean, capture, gpu, nf4_layer, w8a8_layer, wna16_layer

bf16 = torch.bfloat16


def test_off_the_gpu_nothing_launches_with_pdl():
    assert pdl.launch_args(torch.device("cpu"), 1) == {"PDL": False}
    assert not pdl.enabled(torch.device("cpu"))


@pytest.fixture
def pdl_restored():
    yield
    pdl.set_enabled(True)


@gpu
@pytest.mark.parametrize("m", [1, 12, 40])
def test_a_captured_chain_with_pdl_matches_plain_launches(m, gen, pdl_restored):
    """norm (+ FP8 codes) -> W8A8 -> norm -> W4 (act-order) -> SiLU-and-mul -> NF4 -> torch add -> W4: every kernel
    reads its predecessor's output and splits K through the shared workspace, so a kernel that read or wrote before
    its wait would show as a difference between the PDL graph and plain launches (beyond the order in which split-K
    partials meet, which is not fixed either way)."""
    if torch.cuda.get_device_capability(DEVICE) < (9, 0):
        pytest.skip("PDL needs sm_90+")
    cuda_ext.load()
    hidden, inter = 1536, 2048
    norm_w = torch.randn(hidden, generator=gen).to(bf16).to(DEVICE)
    fp8 = w8a8_layer(hidden, hidden, True, False, bf16, bias=False, gen=gen)
    w4_act = wna16_layer(hidden, 2 * inter, 4, 128, False, True, bf16, bias=True, gen=gen)
    nf4 = nf4_layer(inter, [hidden], "nf4", True, bf16, bias=False, gen=gen)
    w4 = wna16_layer(hidden, hidden, 4, 128, True, False, bf16, bias=False, gen=gen)
    m_name = "cuda_wna16_gemv" if m <= 8 else "cuda_wna16_gemm"
    kernels = {"fp8": kernel_class("triton_w8a8_splitk")(fp8, fp8.quant_method),
               "w4_act": kernel_class(m_name)(w4_act, w4_act.quant_method),
               "nf4": kernel_class("cuda_nf4_gemv")(nf4, nf4.quant_method),
               "w4": kernel_class(m_name)(w4, w4.quant_method)}

    def chain(x: torch.Tensor) -> torch.Tensor:
        codes, _ = rms_norm(x, norm_w, 1e-6, quant=FP8)
        h = kernels["fp8"].apply(fp8, codes, None)
        h, res = rms_norm(h, norm_w, 1e-6, residual=x)
        h = silu_and_mul(kernels["w4_act"].apply(w4_act, h, w4_act.bias))
        h = kernels["nf4"].apply(nf4, h, None) + res
        return kernels["w4"].apply(w4, h, None)

    x = torch.randn(m, hidden, generator=gen).to(bf16).to(DEVICE)
    pdl.set_enabled(False)
    want = chain(x).clone()
    pdl.set_enabled(True)
    graph, out = capture(lambda: chain(x))
    assert torch.isfinite(want.float()).all()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert ((out.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    assert_workspace_clean()


def test_only_decode_sized_launches_use_pdl(monkeypatch):
    monkeypatch.setattr(pdl, "enabled", lambda device: True)
    device = torch.device("cuda", 0)
    assert pdl.launch_args(device, pdl.MAX_TOKENS) == ({"PDL": True, "launch_pdl": True} if pdl.TRITON_PDL
                                                        else {"PDL": False})
    assert pdl.launch_args(device, pdl.MAX_TOKENS + 1) == {"PDL": False}
