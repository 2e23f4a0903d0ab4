"""Kernel tests: layers in each kernel format on fresh random data, the torch reference as oracle. Without a GPU
the Triton kernels run under TRITON_INTERPRET=1 (set here, before any kernel module is imported) at small sizes;
tests marked `gpu` sweep the sizes that matter on a real device."""
from __future__ import annotations

import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from quantkit.kernels import random_layers  # noqa: E402
from quantkit.layers.linear import Linear  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bound on ||out - ref|| / ||ref|| where both are rounded to the activation dtype
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-3}
wna16_layer = partial(random_layers.wna16_layer, device=DEVICE)
w8a8_layer = partial(random_layers.w8a8_layer, device=DEVICE)
nf4_layer = partial(random_layers.nf4_layer, device=DEVICE)


def poison_outputs(m: int, n: int) -> None:
    """NaN-filled blocks of the output sizes go back to the allocator, so a kernel's fresh torch.empty output
    starts as NaN: any element it fails to write shows up."""
    blocks = [torch.full((m, n), float("nan"), dtype=dt, device=DEVICE)
              for dt in (torch.bfloat16, torch.float16, torch.float32) for _ in range(2)]
    del blocks


def check(layer: Linear, kernel_cls, x: torch.Tensor, bias: bool = True) -> float | None:
    """Runs `kernel_cls` on `layer`; asserts every output is written, finite and within the dtype's bound of the
    torch reference. Returns the relative error (None when the kernel refuses the layer, e.g. N % 16 for cuBLASLt)."""
    method = layer.quant_method
    if not kernel_cls.can_implement(layer, method, DEVICE)[0]:
        return None
    ref = method.reference_apply(layer, x, layer.bias if bias else None).float()
    kernel = kernel_cls(layer, method)
    poison_outputs(x.numel() // x.shape[-1], layer.output_size)
    out = kernel.apply(layer, x, layer.bias if bias else None)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all(), f"{kernel_cls.name}: non-finite outputs"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[x.dtype], f"{kernel_cls.name}: relative error {err:.2e}"
    return err


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("QUANTKIT_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"generator seed {seed}")  # shown when a test fails; QUANTKIT_TEST_SEED=<seed> replays it
    return torch.Generator().manual_seed(seed)


def assert_workspace_clean() -> None:
    """The split-K kernels' last program per tile must leave the shared workspace and counters at zero."""
    from quantkit.kernels.triton_common import splitk_workspace
    ws, cnt = splitk_workspace(DEVICE, 0, 0)
    assert not ws.any() and not cnt.any()


def capture(fn):
    """(graph, fn's output in the graph's memory): fn runs once on a side stream first, as a capture needs (lazy
    initialisation, Triton compiles), then is captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def gpu(test):
    """Marks a test `gpu` and skips it without a CUDA device."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))
