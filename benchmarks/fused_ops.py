"""The fused small ops (issue 8 part 3) on one GPU at Llama-3-8B sizes (hidden 4096, intermediate 14336, 32 q / 8 kv
heads of 128, bf16), T in {1, 16, 256, 4096, 16384} tokens: each op through the layer as the model calls it, with
the Triton kernels ("triton") and with the torch reference ("torch"); the ops that emit W8A8 activations also
unfused ("triton_unfused": the Triton op, then the W8A8 Linear's own per-token quant pass as the Linear runs it),
which is what the fusion saves. The quantizing SiLU-and-mul also runs as the engine runs it on Hopper
("cuda_cluster": csrc/row_quant.cu, a row over a thread-block cluster); the goals hold the engine's kernel.

Bandwidth = the op's minimal traffic (each input read once, each output written once: the bytes a perfect kernel
moves, the same for every implementation) / time, against the measured device-to-device copy bandwidth (bytes read
+ written, linear_kernels.copy_bandwidth). Goal: >= 70% of copy for the engine's kernel at T >= 4096. Times are the
median of CUDA-graph replays (linear_kernels.time_calls) over enough copies of the inputs that no call finds them
in L2, so the kernels are also shown to capture with no host sync.

    python benchmarks/fused_ops.py --out benchmarks/results/fused_ops.json
"""
from __future__ import annotations

import argparse
import datetime
import logging
import sys
import time
from collections.abc import Callable

import torch
from linear_kernels import copies_for, copy_bandwidth, print_goals, tensor_bytes, time_calls, write_report

from quantkit.config import RopeConfig
from quantkit.kernels.cuda_row_quant import use_cuda_row_quant
from quantkit.layers.activation import SiluAndMul
from quantkit.layers.fused import use_fused_ops
from quantkit.layers.norm import RMSNorm
from quantkit.layers.rotary import RotaryEmbedding
from quantkit.quant.w8a8 import FP8, INT8, W8Type

TOKENS = [1, 16, 256, 4096, 16384]
HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 32, 8, 128
MAX_POSITION = 8192
DTYPE = torch.bfloat16
BANDWIDTH_GOAL, GOAL_TOKENS = 0.7, (4096, 16384)
QUANT = {"fp8": FP8, "int8": INT8}


def op_bytes(op: str, t: int, elem: int = 2) -> int:
    """Minimal traffic of `op` over t tokens: inputs read once, outputs written once (codes 1 byte, fp32 scales)."""
    name, _, quant = op.partition("+")
    out_elem, scales = (1, 4 * t) if quant else (elem, 0)
    if name == "rms_norm":  # x, residual, weight in; output and the new residual out
        return 2 * t * HIDDEN * elem + HIDDEN * elem + t * HIDDEN * elem + t * HIDDEN * out_elem + scales
    if name == "rotary":  # q and k read and written in place, one fp32 cos|sin row and a position per token
        return 2 * t * (HEADS + KV_HEADS) * HEAD_DIM * elem + t * HEAD_DIM * 4 + t * 8
    if name == "silu_and_mul":
        return 2 * t * INTER * elem + t * INTER * out_elem + scales
    raise ValueError(f"unknown op {op!r}")


def op_cases(op: str, t: int, gen: torch.Generator, device: torch.device
             ) -> tuple[list[tuple], dict[str, Callable[[tuple], object]]]:
    """(input sets, one per L2-defeating copy; implementation -> call on one input set). "torch" and "triton" are
    the same layer call, run under use_fused_ops of that name."""
    name, _, qname = op.partition("+")
    quant: W8Type | None = QUANT.get(qname)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, DTYPE)

    if name == "rms_norm":
        with torch.device(device):
            norm = RMSNorm(HIDDEN, 1e-5, DTYPE)
        norm.weight.data.copy_(1.0 + 0.2 * torch.randn(HIDDEN, generator=gen))
        inputs = (rand(t, HIDDEN), rand(t, HIDDEN))
        calls = {"fused": lambda i: norm(i[0], i[1], quant), "float": lambda i: norm(i[0], i[1])[0]}
    elif name == "rotary":
        with torch.device(device):
            rotary = RotaryEmbedding(HEAD_DIM, MAX_POSITION, RopeConfig(theta=500000.0))
        sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
        inputs = (torch.randint(0, MAX_POSITION, (t,), generator=gen).to(device), rand(t, sum(sizes)))

        def rotate(i: tuple) -> object:  # q and k as LlamaAttention makes them: views of the qkv output
            q, k, _ = i[1].split(sizes, dim=-1)
            return rotary(i[0], q.view(t, HEADS, HEAD_DIM), k.view(t, KV_HEADS, HEAD_DIM))
        calls = {"fused": rotate}
    else:
        act = SiluAndMul()
        inputs = (rand(t, 2 * INTER),)
        calls = {"fused": lambda i: act(i[0], quant), "float": lambda i: act(i[0])}
    copies = copies_for(sum(tensor_bytes(x) for x in inputs), torch.cuda.get_device_properties(device).L2_cache_size)
    sets = [inputs] + [tuple(x.clone() for x in inputs) for _ in range(copies - 1)]
    impls = {"torch": calls["fused"], "triton": calls["fused"]}
    if quant is not None and name == "silu_and_mul":
        impls["cuda_cluster"] = calls["fused"]
    if quant is not None:
        from quantkit.kernels.triton_w8a8 import quantize_per_token
        impls["triton_unfused"] = lambda i: quantize_per_token(calls["float"](i).reshape(t, -1), quant.dtype)
    return sets, impls


