"""Kernel choice: priority lists, buckets, the log line, the override; CPU layers stay on the torch reference."""
from __future__ import annotations

import logging

import pytest
import torch

from quantkit.config import EngineConfig
from quantkit.kernels.base import BUCKETS, KernelPlan, LinearKernel
from quantkit.kernels.select import select_kernels, use_linear_kernel
from tests.kernels.conftest import DEVICE, nf4_layer, w8a8_layer, wna16_layer

cpu_only = pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU choice")


@cpu_only
def test_cpu_runs_the_reference_and_says_why(gen, caplog, monkeypatch):
    from quantkit.kernels import select
    monkeypatch.setattr(select, "_logged", set())  # logged once per layer kind per process: earlier tests may have
    with caplog.at_level(logging.INFO, logger="quantkit.kernels.select"):
        layers = {"wna16": wna16_layer(128, 64, 4, 32, True, True, torch.float32, True, gen),
                  "w8a8": w8a8_layer(128, 64, True, False, torch.float32, True, gen),
                  "nf4": nf4_layer(128, [64], "nf4", True, torch.float32, True, gen)}
    for fmt, layer in layers.items():
        assert layer.quant_method.kernels.names() == ["torch"] * len(BUCKETS)
        x = torch.randn(3, 128, generator=gen)
        assert torch.equal(layer(x), layer.quant_method.reference_apply(layer, x, layer.bias))
    text = caplog.text
    assert "triton_wna16: needs a CUDA device" in text and "m<=32 -> torch" in text


@cpu_only
def test_override_is_explicit(gen):
    layer = wna16_layer(128, 64, 4, 32, True, False, torch.float32, False, gen)
    with pytest.raises(ValueError, match="triton_wna16.*needs a CUDA device"):
        select_kernels(layer, layer.quant_method, "wna16", override="triton_wna16")
    with pytest.raises(ValueError, match="not a wna16 kernel"):
        select_kernels(layer, layer.quant_method, "wna16", override="triton_nf4")
    with use_linear_kernel("torch"):
        assert select_kernels(layer, layer.quant_method, "wna16").names() == ["torch"] * len(BUCKETS)
    with pytest.raises(ValueError, match="linear_kernel='fast'"):
        EngineConfig(model="smollm2-135m", linear_kernel="fast")


def test_bucket_refusals(gen):
    from quantkit.kernels.triton_nf4 import TritonNF4
    from quantkit.kernels.triton_wna16 import TritonWNA16SplitK, WNA16DequantCublas
    layer = wna16_layer(128, 64, 4, 32, True, False, torch.float32, False, gen)
    small, large = BUCKETS[0], BUCKETS[-1]
    assert TritonWNA16SplitK.bucket_refusal(small) == ""
    assert "M <= 32" in TritonWNA16SplitK.bucket_refusal(large)
    assert "M > 32" in WNA16DequantCublas.bucket_refusal(small)
    assert WNA16DequantCublas.can_implement(layer, layer.quant_method, DEVICE)[0]  # forced: any M
    assert WNA16DequantCublas.bucket_refusal(large) == ""
    assert "M <= 64" in TritonNF4.bucket_refusal(large)
    # Split-K and dequantize-then-cuBLAS share the buckets out at M = 32: each bucket goes to exactly one.
    for bucket in BUCKETS:
        served = [not k.bucket_refusal(bucket) for k in (TritonWNA16SplitK, WNA16DequantCublas)]
        assert served.count(True) == 1, bucket


def test_plan_dispatches_on_m():
    class Tagged(LinearKernel):
        def __init__(self, tag):
            self.name = tag

        def apply(self, layer, x, bias):
            return self.name
    bounds = [b.max_m for b in BUCKETS[:-1]]
    plan = KernelPlan([Tagged(b.name) for b in BUCKETS], bounds)
    for i, bound in enumerate(bounds):
        assert plan.apply(None, torch.zeros(bound, 8), None) == BUCKETS[i].name
        assert plan.apply(None, torch.zeros(bound + 1, 8), None) == BUCKETS[i + 1].name
    assert plan.apply(None, torch.zeros(1, 8), None) == BUCKETS[0].name
    assert plan.apply(None, torch.zeros(5000, 8), None) == BUCKETS[-1].name
    assert plan.apply(None, torch.zeros(5, 8, 8), None) == "m<=64"  # M counts every leading dim