def run(ops: list[str], tokens: list[int], device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(0)
    copy_bw = copy_bandwidth()
    rows = []
    for op in ops:
        for t in tokens:
            sets, impls = op_cases(op, t, gen, device)
            nbytes, base = op_bytes(op, t), None
            for impl, fn in impls.items():
                with use_fused_ops("torch" if impl == "torch" else "triton"), use_cuda_row_quant(impl != "triton"):
                    seconds = time_calls([lambda i=i, fn=fn: fn(i) for i in sets])
                base = base or seconds
                rows.append({"op": op, "impl": impl, "t": t, "us": round(seconds * 1e6, 2),
                             "speedup_vs_torch": round(base / seconds, 3), "GBps": round(nbytes / seconds / 1e9, 1),
                             "bw_fraction": round(nbytes / seconds / copy_bw, 4)})
            print(f"{op:20s} T={t:6d}: " + ", ".join(f"{r['impl']} {r['us']} us ({r['bw_fraction']:.0%})"
                                                    for r in rows if (r["op"], r["t"]) == (op, t)), flush=True)
            del sets, impls
            torch.cuda.empty_cache()
    return {"copy_bandwidth_GBps": round(copy_bw / 1e9, 1), "rows": rows}


def engine_impl(op: str) -> str:
    """The implementation the engine runs `op` on (on Hopper)."""
    return "cuda_cluster" if op.startswith("silu_and_mul+") else "triton"


def goals(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if r["impl"] == engine_impl(r["op"]) and r["t"] in GOAL_TOKENS:
            out.append({"goal": f"{r['op']} T={r['t']} bandwidth >= {BANDWIDTH_GOAL:.0%} of copy",
                        "measured": r["bw_fraction"], "pass": r["bw_fraction"] >= BANDWIDTH_GOAL,
                        "short_by": round(max(0.0, BANDWIDTH_GOAL - r["bw_fraction"]), 4)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/fused_ops.json")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--ops", default="rms_norm,rms_norm+fp8,rms_norm+int8,rotary,silu_and_mul,silu_and_mul+fp8,"
                                     "silu_and_mul+int8")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        sys.exit("fused_ops.py needs a CUDA device")
    ops = args.ops.split(",")
    for op in ops:
        op_bytes(op, 1)  # an unknown op fails before any GPU work
    start = time.perf_counter()
    report = {"benchmark": "fused small ops (RMSNorm+residual, rotary, SiLU-and-mul, fused W8A8 activation quant) "
                           "vs the torch reference, CUDA-graph timed",
              "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "command": "python " + " ".join(sys.argv), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "dtype": "bfloat16",
              "shapes": {"hidden": HIDDEN, "intermediate": INTER, "heads": HEADS, "kv_heads": KV_HEADS,
                         "head_dim": HEAD_DIM}}
    result = run(ops, [int(t) for t in args.tokens.split(",")], torch.device("cuda"))
    report.update(copy_bandwidth_GBps=result["copy_bandwidth_GBps"], goals=goals(result["rows"]),
                  rows=result["rows"])
    print(f"\ncopy bandwidth {result['copy_bandwidth_GBps']} GB/s")
    print_goals(report["goals"])
    write_report(report, start, args.out)


if __name__ == "__main__":
    main()
